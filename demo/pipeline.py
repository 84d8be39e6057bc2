"""`run_demo`: train → export (+ensemble) → evaluate (1 and 10 crops) → validate → bench → Grad-CAM → report.

It calls the same public functions as the individual commands; nothing here re-implements a stage.
A second run in the same folder reuses finished training runs and resumes interrupted ones.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from common import atomic_write_json, read_json


@dataclass(frozen=True)
class DemoSettings:
    archs: tuple[str, ...] = ("resnet26", "xception_medium")   # the seed's ensemble pair
    # Epochs per architecture; a missing one: the default recipe's (train/recipe.py), as `cli.py train`.
    epochs: tuple[tuple[str, int], ...] = ()
    width_mult: Optional[float] = None
    batch_size: Optional[int] = None
    validate_images: int = 32      # per export: Grad-CAM agreement and disagreement panels
    bench_batch: int = 8
    bench_seconds: float = 1.5
    bench_eval_images: int = 32    # per bench row: accuracy and agreement
    gallery_images: int = 160      # test images scanned for the galleries and the pointing game
    gallery_limit: int = 8


    def epochs_of(self, arch: str) -> Optional[int]:
        return dict(self.epochs).get(arch)


# Most of the budget is training, side by side on two cores: ResNet26 the recipe's five epochs,
# Xception-medium four, so it finishes first and ResNet26 ends its last epoch on both cores. The
# accuracy table always uses the whole test split.
FULL = DemoSettings(epochs=(("xception_medium", 4),))
# --quick: the small embedded set and narrow networks, so the whole pipeline runs in the test suite.
# Three epochs, not two: with the Xceptions' lower peak LR two left both models at chance, where
# logits tie to 1e-3 and the ensemble's fp16 graph flipped one of 40 top-1 answers (gate 99 %).
QUICK = DemoSettings(epochs=(("resnet26", 3), ("xception_medium", 3)), width_mult=0.25, batch_size=16, validate_images=24, bench_batch=4, bench_seconds=0.5,
                     bench_eval_images=24, gallery_images=48, gallery_limit=4)


def run_demo(out: str = "runs/demo", quick: bool = False, progress: bool = True) -> dict:
    from data import synth
    from demo.report import write_report

    settings = QUICK if quick else FULL
    out = Path(out)
    started = time.perf_counter()
    steps: list[dict] = []
    data_root = _step(steps, "data", "python cli.py data synth --out DIR" + ("" if not quick else " (quick set)"),
                      lambda: synth.default_data_root(quick=quick, progress=progress), progress)
    trained = _train_all(steps, settings, quick, out, progress)
    checkpoints = [t["best"] for t in trained.values()]
    exported = _step(steps, "export", f"python cli.py export {' '.join(checkpoints)} --fp16 --cam-output "
                     f"--out {out / 'export'}",
                     lambda: _export(checkpoints, out, progress), progress)
    # Accuracy through each verified fp32 graph: the parity table shows it is the PyTorch model to
    # ~1e-6 in the logits, and ONNX Runtime runs it 2-4x faster here than PyTorch eager.
    accuracy = {_accuracy_name(m): _step(steps, f"eval {m['name']}",
                                         f"python cli.py eval {_shown(m['export_dir'])} --crops 1|10",
                                         lambda m=m: _evaluate_both(m["export_dir"], progress), progress)
                for m in exported["exports"]}
    validations = {m["name"]: _step(steps, f"validate {m['name']}",
                                    f"python cli.py validate {_shown(m['export_dir'])} --limit {settings.validate_images}",
                                    lambda m=m: _validate(m["export_dir"], settings, progress), progress)
                   for m in exported["exports"]}
    bench = _step(steps, "bench", f"python cli.py bench --batch {settings.bench_batch} "
                  f"{' '.join('--precision ' + p for p in _bench_precisions())} --seconds "
                  f"{settings.bench_seconds} --eval-images {settings.bench_eval_images} --train-dir {out / 'train'} "
                  f"--export-dir {out / 'export'}",
                  lambda: _bench(out, settings, progress), progress)
    galleries = {arch: _step(steps, f"gradcam {arch}", f"python cli.py gradcam --errors {t['best']} "
                             f"--limit {settings.gallery_limit} --images {settings.gallery_images}",
                             lambda t=t, arch=arch: _galleries(t["best"], out / "gradcam" / arch, settings, progress),
                             progress)
                 for arch, t in trained.items()}
    result = {
        "ok": exported["ok"] and all(v.get("ok") for v in validations.values()) and bench["ok"],
        "quick": quick, "out": str(out), "data": data_root, "training": trained, "accuracy": accuracy,
        "export": exported, "validation": validations, "bench": bench, "gradcam": galleries, "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
    }
    result["report"] = write_report(result, out)
    atomic_write_json(out / "demo.json", result)
    return result


def _step(steps: list, name: str, command: str, work, progress: bool):
    if progress:
        print(f"[demo] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    value = work()
    steps.append({"step": name, "command": command, "seconds": round(time.perf_counter() - t0, 1)})
    return value


def _train_all(steps: list, s: DemoSettings, quick: bool, out: Path, progress: bool) -> dict[str, dict]:
    """Every architecture's run: side by side on a CPU, one process per run with an equal share of the
    cores (common.device.side_by_side_threads), else one after the other."""
    from common.device import side_by_side_threads

    threads = side_by_side_threads(len(s.archs))
    if not threads:
        return {arch: _step(steps, f"train {arch}", _train_command(arch, s, quick, out),
                            lambda arch=arch: _train(arch, s, quick, out, progress), progress)
                for arch in s.archs}
    command = " & ".join(_train_command(arch, s, quick, out, threads) for arch in s.archs) + "; wait"
    return _step(steps, f"train {' and '.join(s.archs)} side by side", command,
                 lambda: _train_side_by_side(s, quick, out, progress), progress)


def _train_side_by_side(s: DemoSettings, quick: bool, out: Path, progress: bool) -> dict[str, dict]:
    # spawn, not fork: a forked child would inherit this process's OpenMP thread pool in an unusable state
    context = multiprocessing.get_context("spawn")
    running = context.Value("i", len(s.archs))
    with ProcessPoolExecutor(len(s.archs), mp_context=context, initializer=_join_side_by_side,
                             initargs=(running,)) as pool:
        runs = {arch: pool.submit(_train_beside, arch, s, quick, out, progress, row) for row, arch in enumerate(s.archs)}
        return {arch: run.result() for arch, run in runs.items()}


_running = None  # in a process of _train_side_by_side: the shared count of runs still training


def _join_side_by_side(running) -> None:
    global _running
    _running = running


def _train_beside(arch: str, s: DemoSettings, quick: bool, out: Path, progress: bool, row: int) -> dict:
    """One of the side-by-side runs: its share of the cores, growing as the others finish (the last one
    ends on all of them), and its images made in its own thread (no loader workers to compete for cores)."""
    from common.device import cores_per_job

    try:
        return _train(arch, s, quick, out, progress, threads=lambda: cores_per_job(_running.value), workers=0,
                      progress_row=row)
    finally:
        with _running.get_lock():
            _running.value -= 1


def _train_command(arch: str, s: DemoSettings, quick: bool, out: Path, threads: int = 0) -> str:
    options = [f"--{name} {value}" for name, value in (("epochs", s.epochs_of(arch)), ("batch-size", s.batch_size),
                                                       ("width-mult", s.width_mult), ("workers", 0 if threads else None))
               if value is not None]
    return " ".join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), f"python cli.py train {arch}", *options,
                     *(["--quick-data"] if quick else []), f"--out {_shown(str(out / 'train'))}"])


def _train(arch: str, s: DemoSettings, quick: bool, out: Path, progress: bool, threads=None, workers=None,
           progress_row: int = 0) -> dict:
    """One run, reused when finished and resumed when interrupted (``threads``: see train.train_model)."""
    from train import TrainConfig, train_model
    from train.recipe import recipe_for

    run_dir = out / "train" / arch
    finished = run_dir / "train.json"
    epochs = s.epochs_of(arch) or recipe_for(arch).epochs
    if finished.exists() and read_json(finished).get("epochs") == epochs:
        return read_json(finished)
    config = TrainConfig(arch=arch, quick_data=quick, epochs=epochs, batch_size=s.batch_size,
                         width_mult=s.width_mult, out=str(out / "train"), progress=progress,
                         resume=(run_dir / "last.pt").exists(), workers=workers, progress_row=progress_row)
    return train_model(config, threads=threads)


def _shown(path: str) -> str:
    """``path`` as a command line would give it: relative to the working folder when inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _accuracy_name(manifest: dict) -> str:
    return "ensemble" if manifest["kind"] == "ensemble" else manifest["name"]


def _evaluate_both(model_path: str, progress: bool) -> dict:
    import runtime

    return {f"{crops}_crop{'s' if crops > 1 else ''}": runtime.evaluate(model_path, crops=crops, progress=progress)
            for crops in (1, 10)}


def _export(checkpoints: list[str], out: Path, progress: bool) -> dict:
    from export import export_checkpoints

    return export_checkpoints(checkpoints, fp16=True, cam_output=True, out=str(out / "export"), progress=progress)


def _validate(export_dir: str, s: DemoSettings, progress: bool) -> dict:
    from gradcam import validate_export

    return validate_export(export_dir, limit=s.validate_images, progress=progress)


def _bench(out: Path, s: DemoSettings, progress: bool) -> dict:
    from bench import run_bench

    return run_bench(batch=s.bench_batch, seconds=s.bench_seconds, train_dir=str(out / "train"),
                     precisions=_bench_precisions(),
                     export_dir=str(out / "export"), out=str(out / "bench" / "bench.json"),
                     eval_images=s.bench_eval_images, progress=progress)


def _bench_precisions() -> list[str]:
    """The exported precisions, and PyTorch's bf16 only where it is native: emulated (no bf16 units) it
    only shows a slowdown at 1.5x fp32's time, ~20 s of the demo (`cli.py bench` still measures it)."""
    from common.device import cpu_has_fast_bf16, resolve_device

    native_bf16 = resolve_device("auto") != "cpu" or cpu_has_fast_bf16()
    return ["fp32", "fp16"] + (["bf16"] if native_bf16 else [])


def _galleries(checkpoint: str, out: Path, s: DemoSettings, progress: bool) -> dict:
    from gradcam import errors_gallery

    return errors_gallery(checkpoint, limit=s.gallery_limit, crops=10, out=str(out), images=s.gallery_images,
                          progress=progress)
