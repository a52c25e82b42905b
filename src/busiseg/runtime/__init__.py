"""Where a run computes: device and precision, CPU threads, queue workers, torchrun processes.

One copy of these rules serves training, evaluation and prediction alike."""
