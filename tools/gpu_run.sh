#!/usr/bin/env bash
# The whole GPU job, in one command on the device machine (see README "GPU runs"):
# install the carried wheels, build the CUDA extension, run the GPU test tier and every
# benchmark suite, and leave the JSON records and logs in $OUT.
#   device run: carry [".whl"], command: bash tools/gpu_run.sh
set -uo pipefail
OUT=${OUT:-/tmp/longvideo-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export LONGVIDEO_BUILD_DIR=/tmp/longvideo-build LONGVIDEO_TEST_GPU=1 LONGVIDEO_VERBOSE_BUILD=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 - >> "$OUT/gpu.txt" 2>&1 <<'PY'
import importlib
for name in ("torch", "triton", "diffusers", "transformers", "huggingface_hub", "safetensors", "imageio", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - the log says what is missing
        print(name, "MISSING:", type(exc).__name__, exc)
PY
{ time python3 -c "import longvideo._extension as e; print(e.load_extension(), e.extension_status())"; } 2>&1 | tee "$OUT/build.log"
python3 -m longvideo info --json > "$OUT/info.json" 2>&1
# Everything is written to $OUT as it happens: the device stops a command at its time limit and
# returns what $OUT holds then (at most 8 files: the records travel as one archive, re-made after
# every suite; a suite cut short keeps its finished cases, marked incomplete).
# SIGINT (not TERM) at the limit: pytest then still prints the failures it has collected.
[ -n "${SKIP_TESTS:-}" ] || timeout -s INT -k 30 ${GPU_TEST_TIMEOUT:-420} python3 -m pytest -v -rfE --durations=25 \
  -m gpu -p no:cacheprovider ${TESTS:-} > "$OUT/gpu_tests.log" 2>&1
RES=/tmp/longvideo-results; mkdir -p "$RES"
for suite in ${SUITES:-lowfreq_mix consistent_attention tiered_sparse_attention freeloc fifo storydiffusion blending}; do
  echo "== $suite $(date +%T)" >> "$OUT/bench.log"
  timeout -s INT -k 30 ${BENCH_TIMEOUT:-300} python3 -m longvideo bench --suite "$suite" --out "$RES" >> "$OUT/bench.log" 2>&1
  tar -czf "$OUT/results.tar.gz" -C "$RES" .
done
ls -la "$OUT" "$RES"
