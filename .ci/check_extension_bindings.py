"""Load the CUDA extension built by compile_csrc.sh into CPU-only torch and check its bindings.

Each private op must be registered with a schema, and each Python CUDA backend must call it
with arguments that bind to that schema: called with CPU tensors, a correct call gets as far as
dispatch and fails with "Could not run ... with arguments from the 'CPU' backend"; a schema
mismatch fails earlier with a different error.
"""
import sys
import types

import torch

import longvideo
from longvideo.ops import get_backend

torch.ops.load_library(sys.argv[1])
torch.cuda.current_stream = lambda *a, **k: types.SimpleNamespace(cuda_stream=0)

PRIVATE = ["_lowfreq_mix_cuda", "_consistent_attention_cuda", "_tiered_sparse_attention_cuda"]
h = torch.float16
x = torch.randn(1, 2, 3, 8, 8, dtype=h)
q_ca = torch.randn(2, 2, 16, 64, dtype=h)
q_tsa = torch.randn(1, 2, 24, 64, dtype=h)
freqs = torch.rand(4)
CALLS = {
    "lowfreq_mix": (x, x.clone(), "gaussian", 0.25, 0.25, 4),
    "consistent_attention": (q_ca, q_ca, q_ca, torch.tensor([1, 3, 20]), 2, -1, q_ca[0, :, :3], q_ca[0, :, :3], 0.125),
    "tiered_sparse_attention": (q_tsa, q_tsa, q_tsa, 6, 2, 3, 2, 1, None, freqs, [1.0, 2.0, 2.0, 2.0, 3.0]),
}

failed = []
for name in PRIVATE:
    if not hasattr(torch.ops.longvideo, name):
        failed.append(f"{name}: not registered by the extension")
    else:
        print(f"registered {getattr(torch.ops.longvideo, name).default._schema}")
for op, args in CALLS.items():
    try:
        get_backend(op, "cuda").fn(*args)
        failed.append(f"{op}: the CUDA backend ran on CPU tensors?")
    except NotImplementedError as exc:
        if "'CPU' backend" not in str(exc):
            failed.append(f"{op}: {str(exc).splitlines()[0]}")
        else:
            print(f"{op}: cuda backend binds to its schema")
    except Exception as exc:
        failed.append(f"{op}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
if failed:
    print("binding check FAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
    sys.exit(1)
print(f"longvideo {longvideo.__version__}: extension bindings ok")
