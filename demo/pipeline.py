"""`run_demo`: train → export (+ensemble) → evaluate (1 and 10 crops) → validate → bench → Grad-CAM → report.

It calls the same public functions as the individual commands; nothing here re-implements a stage.
A second run in the same folder reuses finished training runs and resumes interrupted ones, when they
were made with the same settings (else it stops, naming what differs); `--quick` has its own folder.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from cnnbench.common import atomic_write_json
from cnnbench.common.errors import InputError, UserError


@dataclass(frozen=True)
class DemoSettings:
    archs: tuple[str, ...] = ("resnet26", "xception_medium")   # the seed's ensemble pair
    # Epochs per architecture; a missing one: the default recipe's (train/recipe.py), as `cli.py train`.
    epochs: tuple[tuple[str, int], ...] = ()
    width_mult: Optional[float] = None
    batch_size: Optional[int] = None
    # per export: the ten-crop Grad-CAM gate and its panels (the parity gates see 200 images whatever this is)
    validate_images: int = 16
    bench_batch: int = 8
    bench_seconds: float = 1.5
    # per bench row: agreement with the fp32 reference (each eager reference pass is the costly part)
    bench_eval_images: int = 16
    gallery_images: int = 160      # test images scanned for the galleries and the pointing game
    gallery_limit: int = 8
    # Train by the clock (train/budget.py) instead of by epochs: the wall-clock training budget, in minutes.
    minutes: Optional[float] = None
    # Its split: the ResNet trains for this share of the minutes, then its core passes to the Xception, which
    # trains for all of them (1.0: both train the whole budget side by side).
    resnet_share: float = 1.0

    def __post_init__(self):
        if not 0 < self.resnet_share <= 1:
            raise InputError(f"the ResNet's share of the training minutes must be in (0, 1], got {self.resnet_share}")
        if self.minutes is not None and self.epochs:
            raise InputError("a demo trains by epochs or by minutes, not both")

    def epochs_of(self, arch: str) -> Optional[int]:
        return dict(self.epochs).get(arch)

    def minutes_of(self, arch: str) -> Optional[float]:
        """This architecture's training budget (None: it trains by epochs)."""
        if self.minutes is None:
            return None
        return round(self.minutes * (self.resnet_share if arch.startswith("resnet") else 1.0), 4)

    def budget(self) -> Optional[dict]:
        """The training budget and its split, as the report states it (None: trained by epochs)."""
        if self.minutes is None:
            return None
        return {"minutes": self.minutes, "resnet_share": self.resnet_share,
                "minutes_per_model": {arch: self.minutes_of(arch) for arch in self.archs}}


# Most of the demo is training, side by side on two cores, by the clock: on a faster machine (bf16 units,
# AMX, a GPU) the same minutes train more images, so the report gets better by itself. The rest of the demo
# (evaluate, export, validate, bench, Grad-CAM) took 5.5 minutes on a quiet 2-core AMD EPYC (AVX2 only), so
# 8.5 minutes of training keep the whole demo within 15 (docs/RECIPES.md rows 29, 35: 14 min 54 s, 14 min 11 s).
DEMO_TRAIN_MINUTES = 8.5
# ResNet26's share of those minutes (then its core passes to Xception-medium, which trains all of them):
# both the whole budget, the split with the best ensemble at 8.5 and at 17 minutes (docs/RECIPES.md rows 28-29,
# 32-34; held-back ResNets put the ensemble above both members, but lower).
DEMO_RESNET_SHARE = 1.0
# The accuracy table always uses the whole test split.
FULL = DemoSettings(minutes=DEMO_TRAIN_MINUTES, resnet_share=DEMO_RESNET_SHARE)
# --quick: the small embedded set and narrow networks, so the whole pipeline runs in the test suite.
# Three epochs, not two: with the Xceptions' lower peak LR two left both models at chance, where
# logits tie to 1e-3 and the ensemble's fp16 graph flipped one of 40 top-1 answers (gate 99 %).
QUICK = DemoSettings(epochs=(("resnet26", 3), ("xception_medium", 3)), width_mult=0.25, batch_size=16, validate_images=24, bench_batch=4, bench_seconds=0.5,
                     bench_eval_images=24, gallery_images=48, gallery_limit=4)


def default_out(quick: bool) -> str:
    """The demo's folder: --quick has its own, so `demo --quick` then `demo` never meet in one."""
    return "runs/demo-quick" if quick else "runs/demo"


def run_demo(out: Optional[str] = None, quick: bool = False, progress: bool = True,
             minutes: Optional[float] = None, resnet_share: Optional[float] = None) -> dict:
    """``minutes``: the wall-clock training budget (default: DEMO_TRAIN_MINUTES; --quick trains by epochs
    unless it is given); ``resnet_share``: ResNet26's share of it (default DEMO_RESNET_SHARE)."""
    from cnnbench.data import synth
    from cnnbench.demo.report import write_report

    settings = QUICK if quick else FULL
    if minutes is not None:
        if not minutes > 0:
            raise InputError(f"--minutes must be above 0, got {minutes}")
        settings = replace(settings, minutes=minutes, epochs=())
    if resnet_share is not None:
        settings = replace(settings, resnet_share=resnet_share)
    out = Path(out or default_out(quick))
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
                             f"--limit {settings.gallery_limit} --images {settings.gallery_images} "
                             f"--methods {GALLERY_METHODS} --layers {GALLERY_LAYERS}",
                             lambda t=t, arch=arch: _galleries(t["best"], out / "gradcam" / arch, settings, progress),
                             progress)
                 for arch, t in trained.items()}
    result = {
        "ok": exported["ok"] and all(v.get("ok") for v in validations.values()) and bench["ok"],
        "quick": quick, "out": str(out), "data": data_root, "training_budget": settings.budget(),
        "training": trained, "accuracy": accuracy, "lessons": seed_lessons(accuracy),
        "export": exported, "validation": validations, "bench": bench, "gradcam": galleries, "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
    }
    result["report"] = write_report(result, out)
    atomic_write_json(out / "demo.json", result)
    return result


def seed_lessons(accuracy: dict) -> dict:
    """Whether this run shows the seed report's two lessons, in top-1 points on the test split: ten crops
    against one per model, and the ensemble's ten-crop top-1 against its best member's (above both members
    when the margin is positive)."""
    members = {name: acc for name, acc in accuracy.items() if name != "ensemble"}
    lessons = {"ten_crop_gain": {name: round(acc["10_crops"]["top1"] - acc["1_crop"]["top1"], 2)
                                 for name, acc in members.items()}}
    if "ensemble" in accuracy and members:
        best = max(members, key=lambda name: members[name]["10_crops"]["top1"])
        margin = accuracy["ensemble"]["10_crops"]["top1"] - members[best]["10_crops"]["top1"]
        lessons.update(best_member=best, ensemble_margin=round(margin, 2), ensemble_above_members=margin > 0)
    return lessons


def _step(steps: list, name: str, command: str, work, progress: bool):
    if progress:
        print(f"[demo] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    value = work()
    steps.append({"step": name, "command": command, "seconds": round(time.perf_counter() - t0, 1)})
    return value


def _train_all(steps: list, s: DemoSettings, quick: bool, out: Path, progress: bool) -> dict[str, dict]:
    """Every architecture's run: side by side on a CPU, one process per run with an equal share of the
    process's cores (common.device.side_by_side_threads), else one after the other."""
    from cnnbench.common.device import side_by_side_threads

    threads = side_by_side_threads(len(s.archs))
    if not threads:
        return {arch: _step(steps, f"train {arch}", _train_command(arch, s, quick, out),
                            lambda arch=arch: _train(arch, s, quick, out, progress), progress)
                for arch in s.archs}
    command = " & ".join(_train_command(arch, s, quick, out, threads) for arch in s.archs) + "; wait"
    return _step(steps, f"train {' and '.join(s.archs)} side by side", command,
                 lambda: _train_side_by_side(s, quick, out, progress), progress)


class TrainerFailed(UserError):
    """A side-by-side trainer that raised or died; the message names its architecture (a trainer's own
    traceback, when it raised, is printed above it)."""


def _train_side_by_side(s: DemoSettings, quick: bool, out: Path, progress: bool) -> dict[str, dict]:
    """One child process per architecture; each result is taken as it arrives, so a trainer that fails is
    reported at once, naming its architecture, and its siblings are stopped (their last.pt is resumable).
    The children die with this process (``_die_with_parent``)."""
    from multiprocessing.connection import wait

    # spawn, not fork: a forked child would inherit this process's OpenMP thread pool in an unusable state
    context = multiprocessing.get_context("spawn")
    running = context.Value("i", len(s.archs))
    children, results = {}, {}
    try:
        for row, arch in enumerate(s.archs):
            receiver, sender = context.Pipe(duplex=False)
            child = context.Process(target=_train_beside, name=f"train {arch}", daemon=True,
                                    args=(sender, os.getpid(), running, arch, s, quick, out, progress, row))
            child.start()
            sender.close()  # the child holds the only write end: its death closes the pipe
            children[receiver] = (arch, child)
        while len(results) < len(children):
            for receiver in wait([r for r, (arch, _) in children.items() if arch not in results]):
                arch, child = children[receiver]
                results[arch] = _trainer_result(receiver, arch, child)
        return {arch: results[arch] for arch in s.archs}
    finally:
        for receiver, (arch, child) in children.items():
            if arch not in results:  # a sibling failed (or this process was interrupted): stop the rest
                child.terminate()
            child.join()
            receiver.close()


def _trainer_result(receiver, arch: str, child) -> dict:
    """The summary a trainer sent, or its failure raised here as TrainerFailed naming the architecture."""
    try:
        outcome, payload = receiver.recv()
    except EOFError:  # the pipe closed without a message: the child died (killed, out of memory, ...)
        child.join()
        code = child.exitcode
        how = f"killed by signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        raise TrainerFailed(f"the {arch} trainer died ({how}) before it finished") from None
    if outcome == "ok":
        return payload
    if not payload["user_error"]:  # a bug: its traceback matters
        print(payload["traceback"], file=sys.stderr, flush=True)
    raise TrainerFailed(f"training {arch} failed: {payload['message']}")


_running = None  # in a process of _train_side_by_side: the shared count of runs still training


def _train_beside(sender, parent_pid: int, running, arch: str, s: DemoSettings, quick: bool, out: Path,
                  progress: bool, row: int) -> None:
    """One side-by-side run, in its own process: its share of the cores, growing as the others finish
    (the last one ends on all of them), and its images made in its own thread (no loader workers to
    compete for cores). Sends ("ok", summary) or ("error", what went wrong) to the parent."""
    global _running
    from cnnbench.common.device import cores_per_job

    _die_with_parent(parent_pid)
    _running = running
    try:
        summary = _train(arch, s, quick, out, progress, threads=lambda: cores_per_job(_running.value), workers=0,
                         progress_row=row)
        sender.send(("ok", summary))
    except Exception as exc:  # reported by the parent, naming this run
        sender.send(("error", {"message": f"{type(exc).__name__}: {exc}" if not isinstance(exc, UserError) else str(exc),
                               "user_error": isinstance(exc, UserError), "traceback": traceback.format_exc()}))
    finally:
        with running.get_lock():
            running.value -= 1
        sender.close()


# Linux prctl(2) option: the signal this process gets when the thread that forked it exits.
_PR_SET_PDEATHSIG = 1
_ORPHAN_POLL_SECONDS = 0.5


def _die_with_parent(parent_pid: int) -> None:
    """Make this child process end when ``parent_pid`` does, SIGKILL included (a CI cancel, the OOM killer):
    a trainer that outlived the demo would keep writing its run folder beside a rerun.

    Linux: the kernel sends SIGKILL when the parent exits (PR_SET_PDEATHSIG). Everywhere, as the fallback:
    a thread that exits the process once it is re-parented (its parent id changes).
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # no prctl in this libc: the watchdog below still ends the process
    if os.getppid() != parent_pid:  # the parent died before the request above was in place
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_ORPHAN_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="exit with the demo", daemon=True).start()


def _train_command(arch: str, s: DemoSettings, quick: bool, out: Path, threads: int = 0) -> str:
    options = [f"--{name} {value}" for name, value in (("epochs", s.epochs_of(arch)), ("minutes", s.minutes_of(arch)),
                                                       ("batch-size", s.batch_size),
                                                       ("width-mult", s.width_mult), ("workers", 0 if threads else None))
               if value is not None]
    return " ".join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), f"python cli.py train {arch}", *options,
                     *(["--quick-data"] if quick else []), f"--out {_shown(str(out / 'train'))}"])


def _train(arch: str, s: DemoSettings, quick: bool, out: Path, progress: bool, threads=None, workers=None,
           progress_row: int = 0) -> dict:
    """One run: a finished one is reused, an interrupted one resumed, either only when it was made with
    these settings (train.loop.run_identity and the precision); otherwise a RunMismatchError that says
    what differs and what to do. (``threads``: see train.train_model.)"""
    from cnnbench.train import TrainConfig, train_model
    from cnnbench.train.loop import RunMismatchError

    run_dir = out / "train" / arch
    config = TrainConfig(arch=arch, quick_data=quick, epochs=s.epochs_of(arch), minutes=s.minutes_of(arch),
                         batch_size=s.batch_size,
                         width_mult=s.width_mult, out=str(out / "train"), progress=progress,
                         resume=(run_dir / "last.pt").exists(), workers=workers, progress_row=progress_row)
    try:
        return train_model(config, threads=threads)
    except RunMismatchError as exc:
        raise RunMismatchError(exc.run_dir, exc.differences, f"this demo{' --quick' if quick else ''} cannot go on "
                               f"with it: pass another --out, or delete {out}") from None


def _shown(path: str) -> str:
    """``path`` as a command line would give it: relative to the working folder when inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _accuracy_name(manifest: dict) -> str:
    return "ensemble" if manifest["kind"] == "ensemble" else manifest["name"]


def _evaluate_both(model_path: str, progress: bool) -> dict:
    from cnnbench import runtime
    return {f"{crops}_crop{'s' if crops > 1 else ''}": runtime.evaluate(model_path, crops=crops, progress=progress)
            for crops in (1, 10)}


def _export(checkpoints: list[str], out: Path, progress: bool) -> dict:
    from cnnbench.export import export_checkpoints

    return export_checkpoints(checkpoints, fp16=True, cam_output=True, out=str(out / "export"), progress=progress)


def _validate(export_dir: str, s: DemoSettings, progress: bool) -> dict:
    from cnnbench.gradcam import validate_export

    return validate_export(export_dir, limit=s.validate_images, progress=progress)


def _bench(out: Path, s: DemoSettings, progress: bool) -> dict:
    from cnnbench.bench import run_bench

    return run_bench(batch=s.bench_batch, seconds=s.bench_seconds, train_dir=str(out / "train"),
                     precisions=_bench_precisions(),
                     export_dir=str(out / "export"), out=str(out / "bench" / "bench.json"),
                     eval_images=s.bench_eval_images, progress=progress)


def _bench_precisions() -> list[str]:
    """fp32, and the half precisions only where they are native: on a GPU fp16 (the exported graphs'), bf16
    there and on CPUs with bf16 units. On a CPU the fp16 graphs ran at fp32's speed (ONNX Runtime and OpenVINO
    compute them in fp32) and emulated bf16 at 1.5x fp32's time, six rows and ~70 s of a 2-core demo that
    show nothing; `validate` still gates every exported graph and `cli.py bench` measures them all."""
    from cnnbench.common.device import cpu_has_fast_bf16, resolve_device

    on_gpu = resolve_device("auto") != "cpu"
    return ["fp32"] + (["fp16"] if on_gpu else []) + (["bf16"] if on_gpu or cpu_has_fast_bf16() else [])


# The report's pointing table: the gradient methods (they share one backward per layer, and the layers
# share one forward pass of one and ten crops per scanned image) at the last stage and the one before,
# and at the model's default layer where that is another (a ResNet's last-2: gradcam.core.DEFAULT_CAMS).
# Not EigenCAM: its host SVD per crop map took 48 of 76 s of the step on ResNet26 (16 images, measured).
GALLERY_METHODS, GALLERY_LAYERS = "gradcam,hirescam,gradcam++,xgradcam,layercam", "last,last-1"


def _galleries(checkpoint: str, out: Path, s: DemoSettings, progress: bool) -> dict:
    from cnnbench.gradcam import errors_gallery

    return errors_gallery(checkpoint, limit=s.gallery_limit, crops=10, out=str(out), images=s.gallery_images,
                          progress=progress, methods=GALLERY_METHODS, layers=GALLERY_LAYERS)
