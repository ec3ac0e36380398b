"""Placeholder: being implemented."""


def lowfreq_mix(*args, **kwargs):
    raise NotImplementedError("lowfreq_mix is not implemented yet")
