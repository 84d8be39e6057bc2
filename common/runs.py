"""Where a command given no paths finds its models: the newest trained runs (or exports).

Training writes `runs/train/<name>/best.pt`, the demo `runs/demo/train/<name>/best.pt`; exports go
to `runs/export/<name>/manifest.json` or `runs/demo/export/...`. The newest folder of the kind wins,
so the commands that follow `python cli.py demo` (or `train`) work on what was just made.
"""
from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass

from common.errors import MissingFileError

RUNS_ROOT = "runs"
_MARKER = {"train": "best.pt", "export": "manifest.json"}


@dataclass(frozen=True)
class FoundRuns:
    kind: str          # "train" or "export"
    folder: str        # e.g. runs/demo/train
    paths: list[str]   # every <folder>/*/best.pt (train) or <folder>/*/ (export), sorted by run name

    @property
    def newest(self) -> str:
        return max(self.paths, key=_mtime)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "folder": self.folder, "paths": self.paths}


def newest_runs(kind: str, root: str = RUNS_ROOT, announce: bool = True) -> FoundRuns:
    """The `<root>/<kind>` or `<root>/*/<kind>` folder holding the most recently written run of that kind.

    ``kind`` "train" finds checkpoints (`*/best.pt`), "export" export folders (`*/manifest.json`).
    ``announce`` says on stderr which folder was picked. MissingFileError when there is none.
    """
    marker = _MARKER[kind]
    folders = [os.path.join(root, kind)] + sorted(glob.glob(os.path.join(root, "*", kind)))
    found = {folder: sorted(glob.glob(os.path.join(folder, "*", marker))) for folder in folders}
    found = {folder: files for folder, files in found.items() if files}
    if not found:
        what = "trained model" if kind == "train" else "export"
        hint = "`python cli.py train ARCH` or `python cli.py demo`" if kind == "train" else "`python cli.py export`"
        raise MissingFileError(f"no {what} found ({os.path.join(root, kind, '*', marker)} or "
                                f"{os.path.join(root, '*', kind, '*', marker)}); run {hint} first, or name one")
    folder = max(found, key=lambda f: max(map(_mtime, found[f])))
    files = found[folder]
    paths = files if kind == "train" else [os.path.dirname(f) for f in files]
    runs = FoundRuns(kind, folder, paths)
    if announce:
        names = ", ".join(os.path.basename(os.path.dirname(f)) for f in files)
        print(f"using the newest {'trained runs' if kind == 'train' else 'exports'} in {folder}: {names}",
              file=sys.stderr, flush=True)
    return runs


def _mtime(path: str) -> float:
    return os.path.getmtime(path)
