"""Scoring a trained model: metrics, the test split and out of fold, external sets, figures."""
