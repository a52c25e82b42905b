"""From a trained model to masks: the one prediction path evaluate scores and predict runs, in
PyTorch or ONNX Runtime. It depends on the model alone, never on training code."""
