"""The plan layer of the ops: host-side, backend-neutral preparation of a call.

One module per op. A plan function takes the op's parameters (shapes, tiers, filters, sample
indices) and builds, with torch ops on the inputs' device, what a kernel reads besides the data:
block schedules, segment tables, filter tables, DFT and RoPE tables. What depends on shapes and
parameters only is cached per key (flashinfer's plan/run split: a diffusion run calls each op
thousands of times with one set of parameters and plans once).

Flow: the op module (``longvideo.ops.<op>``) validates and dispatches; a backend's launch code
asks this layer for its plan and runs its kernel (``longvideo.triton_kernels.<op>``, or the CUDA
extension's private op). Nothing here imports an op module, a backend or Triton, and no backend
imports another backend for a host helper.
"""
