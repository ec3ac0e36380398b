"""Helpers shared by the multi-process tests (gloo on CPU; torchrun launches of the CLI)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wrong_heads_to_sequence(x, group=None):
    """A plausible mistake: all_to_all without the head-group permutation (tokens and heads mixed);
    the multi-process tests put it in place of longvideo.parallel's to show they can fail."""
    import torch.distributed as dist

    n = dist.get_world_size(group)
    b, s, h, d = x.shape
    send = x.contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.reshape(b, n * s, h // n, d)


def torchrun_cli(args, nproc: int = 2, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc -m longvideo ARGS`` with this checkout first on the path;
    `env`: extra environment variables."""
    environ = dict(os.environ, **env,
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--master-port", str(free_port()), "-m", "longvideo"] + list(args),
                          capture_output=True, text=True, env=environ, timeout=timeout)
