#!/usr/bin/env bash
# The GPU check: mergeflow's CUDA path on a machine with an NVIDIA GPU, after `make install mergekit`.
#
#   bash benchmarks/gpu_check.sh            # tests on the GPU, then the 220M and 1B speed cases (about 15 min)
#   bash benchmarks/gpu_check.sh --quick    # tests, and the small speed case only (about 3 min)
#   DEVICE=cpu bash benchmarks/gpu_check.sh --quick   # the same script on the CPU: checks the script itself
#
# 1. The method tests that compare every method with the slow references (tests/test_methods.py,
#    tests/test_neuromerging_degenerate.py) with their tensors on the GPU (`pytest --device cuda`), and
#    tests/test_device.py: the staged merge and a whole pipeline run with `pipeline.device: cuda`
#    against the CPU merge.
# 2. benchmarks/merge_speed.py with `--device cuda` (mergeflow `--device cuda`, mergekit `--cuda`),
#    on the 220M float32 and the 1.26B bfloat16 Llama.
# Everything lands in $OUT (default benchmarks/results/gpu_check/): the device, the test log, the JSON
# and the tables; README's CUDA table is copied from there.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-benchmarks/results/gpu_check}"
PY=.venv/bin/python
QUICK=0
if [[ "${1:-}" == "--quick" ]]; then QUICK=1; fi
mkdir -p "$OUT"

"$PY" - "$DEVICE" > "$OUT/device.txt" <<'PYEOF'
import sys

import torch

device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, available {torch.cuda.is_available()}")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device is visible to torch (DEVICE=cpu checks the script without one)")
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
PYEOF
cat "$OUT/device.txt"

echo "== 1. method references and the pipeline on $DEVICE"
"$PY" -m pytest -q -p no:cacheprovider --device "$DEVICE" \
    tests/test_methods.py tests/test_neuromerging_degenerate.py tests/test_device.py 2>&1 | tee "$OUT/tests.log"

echo "== 2. merge speed on $DEVICE"
if [[ "$QUICK" == 1 ]]; then
    "$PY" -m benchmarks.merge_speed --size small --device "$DEVICE" --repeats 1 --mergekit-repeats 1 \
        --json "$OUT/merge_speed_small.json" | tee "$OUT/merge_speed_small.txt"
else
    for size in 220m 1b; do
        "$PY" -m benchmarks.merge_speed --size "$size" --device "$DEVICE" --json "$OUT/merge_speed_$size.json" \
            | tee "$OUT/merge_speed_$size.txt"
    done
fi
echo "gpu_check: done; results in $OUT"
