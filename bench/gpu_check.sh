#!/usr/bin/env bash
# One prepared run for a machine with a CUDA GPU, from the repository root:
#
#     PYTHONPATH=. OUT=/some/folder bash bench/gpu_check.sh
#
# Written for the device machine this project may be lent: PyTorch with CUDA, torchvision, onnx, CPU
# onnxruntime, timm and pytest, run as `python3`; no TensorRT, no onnxruntime-gpu, no network, no
# pip install of the project (click, tqdm and matplotlib may be missing: see "shims" below). The steps,
# most important first, share one budget (TOTAL_LIMIT, default 500 s, inside the 9 minutes a run may
# take); a step that would start with under 20 s left is skipped, a failing one is recorded and the
# rest go on:
#   1. environment   versions, GPU, what is importable                          -> env.json
#   2. cuda_tests    the CUDA/TensorRT/onnxruntime-gpu tests (they skip, with the reason, what is
#                    absent): GPU paths, GPU preprocessing bounds, backends, cuda_check -> tests.xml
#   3. preprocess    nvJPEG decode and GPU resize against PIL, measured          -> summary.json
#   4. train         ResNet26, one epoch on CUDA, fp16 AMP + channels_last, 224 px -> train.json
#   5. dense         dense ten crops of that checkpoint on CUDA (file pipeline fp32 and fp16, dense
#                    Grad-CAM) against the same on the CPU                        -> summary.json
#   6. export        fp32 + fp16 ONNX (TensorRT engines where TensorRT exists), parity gates -> export.json
#   7. bench         batch 64 x 10 crops, compute mode: torch eager fp32, fp16 channels_last -> bench.json
#   8. bench_compiled  the same for torch.compile and CUDA graphs (fp16 channels_last) -> bench_compiled.json
# $OUT receives at most 8 files: summary.json (every step: status, seconds, skip reason; the
# preprocessing figures), the JSON files above, tests.xml, and logs.tar.gz with each step's log and
# everything else. Without CUDA the
# GPU steps are skipped with the reason, and the script still exits 0 with its files.
set -uo pipefail

OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STAGE="$WORK/out"   # everything is written here first; $OUT gets the chosen files and one archive
mkdir -p "$STAGE/logs"
# The project imports as `cnnbench`; without an install, a link named cnnbench to this folder makes it importable.
mkdir -p "$WORK/pkg" && ln -s "$PWD" "$WORK/pkg/cnnbench"
export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
export CNNBENCH_CACHE="$WORK/cache"      # the embedded data set is generated here
export PYTHONUNBUFFERED=1
export OMP_WAIT_POLICY=PASSIVE
PY=python3
TOTAL_LIMIT=${TOTAL_LIMIT:-500}
CHECKPOINT="$WORK/train/resnet26/best.pt"
printf 'step\tstatus\tseconds\treason\n' > "$STAGE/steps.tsv"

# Missing optional packages: tqdm only draws progress bars, so a no-op stand-in on PYTHONPATH lets the
# project import; matplotlib only draws training curves (train.json says it was skipped); click is
# only the CLI, which this script does not use.
SHIMS=""
if ! $PY -c "import tqdm" >/dev/null 2>&1; then
    mkdir -p "$WORK/shim/tqdm"
    cat > "$WORK/shim/tqdm/__init__.py" <<'EOF'
"""No-op stand-in for tqdm (not installed here): progress bars are not drawn."""


class tqdm:
    def __init__(self, iterable=None, *args, **kwargs):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):  # update, set_postfix, close, ...
        return lambda *args, **kwargs: None
EOF
    export PYTHONPATH="$WORK/shim:$PYTHONPATH"
    SHIMS="tqdm missing: no-op progress bars"
fi

CUDA_REASON=$($PY -c "
import torch
print('' if torch.cuda.is_available() else f'torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA GPU')
" 2>&1 | tail -n 1)

# step NAME LIMIT NEEDS_CUDA COMMAND...: stdout+stderr to logs/NAME.log, time-limited by what is left.
step() {
    local name=$1 limit=$2 needs_cuda=$3
    shift 3
    local began=$SECONDS status=0 left=$((TOTAL_LIMIT - SECONDS)) reason=""
    if [ "$needs_cuda" = cuda ] && [ -n "$CUDA_REASON" ]; then
        reason="skipped: $CUDA_REASON"
    elif [ "$left" -lt 20 ]; then
        reason="skipped: only ${left}s of the ${TOTAL_LIMIT}s budget left"
    fi
    if [ -n "$reason" ]; then
        echo "=== $name $reason"
        printf '%s\tskipped\t0\t%s\n' "$name" "${reason#skipped: }" >> "$STAGE/steps.tsv"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s)"
    timeout --kill-after=5 "$limit" "$@" > "$STAGE/logs/$name.log" 2>&1 || status=$?
    [ "$status" -eq 124 ] && reason="over its ${limit}s limit"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - began))" "$reason" >> "$STAGE/steps.tsv"
    if [ "$status" -ne 0 ]; then
        echo "--- $name FAILED (exit $status); last lines of its log:"
        tail -n 15 "$STAGE/logs/$name.log"
    fi
    return 0
}

step environment 30 any $PY - "$STAGE/env.json" "$SHIMS" <<'EOF'
import importlib, json, platform, shutil, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "shims": [s for s in sys.argv[2:] if s]}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
for name in ("torchvision", "onnx", "onnxruntime", "timm", "pytest", "tensorrt", "triton", "tqdm", "click",
             "matplotlib", "PIL"):
    try:
        info[name] = getattr(importlib.import_module(name), "__version__", "present")
    except Exception as exc:  # absent or broken: record why
        info[name] = f"missing: {type(exc).__name__}: {exc}"
try:
    import onnxruntime
    info["onnxruntime_providers"] = onnxruntime.get_available_providers()
except Exception:
    pass
if shutil.which("nvidia-smi"):
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
EOF

# The tests that need CUDA (and TensorRT / onnxruntime-gpu, which skip with their reason when absent).
# addopts is reset: the project's pytest options name pytest-benchmark, which this machine may lack.
step cuda_tests 200 cuda $PY -m pytest -o addopts="" -p no:cacheprovider -q -rs --junitxml="$STAGE/tests.xml" \
    tests/test_gpu_paths.py tests/test_gpu_preprocessing.py tests/test_runtime_cuda_check.py \
    tests/test_runtime_torch.py tests/test_runtime_backends.py tests/test_export_tensorrt.py

step preprocess 40 cuda $PY - "$STAGE/preprocess.json" <<'EOF'
"""Measured differences of GPU preprocessing from the PIL path (the tests assert their derived bounds)."""
import io, json, sys
import numpy as np, torch, torchvision.transforms.functional as TF
from PIL import Image
from cnnbench.data.spec import spec_for_crop
from cnnbench.data.transforms import resize_uint8
from cnnbench.runtime.pipeline import _torchvision_decode, nvjpeg_works, resize_on_device

spec = spec_for_crop(224)
rng = np.random.default_rng(0)
report = {"nvjpeg": nvjpeg_works("cuda"), "resize_max_abs": 0, "decode_max_abs": None, "decode_resize_max_abs": None,
          "images": 32, "bounds": {"resize": 1, "decode": 6, "decode_resize": 7}}
decode, both = [], []
for index in range(report["images"]):
    h, w = (int(v) for v in rng.integers(120, 600, 2))
    img = Image.fromarray(rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3)).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    host = resize_uint8(img, spec).int()
    device = resize_on_device(TF.pil_to_tensor(img).cuda(), spec).cpu().int()
    report["resize_max_abs"] = max(report["resize_max_abs"], int((host - device).abs().max()))
    if report["nvjpeg"]:
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=90, subsampling=0)
        reference = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        (decoded,) = _torchvision_decode([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)], "cuda")
        decode.append(int((decoded.cpu().int() - TF.pil_to_tensor(reference).int()).abs().max()))
        both.append(int((resize_on_device(decoded, spec).cpu().int() - resize_uint8(reference, spec).int()).abs().max()))
if decode:
    report["decode_max_abs"], report["decode_resize_max_abs"] = max(decode), max(both)
json.dump(report, open(sys.argv[1], "w"), indent=2)
print(json.dumps(report))
bounds = report["bounds"]
sys.exit(0 if report["resize_max_abs"] <= bounds["resize"] and (not decode or max(both) <= bounds["decode_resize"]) else 1)
EOF

step train 130 cuda $PY - "$WORK/train" "$STAGE/train.json" <<'EOF'
import json, sys
try:
    import matplotlib  # noqa: F401
    curves = "drawn"
except ImportError:
    from cnnbench import train
    import cnnbench.train.loop  # noqa: F401  (loads the submodule)
    train.loop.plot_curves = lambda *args, **kwargs: None  # the curves are a picture; the numbers are in train.json
    curves = "not drawn: matplotlib missing"
from cnnbench.train import TrainConfig, train_model
# The full embedded set (its test split has >= 128 images: two full bench batches), 224-px crops.
result = train_model(TrainConfig("resnet26", epochs=1, device="cuda", image_size=224, batch_size=64, precision="fp16",
                                 channels_last=True, out=sys.argv[1], name="resnet26", progress=False))
result["curves"] = curves
json.dump(result, open(sys.argv[2], "w"), indent=2, default=str)
print(json.dumps(result, default=str)[:2000])
EOF

# Dense ten crops on the GPU (eval, predict, bench and gradcam wrap a model already on its device),
# compared with the same checkpoint's dense ten crops on the CPU.
step dense 60 cuda $PY - "$CHECKPOINT" "$STAGE/dense.json" <<'EOF'
import json, sys
import torch
from cnnbench import runtime
from cnnbench.data.split import load_split
from cnnbench.gradcam.core import GradCAM
from cnnbench.gradcam.dense import dense_image_cams

checkpoint = sys.argv[1]
cpu = runtime.load(checkpoint, backend="torch", device="cpu")
paths = [s.path for s in load_split(cpu.record["split"]).test][:48]
reference = runtime.run_files(cpu, paths, crops="dense", batch=16, workers=2)
report = {"images": len(paths), "cpu_images_per_s": round(len(paths) / reference.seconds, 1), "rows": {}}
for precision in ("fp32", "fp16"):
    gpu = runtime.load(checkpoint, backend="torch", device="cuda", precision=precision)
    runtime.run_files(gpu, paths[:16], crops="dense", batch=16, workers=0)  # warm-up
    run = runtime.run_files(gpu, paths, crops="dense", batch=16, workers=2)
    assert run.positions == reference.positions, "not every image ran on both devices"
    report["rows"][precision] = {
        "max_abs_diff": float((run.logits - reference.logits).abs().max()),
        "top1_agreement": float((run.logits.argmax(1) == reference.logits.argmax(1)).float().mean() * 100),
        "images_per_s": round(len(paths) / run.seconds, 1), "preprocess": run.preprocess}
images = torch.randint(0, 256, (4, 3, cpu.spec.resize, cpu.spec.resize), dtype=torch.uint8)
[on_gpu] = dense_image_cams(runtime.load(checkpoint, backend="torch", device="cuda").model, images, cpu.spec,
                            [None], GradCAM)
[on_cpu] = dense_image_cams(cpu.model, images, cpu.spec, [None], GradCAM)
report["gradcam_max_abs_diff"] = float((on_gpu.maps - on_cpu.maps).abs().max())
json.dump(report, open(sys.argv[2], "w"), indent=2)
print(json.dumps(report, indent=2))
fp32 = report["rows"]["fp32"]
sys.exit(0 if fp32["max_abs_diff"] <= 1e-3 and fp32["top1_agreement"] == 100 else 1)
EOF

step export 90 cuda $PY - "$CHECKPOINT" "$WORK/export" "$STAGE/export.json" <<'EOF'
import json, sys
from cnnbench import export
result = export.export_checkpoints([sys.argv[1]], fp16=True, out=sys.argv[2], tensorrt="auto", max_batch=64,
                                   progress=True)
json.dump(result, open(sys.argv[3], "w"), indent=2, default=str)
print(export.format_parity_table(result["exports"]))
print("tensorrt:", result["tensorrt"])
sys.exit(0 if result["ok"] else 1)
EOF

# Compute mode (a resident uint8 batch of 64 images, ten crops each, through the whole predictor):
# eager rows first, then the compiled ones in their own step, so a slow compiler cannot cost the others.
step bench 90 cuda $PY - "$CHECKPOINT" "$STAGE/bench.json" <<'EOF'
import sys
from cnnbench import bench
result = bench.run_bench([sys.argv[1]], batch=64, device="cuda", mode="compute", seconds=2, eval_images=128,
                         out=sys.argv[2], progress=True)
print(bench.render_table(result))
EOF

# torch.compile (default mode) and CUDA graphs (reduce-overhead), fp16 channels_last.
step bench_compiled 170 cuda $PY - "$CHECKPOINT" "$STAGE/bench_compiled.json" <<'EOF'
import sys
from cnnbench import bench
result = bench.run_bench([sys.argv[1]], batch=64, device="cuda", mode="compute", precisions=["fp16"], compile=True,
                         seconds=2, eval_images=128, out=sys.argv[2], progress=True)
print(bench.render_table(result))
EOF

# summary.json: the steps, and the figures worth reading first.
$PY - "$STAGE" "$TOTAL_LIMIT" "$SECONDS" <<'EOF' > "$STAGE/logs/summary.log" 2>&1
import csv, json, os, sys
import xml.etree.ElementTree as ET
stage = sys.argv[1]
steps = list(csv.DictReader(open(os.path.join(stage, "steps.tsv")), delimiter="\t"))
summary = {"budget_s": int(sys.argv[2]), "elapsed_s": int(sys.argv[3]), "steps": steps}
def load(name):
    path = os.path.join(stage, name)
    return json.load(open(path)) if os.path.isfile(path) else None
tests = os.path.join(stage, "tests.xml")
if os.path.isfile(tests):
    suite = ET.parse(tests).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = suite.findall("testcase")
    summary["tests"] = {
        "total": len(cases), "failed": [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None],
        "skipped": {c.get("name"): c.find("skipped").get("message", "") for c in cases if c.find("skipped") is not None}}
summary["preprocess"] = load("preprocess.json")
summary["dense"] = load("dense.json")
train = load("train.json")
if train:
    summary["train"] = {k: train.get(k) for k in ("device", "precision", "seconds", "best_val_top1", "train_images", "test_images")}
exported = load("export.json")
if exported:
    summary["export"] = {"ok": exported["ok"], "tensorrt": exported["tensorrt"], "failures": exported["failures"],
                         "parity": {f: {k: r.get(k) for k in ("runtime", "passed", "max_abs_diff", "top1_agreement")}
                                    for m in exported["exports"] for f, r in m["parity"]["artifacts"].items()}}
summary["bench"] = [{k: r.get(k) for k in ("backend", "precision", "variant", "images_per_s", "agreement_top1", "error")}
                    for name in ("bench.json", "bench_compiled.json") for r in (load(name) or {"rows": []})["rows"]]
json.dump(summary, open(os.path.join(stage, "summary.json"), "w"), indent=2, default=str)
print(json.dumps(summary, indent=2, default=str))
EOF

# At most 8 files in $OUT: the reports, and one archive with the logs and everything else.
KEEP="summary.json env.json tests.xml train.json export.json bench.json bench_compiled.json"  # + logs.tar.gz = 8
for name in $KEEP; do
    [ -f "$STAGE/$name" ] && cp "$STAGE/$name" "$OUT/$name"
done
tar -czf "$OUT/logs.tar.gz" -C "$STAGE" .
echo "=== steps"
column -t -s $'\t' "$STAGE/steps.tsv" 2>/dev/null || cat "$STAGE/steps.tsv"
for report in bench bench_compiled; do
    if [ -f "$STAGE/logs/$report.log" ]; then
        echo "=== $report"
        grep -v '^\[bench\]' "$STAGE/logs/$report.log" | tail -n 20
    fi
done
echo "=== $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit 0
