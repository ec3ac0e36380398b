"""Placeholder: being implemented."""


def consistent_attention(*args, **kwargs):
    raise NotImplementedError("consistent_attention is not implemented yet")
