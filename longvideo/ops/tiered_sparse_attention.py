"""Placeholder: being implemented."""


def tiered_sparse_attention(*args, **kwargs):
    raise NotImplementedError("tiered_sparse_attention is not implemented yet")


def schedule_density(*args, **kwargs):
    raise NotImplementedError
