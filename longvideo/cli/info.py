"""``longvideo info``: versions, devices, which backends are available and why not."""
from __future__ import annotations

import json
import os

HELP = "versions and backend availability"


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--no-build", action="store_true", help="do not try to load/JIT-build the CUDA extension")


def run(args) -> int:
    import platform

    import torch

    from .. import __version__, _extension, ops

    if not args.no_build:
        _extension.load_extension()  # returns at once, with the reason, where no CUDA device is present
    info = {
        "longvideo": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": None,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "cuda_extension": dict(zip(("available", "reason"), _extension.extension_status())),
        "csrc": str(_extension.csrc_dir()),
        "backend_setting": {op: ops.current_setting(op) for op in ops.report()},
        "backends": ops.report(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"not importable: {exc}"
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except Exception as exc:
        info["diffusers"] = f"not importable: {exc}"
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("longvideo", "python", "torch", "torch_cuda", "cuda_device", "triton", "diffusers", "TRITON_INTERPRET"):
        print(f"{key:>16}: {info[key]}")
    ext = info["cuda_extension"]
    print(f"{'cuda extension':>16}: {'loaded' if ext['available'] else 'unavailable'} ({ext['reason']})")
    print("\nbackends (auto picks per device; on CPU the reference):")
    for op, table in info["backends"].items():
        print(f"  {op}  [setting: {info['backend_setting'][op]}]")
        for name, b in table.items():
            mark = "yes" if b["available"] else "no "
            print(f"    {name:<10} {mark}  {b['reason']}")
    return 0
