"""Warm the Triton (and torch.compile) caches for the GPU job, in parallel processes.

The kernel specializations a timed run launches are those its real launch code produces at its
real shapes: rather than a hand list of (kernel, dtype, head dim, block) tuples, which would drift
from the wrappers, each process runs one benchmark suite's setup and every case once through the
ordinary launch path (``longvideo bench --warm``: untimed, unrecorded). The processes share one
Triton cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``) and torch.compile's cache, so the
timed run that follows in other processes finds its kernels compiled. The GPU tests are warmed by
their own parallelism (``pytest -n``).

    python tools/warm_triton.py --suites "tiered_sparse_attention consistent_attention" \\
        --profile budget --timeout 200 --log warm.log

Exit status 0 unless a process could not be started; a suite that fails or runs out of time is
reported in the log (a warm-up is an optimisation, never a reason to stop the job).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", required=True, help="space-separated suite names, one process each")
    ap.add_argument("--profile", default="budget")
    ap.add_argument("--quick", action="store_true", help="the suites' quick CPU cases (rehearsal)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds for all processes together")
    ap.add_argument("--log", default=None, help="append every process's output to this file")
    ap.add_argument("--launches", action="store_true",
                    help="also compile every specialization tools/kernel_report.py enumerates from the ops' "
                         "launch code at the real shapes (one more process, parallel compiles)")
    args = ap.parse_args(argv)

    suites = args.suites.split()
    log = open(args.log, "a") if args.log else sys.stdout
    procs = {}
    t0 = time.time()
    if args.launches:
        # the kernel report's enumeration (the same launch code, captured instead of launched),
        # compiled for this machine's GPU into the shared cache
        code = ("import sys; sys.path.insert(0, 'tools'); import kernel_report as kr; "
                "rows = kr.precompile(kr.enumerate_launches(hot_only=False)); "
                "print(f'precompiled {len(rows)} specializations')")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        procs["<launches>"] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                               env=dict(env, PYTHONUNBUFFERED="1"))
    for suite in suites:
        cmd = [sys.executable, "-m", "longvideo", "bench", "--warm", "--suite", suite, "--profile", args.profile]
        if args.quick:
            cmd.append("--quick")
        if args.device:
            cmd += ["--device", args.device]
        # each in its own process group: a timeout ends it with its compile workers (an orphaned
        # worker would hold the pipe open, and compile on through the timed benchmarks)
        procs[suite] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    def _end_all(*_):
        for p in procs.values():
            _kill_group(p)
        sys.exit(130)

    signal.signal(signal.SIGINT, _end_all)
    signal.signal(signal.SIGTERM, _end_all)
    status = {}
    for suite, proc in procs.items():
        left = max(1.0, args.timeout - (time.time() - t0))
        try:
            out, _ = proc.communicate(timeout=left)
            status[suite] = f"rc {proc.returncode}"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            status[suite] = "stopped at the time limit"
        log.write(f"== warm {suite}: {status[suite]} after {time.time() - t0:.0f} s\n{out}")
        log.flush()
    log.write("warm: " + ", ".join(f"{s} {v}" for s, v in status.items()) + f" ({time.time() - t0:.0f} s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
