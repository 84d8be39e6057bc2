"""Where a command given no paths finds its models: the newest finished trained runs (or exports).

Training writes `runs/train/<name>/best.pt`, the demo `runs/demo/train/<name>/best.pt`; exports go
to `runs/export/<name>/manifest.json` or `runs/demo/export/...`. Each `runs/<kind>` or
`runs/*/<kind>` folder holds run groups; the commands that follow `python cli.py demo` (or `train`)
work on what was just made:

- a run counts once it is finished: a trained run once its `train.json` (written after the last
  epoch) is there, an export once its `manifest.json` is; the time that file was written is the
  run's end time. `best.pt` alone says nothing (it is rewritten only when validation improves).
- the folder holding the run that finished last wins, and from it the runs of that run's group:
  the finished runs made from the same data, classes and preprocessing (what an ensemble of them
  needs); others in the folder are older, unrelated work.
- unfinished runs (still training, or stopped) and broken ones (a dangling `best.pt` link, an
  unreadable `train.json` or `manifest.json`) are skipped, each named with the reason on stderr and
  in `FoundRuns.skipped`.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass, field

from cnnbench.common.errors import MissingFileError

RUNS_ROOT = "runs"
_CHECKPOINT = "best.pt"
_TRAIN_RECORD = "train.json"
_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FoundRuns:
    kind: str          # "train" or "export"
    folder: str        # e.g. runs/demo/train
    paths: list[str]   # the group's <folder>/*/best.pt (train) or <folder>/*/ (export), sorted by run name
    newest: str        # the one of `paths` that finished last
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (run folder, why it was not used)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "folder": self.folder, "paths": self.paths, "newest": self.newest,
                "skipped": [{"run": run, "reason": reason} for run, reason in self.skipped]}


@dataclass(frozen=True)
class _Finished:
    path: str      # what a command loads: the checkpoint, or the export folder
    ended: float   # when its end-of-run file was written
    group: tuple   # runs with equal groups can stand together (an ensemble, a side-by-side bench)


def newest_runs(kind: str, root: str = RUNS_ROOT, announce: bool = True) -> FoundRuns:
    """The group of the most recently finished run of that kind under `<root>/<kind>` or `<root>/*/<kind>`.

    ``kind`` "train" finds checkpoints, "export" export folders. ``announce`` says on stderr which
    folder and runs were picked and which runs were skipped, and why. MissingFileError when no run
    of the kind has finished (naming the skipped ones).
    """
    if kind not in ("train", "export"):
        raise ValueError(f"kind must be 'train' or 'export', got {kind!r}")
    folders = [os.path.join(root, kind)] + sorted(glob.glob(os.path.join(root, "*", kind)))
    finished: dict[str, list[_Finished]] = {}
    skipped: list[tuple[str, str]] = []
    for folder in folders:
        for run_dir in _run_dirs(folder, kind):
            run, reason = _examine(run_dir, kind)
            if run is None:
                skipped.append((run_dir, reason))
            else:
                finished.setdefault(folder, []).append(run)
    if not finished:
        what = "trained model" if kind == "train" else "export"
        hint = "`python cli.py train ARCH` or `python cli.py demo`" if kind == "train" else "`python cli.py export`"
        marker = _CHECKPOINT if kind == "train" else _MANIFEST
        found = "".join(f"; skipped {run}: {reason}" for run, reason in skipped)
        raise MissingFileError(f"no finished {what} found ({os.path.join(root, kind, '*', marker)} or "
                               f"{os.path.join(root, '*', kind, '*', marker)}){found}; run {hint} first, or name one")
    folder = max(finished, key=lambda f: max(run.ended for run in finished[f]))
    newest = max(finished[folder], key=lambda run: run.ended)
    group = [run for run in finished[folder] if run.group == newest.group]
    skipped += [(_run_dir(run.path, kind), f"other data, classes or preprocessing than the newest run "
                                          f"{_run_dir(newest.path, kind)}")
                for run in finished[folder] if run.group != newest.group]
    runs = FoundRuns(kind, folder, sorted(run.path for run in group), newest.path, sorted(skipped))
    if announce:
        names = ", ".join(os.path.basename(_run_dir(path, kind)) for path in runs.paths)
        print(f"using the newest {'trained runs' if kind == 'train' else 'exports'} in {folder}: {names}",
              file=sys.stderr, flush=True)
        for run, reason in runs.skipped:
            print(f"warning: skipped {run}: {reason}", file=sys.stderr, flush=True)
    return runs


def _run_dirs(folder: str, kind: str) -> list[str]:
    """The sub-folders of ``folder`` that hold (or held) a run of the kind: any of its files, links included."""
    names = (_CHECKPOINT, _TRAIN_RECORD) if kind == "train" else (_MANIFEST,)
    candidates = sorted(glob.glob(os.path.join(folder, "*", "")))
    return [os.path.normpath(d) for d in candidates if any(os.path.lexists(os.path.join(d, n)) for n in names)]


def _run_dir(path: str, kind: str) -> str:
    return os.path.dirname(path) if kind == "train" else path


def _examine(run_dir: str, kind: str) -> tuple[_Finished | None, str]:
    """(the finished run, "") or (None, why it cannot be used)."""
    if kind == "train":
        checkpoint = os.path.join(run_dir, _CHECKPOINT)
        if not os.path.exists(checkpoint):
            if os.path.islink(checkpoint):
                return None, f"{_CHECKPOINT} is a dangling link (to {os.readlink(checkpoint)})"
            return None, f"no {_CHECKPOINT}"
        record_path, path = os.path.join(run_dir, _TRAIN_RECORD), checkpoint
    else:
        record_path, path = os.path.join(run_dir, _MANIFEST), run_dir
    name = os.path.basename(record_path)
    if kind == "train" and not os.path.lexists(record_path):
        return None, f"unfinished: no {name} (still training, or stopped before its last epoch)"
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        ended = os.stat(record_path).st_mtime
    except (OSError, ValueError) as e:
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return None, f"unreadable {name} ({detail})"
    if not isinstance(record, dict):
        return None, f"unreadable {name} (not a JSON object)"
    if kind == "train":
        group = (record.get("data"), record.get("classes"), json.dumps(record.get("spec"), sort_keys=True))
    else:
        group = (json.dumps(record.get("classes")), json.dumps(record.get("spec"), sort_keys=True))
    return _Finished(path, ended, group), ""
