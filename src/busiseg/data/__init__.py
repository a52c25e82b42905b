"""From a dataset folder to tensors: reading images and masks, the layouts, the audit, ingest,
the resized cache, the split, and the synthetic demo sets."""
