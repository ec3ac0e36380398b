#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels the GPU machine lacks into .whl/
# (ignored by .gitignore; carried to the device with `carry: [".whl"]`). The GPU machine has torch
# 2.11+cu130, triton 3.6, transformers and Python 3.12, but no diffusers and no network.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
# Only what the GPU image lacks (pytest, pytest-benchmark, ninja, imageio are there; copies in
# /tmp/site would shadow them). Not imageio-ffmpeg (68 MB, over the device's 64 MiB carry limit
# with the tree): the GPU tier and the benchmarks write no video.
rm -f .whl/*.whl
for spec in diffusers==0.42.1 ftfy wcwidth importlib_metadata zipp; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl "$spec"
done
ls -la .whl
du -sh .whl
