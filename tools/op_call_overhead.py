"""Per-call cost of the op registration idioms, the backend stubbed out (issue 16 item 3).

lowfreq_mix's kernel runs for a few microseconds at the Ouroboros tail sizes, so what the
dispatcher adds per call matters there. This registers lowfreq_mix's real op body (argument
checks, the no-grad check, dispatch to a stub backend that returns an empty tensor) in scratch
namespaces twice, once with the low-level ``torch.library.Library`` API (define + CPU/CUDA impl +
register_fake: what lowfreq_mix uses) and once with ``torch.library.custom_op`` + register_fake
(+ register_autograd, the idiom of the other ops), and times a call of each on CPU tensors.

    python tools/op_call_overhead.py [--reps 20000]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

import longvideo  # noqa: F401  (registers the ops)

LM = importlib.import_module("longvideo.ops.lowfreq_mix")
SCHEMA = ("(Tensor x, Tensor noise, str filter='gaussian', float d_s=0.25, float d_t=0.25, "
          "float order=4.0) -> Tensor")


def body(x, noise, filter="gaussian", d_s=0.25, d_t=0.25, order=4.0):
    """lowfreq_mix's op body with the backend stubbed out."""
    LM._check(x, noise, filter, d_s, d_t, order)
    LM._check_no_grad(x, noise)
    return x.new_empty(x.shape)


def fake(x, noise, filter="gaussian", d_s=0.25, d_t=0.25, order=4.0):
    LM._check(x, noise, filter, d_s, d_t, order)
    return x.new_empty(x.shape)


def low_level():
    lib = torch.library.Library("lv_overhead_low", "DEF")
    lib.define("mix" + SCHEMA)
    lib.impl("mix", body, "CPU")
    lib.impl("mix", body, "CUDA")
    torch.library.register_fake("lv_overhead_low::mix", fake, lib=lib)
    return lib, torch.ops.lv_overhead_low.mix.default


def custom_op(autograd: bool):
    ns = "lv_overhead_ag" if autograd else "lv_overhead_co"
    op = torch.library.custom_op(f"{ns}::mix", body, mutates_args=(), schema=SCHEMA)
    op.register_fake(fake)
    if autograd:
        def backward(ctx, grad):
            raise RuntimeError("not differentiable")
        op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)
    return op, getattr(torch.ops, ns).mix.default


def timeit(fn, reps: int, rounds: int = 7) -> float:
    """Median microseconds per call over `rounds` rounds of `reps` calls."""
    for _ in range(min(reps, 2000)):
        fn()
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        per_round.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(per_round)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20000)
    args = ap.parse_args(argv)
    keep = [low_level(), custom_op(False), custom_op(True)]
    (_, low), (_, co), (_, ag) = keep
    x, n = torch.randn(1, 4, 1, 16, 16), torch.randn(1, 4, 1, 16, 16)  # small: torch.add is dispatch alone
    cases = {
        "op body, a plain Python call": lambda: body(x, n, "gaussian", 0.25, 0.25, 4.0),
        "torch.add of the same tensors": lambda: torch.add(x, n),
        "low-level Library (lowfreq_mix)": lambda: low(x, n, "gaussian", 0.25, 0.25, 4.0),
        "custom_op + register_fake": lambda: co(x, n, "gaussian", 0.25, 0.25, 4.0),
        "custom_op + register_fake + register_autograd": lambda: ag(x, n, "gaussian", 0.25, 0.25, 4.0),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median us per call "
          f"({args.reps} calls x 7 rounds)")
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for name, fn in cases.items():
                print(f"  {'grad mode' if grad else 'no_grad  '}  {name:48s} {timeit(fn, args.reps):7.2f}")


if __name__ == "__main__":
    main()
