#!/usr/bin/env bash
# The CUDA path, checked and measured in one prepared command on a machine with a GPU
# (issue 14, items 9 and 10):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu_check_out
#
# 1. the card (nvidia-smi), and its utilisation sampled every second throughout;
# 2. the tests that touch CUDA, mixed precision and the precision bounds the docs state;
# 3. benchmarks/cuda_check.py: AMP training with GradScaler, float16 extraction against
#    float32 (and the CPU), resume on CUDA, multi-scale with whitening, images/s;
# 4. bench_train and bench_extract on the GPU against the authors' one-image loop
#    (targets on one GPU: both at least 5x); they need the photos of
#    $SFMPAIRS_DATA/colmap (default ../shared/data) and are skipped without them;
# 5. a one-rank NCCL run under torchrun (DistributedDataParallel on the GPU).
#
# Each step's output is kept in OUT_DIR/*.txt; a failing step is reported and the
# others still run; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT"
failed=0
step() {  # step NAME COMMAND...: run, keep the output, count a failure
    local name=$1; shift
    echo "== $name: $*"
    if "$@" > "$OUT/$name.txt" 2>&1; then tail -n 15 "$OUT/$name.txt"; else
        echo "!! $name failed:"; tail -n 30 "$OUT/$name.txt"; failed=$((failed + 1)); fi
}
python -c "import sfmpairs" 2>/dev/null || pip install -q -e '.[test]'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$OUT/utilisation.csv" &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT

W="$OUT/world"
step world bash -c "sfmpairs synth -o '$W/photos' --clusters 12 --images-per-cluster 30 --overwrite -q &&
    sfmpairs ingest '$W/photos' -o '$W/sfm.h5' --overwrite -q &&
    sfmpairs mine '$W/sfm.h5' -o '$W/pairs.h5' --queries-per-cluster 0 --val-fraction 0.3 --overwrite -q"
step tests python -m pytest -q -p no:cacheprovider tests/test_extract_precision.py tests/test_network.py \
    tests/test_distributed.py
step cuda_check python benchmarks/cuda_check.py --pairs "$W/pairs.h5" --images-root "$W/photos" -o "$OUT/cuda_check"
DATA=${SFMPAIRS_DATA:-../shared/data}
if [ -d "$DATA/colmap" ]; then
    step bench_train python benchmarks/bench_train.py --device cuda
    step bench_extract python benchmarks/bench_extract.py --device cuda
else
    echo "== bench_train, bench_extract: skipped (no photos under $DATA/colmap; set SFMPAIRS_DATA)"
fi
step torchrun_nccl torchrun --nproc_per_node=1 -m sfmpairs train --pairs "$W/pairs.h5" --images-root "$W/photos" \
    -o "$OUT/ddp_run" --arch resnet18 --epochs 2 --image-size 256 --test-image-size 256 --query-size 200 \
    --pool-size 400 --device cuda --overwrite
kill $SMI 2>/dev/null
python - "$OUT/utilisation.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))[1:]
util = [float(r[1].strip().split()[0]) for r in rows if len(r) > 2 and r[1].strip().split()[0].isdigit()]
if util:
    print(f"GPU utilisation over {len(util)} s: mean {sum(util) / len(util):.0f} %, max {max(util):.0f} %")
PY
echo "failed steps: $failed (outputs in $OUT)"
exit $failed
