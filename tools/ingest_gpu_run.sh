#!/usr/bin/env bash
# Bring what a GPU run returned into the repository:
#   bash tools/ingest_gpu_run.sh DIR     (DIR: the device's files_at folder of tools/gpu_run.sh)
# 1. the JSON records of results.tar.gz -> benchmarks/results/ (the archive's table is not kept);
# 2. the run's logs (steps, tests, build, warm-up, bench, devices) -> benchmarks/results/gpu_runs/<date>/;
# 3. the table (benchmarks/results/README.md), the `auto` backend preferences, the plots
#    (benchmarks/results/<suite>.png) and the README's table of step times regenerated.
set -euo pipefail
DIR=${1:?usage: ingest_gpu_run.sh DIR}
cd "$(dirname "$0")/.."
RESULTS=benchmarks/results
STAMP=$(date -u +%Y%m%dT%H%M%S)
[ -f "$DIR/steps.tsv" ] && STAMP=$(date -u -r "$DIR/steps.tsv" +%Y%m%dT%H%M%S)
mkdir -p "$RESULTS/gpu_runs/$STAMP"
if [ -f "$DIR/results.tar.gz" ]; then
  tmp=$(mktemp -d)
  tar -xzf "$DIR/results.tar.gz" -C "$tmp"
  find "$tmp" -name '*.json' -exec cp {} "$RESULTS/" \;
  echo "records: $(find "$tmp" -name '*.json' | wc -l)"
  rm -rf "$tmp"
fi
for f in gpu.txt steps.tsv build.log warm.log tests.log junit.xml bench.log; do
  [ -f "$DIR/$f" ] && cp "$DIR/$f" "$RESULTS/gpu_runs/$STAMP/"
done
python -m longvideo bench --table --out "$RESULTS"
python -m longvideo bench --update-preferences --out "$RESULTS"
python tools/plot_results.py "$RESULTS" || echo "plots skipped (pip install matplotlib)"
python tools/gpu_run_summary.py README.md "$RESULTS/gpu_runs"
echo "ingested into $RESULTS (logs: $RESULTS/gpu_runs/$STAMP)"
