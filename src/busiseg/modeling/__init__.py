"""The networks: blocks, architectures, the registry `model.arch` names, pretrained encoder
weights, and the model file that carries a trained one."""
