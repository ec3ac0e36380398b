"""diffusers attention processors that route attention through ``torch.ops.longvideo``."""
