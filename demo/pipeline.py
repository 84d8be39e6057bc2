"""`run_demo`: train → evaluate (1 and 10 crops) → export (+ensemble) → validate → bench → Grad-CAM → report.

It calls the same public functions as the individual commands; nothing here re-implements a stage.
A second run in the same folder reuses finished training runs and resumes interrupted ones.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import atomic_write_json, read_json


@dataclass(frozen=True)
class DemoSettings:
    archs: tuple[str, ...] = ("resnet26", "xception_medium")   # the seed's ensemble pair
    epochs: int = 5
    width_mult: float = 1.0
    batch_size: int = 32
    bench_batch: int = 8
    bench_seconds: float = 4.0
    eval_images: int = 320
    gallery_limit: int = 8


FULL = DemoSettings()
# --quick: the small embedded set and narrow networks, so the whole pipeline runs in the test suite.
QUICK = DemoSettings(epochs=2, width_mult=0.25, batch_size=16, bench_batch=4, bench_seconds=0.5, eval_images=48,
                     gallery_limit=4)


def run_demo(out: str = "runs/demo", quick: bool = False, progress: bool = True) -> dict:
    from data import synth
    from demo.report import write_report

    settings = QUICK if quick else FULL
    out = Path(out)
    started = time.perf_counter()
    steps: list[dict] = []
    data_root = _step(steps, "data", "python cli.py data synth --out DIR" + ("" if not quick else " (quick set)"),
                      lambda: synth.default_data_root(quick=quick, progress=progress), progress)
    trained = {arch: _step(steps, f"train {arch}", _train_command(arch, settings, quick, out),
                           lambda arch=arch: _train(arch, settings, quick, out, progress), progress)
               for arch in settings.archs}
    checkpoints = [t["best"] for t in trained.values()]
    accuracy = {arch: _step(steps, f"eval {arch}", f"python cli.py eval {t['best']} --crops 1|10",
                            lambda t=t: _evaluate_both(t["best"], progress), progress)
                for arch, t in trained.items()}
    exported = _step(steps, "export", f"python cli.py export {' '.join(checkpoints)} --fp16 --cam-output "
                     f"--out {out / 'export'}",
                     lambda: _export(checkpoints, out, progress), progress)
    ensemble_dir = next((m["export_dir"] for m in exported["exports"] if m["kind"] == "ensemble"), None)
    if ensemble_dir:
        accuracy["ensemble"] = _step(steps, "eval ensemble", f"python cli.py eval {ensemble_dir} --crops 1|10",
                                     lambda: _evaluate_both(ensemble_dir, progress), progress)
    validations = {m["name"]: _step(steps, f"validate {m['name']}", f"python cli.py validate {m['export_dir']}",
                                    lambda m=m: _validate(m["export_dir"], settings, progress), progress)
                   for m in exported["exports"]}
    bench = _step(steps, "bench", f"python cli.py bench --batch {settings.bench_batch} --seconds "
                  f"{settings.bench_seconds} --train-dir {out / 'train'} --export-dir {out / 'export'}",
                  lambda: _bench(out, settings, progress), progress)
    galleries = {arch: _step(steps, f"gradcam {arch}", f"python cli.py gradcam --errors {t['best']}",
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


def _train_command(arch: str, s: DemoSettings, quick: bool, out: Path) -> str:
    return (f"python cli.py train {arch} --epochs {s.epochs} --batch-size {s.batch_size} --width-mult {s.width_mult}"
            f"{' --quick-data' if quick else ''} --out {out / 'train'}")


def _train(arch: str, s: DemoSettings, quick: bool, out: Path, progress: bool) -> dict:
    from train import TrainConfig, train_model

    run_dir = out / "train" / arch
    finished = run_dir / "train.json"
    if finished.exists() and read_json(finished).get("epochs") == s.epochs:
        return read_json(finished)
    config = TrainConfig(arch=arch, quick_data=quick, epochs=s.epochs, batch_size=s.batch_size,
                         width_mult=s.width_mult, out=str(out / "train"), progress=progress,
                         resume=(run_dir / "last.pt").exists())
    return train_model(config)


def _evaluate_both(model_path: str, progress: bool) -> dict:
    import runtime

    return {f"{crops}_crop{'s' if crops > 1 else ''}": runtime.evaluate(model_path, crops=crops, progress=progress)
            for crops in (1, 10)}


def _export(checkpoints: list[str], out: Path, progress: bool) -> dict:
    from export import export_checkpoints

    return export_checkpoints(checkpoints, fp16=True, cam_output=True, out=str(out / "export"), progress=progress)


def _validate(export_dir: str, s: DemoSettings, progress: bool) -> dict:
    from gradcam import validate_export

    return validate_export(export_dir, limit=s.eval_images, progress=progress)


def _bench(out: Path, s: DemoSettings, progress: bool) -> dict:
    from bench import run_bench

    return run_bench(batch=s.bench_batch, seconds=s.bench_seconds, train_dir=str(out / "train"),
                     export_dir=str(out / "export"), out=str(out / "bench" / "bench.json"),
                     eval_images=s.eval_images, progress=progress)


def _galleries(checkpoint: str, out: Path, s: DemoSettings, progress: bool) -> dict:
    from gradcam import errors_gallery

    return errors_gallery(checkpoint, limit=s.gallery_limit, crops=10, out=str(out), progress=progress)
