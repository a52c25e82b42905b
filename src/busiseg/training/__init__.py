"""Fitting a model: the loop, its losses and augmentation, checkpoints for resuming."""
