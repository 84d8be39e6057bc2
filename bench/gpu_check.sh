#!/usr/bin/env bash
# One prepared run for a session that has a GPU (see DEVELOPERS.md): from the repository root,
#
#     OUT=/some/folder bash bench/gpu_check.sh
#
# trains ResNet26 for one short epoch on CUDA (224-px crops), exports it, benchmarks the CUDA
# backends available there (PyTorch fp32 with TF32 off, fp16 channels_last, torch.compile and CUDA
# graphs; ONNX Runtime and TensorRT rows appear when their CUDA builds exist, otherwise the bench
# says why they are skipped), shows the out-of-memory path on a real GPU, runs the runtime's CUDA
# check and the micro-benchmarks. Every step has a time limit; a failing step is recorded and the rest go on.
# Everything lands in $OUT: <step>.log, the JSON reports, steps.tsv (step, exit status, seconds).
set -euo pipefail

OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export CNNBENCH_CACHE="$WORK/cache"      # the embedded data set is generated here, not into $OUT
export PYTHONUNBUFFERED=1
CHECKPOINT="$WORK/train/resnet26/best.pt"
EXPORT_DIR="$WORK/export/resnet26"
TOTAL_LIMIT=${TOTAL_LIMIT:-450}          # seconds for the whole script; later steps get what is left
FAILED=0
printf 'step\tstatus\tseconds\n' > "$OUT/steps.tsv"

# step NAME SECONDS COMMAND...: run with a time limit (capped by what is left of TOTAL_LIMIT),
# stdout+stderr to $OUT/NAME.log; a failure is counted and the script goes on.
step() {
    local name=$1 limit=$2
    shift 2
    local began=$SECONDS status=0 left=$((TOTAL_LIMIT - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "=== $name SKIPPED: only ${left}s of the ${TOTAL_LIMIT}s budget left"
        printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - began))" >> "$OUT/steps.tsv"
    if [ "$status" -ne 0 ]; then
        FAILED=$((FAILED + 1))
        echo "--- $name FAILED (exit $status); last lines of $name.log:"
        tail -n 15 "$OUT/$name.log" || true
    fi
    return 0
}

step environment 60 bash -c 'nvidia-smi; python - <<"EOF"
import json, torch
import onnxruntime
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "onnxruntime": onnxruntime.__version__, "ort_providers": onnxruntime.get_available_providers()}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
try:
    import tensorrt
    info["tensorrt"] = tensorrt.__version__
except ImportError:
    info["tensorrt"] = None
print(json.dumps(info, indent=2))
EOF'

# 224-pixel crops, so the bench rows are the ResNet26 figures the performance targets name. The full
# embedded set (not --quick-data) so the test split holds >= 128 images: the bench then scores two
# full batches of 64, and a compiled model never meets a second input shape (no recompilation).
step train 150 python cli.py train resnet26 --epochs 1 --device cuda --image-size 224 \
    --batch-size 64 --out "$WORK/train" --name resnet26 --json

step export 120 python -c "
import json, sys, export
result = export.export_checkpoints(['$CHECKPOINT'], fp16=True, out='$WORK/export', tensorrt='auto', max_batch=64,
                                   progress=True)
json.dump(result, open('$OUT/export.json', 'w'), indent=2, default=str)
print('export ok' if result['ok'] else 'export parity failures: %s' % result['failures'])
sys.exit(0 if result['ok'] else 1)
"

# Compute and end-to-end rows without compilation: the reference and the plain fast paths.
# eval_images=128 is two full batches, so a compiled model never sees a second input shape.
step bench 180 python -c "
import bench
result = bench.run_bench(['$CHECKPOINT', '$EXPORT_DIR'], batch=64, device='cuda', mode='both', seconds=3,
                         eval_images=128, out='$OUT/bench.json')
print(bench.render_table(result))
"

# torch.compile (default mode) and CUDA graphs (reduce-overhead), fp16 channels_last, compute mode.
step bench_compiled 200 python -c "
import bench
result = bench.run_bench(['$CHECKPOINT'], batch=64, device='cuda', mode='compute', precisions=['fp16'],
                         compile=True, seconds=3, eval_images=128, out='$OUT/bench_compiled.json')
print(bench.render_table(result))
"

# Out of memory on a real GPU: an error naming a batch that fits, nothing timed at a smaller batch.
step bench_oom 120 python -c "
import bench
result = bench.run_bench(['$CHECKPOINT'], batch=8192, device='cuda', backends=['torch'], precisions=['fp32'],
                         iters=1, warmup=0, eval_images=128, out='$OUT/bench_oom.json')
errors = [r['error'] for r in result['rows']]
print(errors)
assert errors and all(e and ('pass --batch' in e or 'not even batch 1' in e) for e in errors), errors
"

if [ -f runtime/cuda_check.py ]; then
    # --no-compile: bench_compiled above already paid for torch.compile.
    step runtime_cuda_check 150 python -m runtime.cuda_check "$CHECKPOINT" --export "$EXPORT_DIR" --images 256 \
        --batch 64 --no-compile --out "$OUT/runtime_cuda_check.json"
fi

# int8: the QDQ graph for ONNX Runtime plus, where TensorRT exists, the engine built from its
# symmetric-activation sibling (export/int8.py); both pass through the int8 parity gate.
step export_int8 150 python -c "
import json, sys, export
result = export.export_checkpoints(['$CHECKPOINT'], int8=True, calibration_images=16, out='$WORK/export_int8',
                                   tensorrt='auto', max_batch=64, progress=True)
json.dump(result, open('$OUT/export_int8.json', 'w'), indent=2, default=str)
print(export.format_parity_table(result['exports']))
sys.exit(0 if result['ok'] else 1)
"

step micro_benchmarks 120 python -m pytest tests/benchmarks --benchmark-only --benchmark-enable -q \
    -p no:cacheprovider --benchmark-json="$OUT/micro_benchmarks.json"

echo "=== steps (status 0 = ok, 124 = over its time limit)"
column -t "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
for report in bench bench_compiled; do
    if [ -f "$OUT/$report.log" ]; then
        echo "=== $report table"
        grep -v '^\[bench\]' "$OUT/$report.log" | tail -n 40 || true
    fi
done
echo "$FAILED step(s) failed; logs and JSON in $OUT"
exit 0
