"""Triton kernels, one module per op (installed as ``longvideo.triton_kernels``).

No torch.library code here: the op modules in ``longvideo.ops`` register these as backends.
"""
