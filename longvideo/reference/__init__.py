"""Pure-PyTorch ground truth for every op: the semantics, readable and slow."""
