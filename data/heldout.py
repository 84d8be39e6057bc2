"""The held-out images: one function decides, for every stage, which split a model is measured on.

eval, export's parity check (and int8 calibration, from the same split's train part), validate,
bench and the Grad-CAM galleries all call ``held_out``, so ``--data`` means the same thing in every
command (DATA_HELP): a data folder, whose seed-0 stratified split's test part is held out. Without
``--data``, the split saved with the model's training run (a split.json) is used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from cnnbench.common.errors import InputError, MissingFileError
from cnnbench.data.folder import Sample, scan_folder
from cnnbench.data.split import Split, load_split, make_split, spread_evenly

DATA_HELP = ("Data folder: the test part of its seed-0 split is held out (int8 calibration uses its train part). "
             "Default: the split saved with the model's training run.")
FOLDER_SPLIT_SEED = 0
FROM_RUN = "test split"                      # the split.json saved with the training run
FROM_FOLDER = "seed-0 split of a folder"     # --data


class SplitNotRecorded(InputError):
    """No --data and the model's run recorded no split."""


class SplitFileMissing(MissingFileError):
    """No --data and the split file the model's run recorded is gone."""


@dataclass(frozen=True)
class HeldOut:
    """A split and where it came from (``source`` FROM_RUN or FROM_FOLDER, ``path`` the file or folder)."""

    split: Split
    source: str
    path: str

    def origin(self) -> dict:
        return {"source": self.source, "path": self.path}

    def describe(self) -> str:
        return f"test split {self.path}" if self.source == FROM_RUN else f"seed-0 test split of {self.path}"

    def samples(self, part: str = "test", limit: int | None = None) -> list[Sample]:
        """At most ``limit`` samples of the ``part`` ("test" or "train"), spread evenly over its classes."""
        samples = self.split.test if part == "test" else self.split.train
        if not samples:
            raise InputError(f"the {part} part of the {self.describe()} is empty")
        return spread_evenly(samples, limit)


def held_out(data=None, split_files=(), *, classes: list[str] | None = None, owner: str = "the model") -> HeldOut:
    """``data`` (a folder: its seed-0 split; a split.json: that split) if given, else the first of
    ``split_files`` (what the model's run recorded, see models.checkpoint.recorded_split_files) that exists.

    ``classes``: the model's class names; a split with others is an InputError (scores would be
    meaningless). No split recorded is SplitNotRecorded (an InputError), a recorded file that is gone
    SplitFileMissing (a MissingFileError); both name --data.
    """
    if data is not None:
        path = os.path.abspath(os.fspath(data))
        if os.path.isfile(path):
            chosen = HeldOut(load_split(path), FROM_RUN, path)
        else:
            chosen = HeldOut(make_split(scan_folder(path), seed=FOLDER_SPLIT_SEED), FROM_FOLDER, path)
    else:
        recorded = [os.fspath(f) for f in split_files if f]
        existing = [f for f in recorded if os.path.isfile(f)]
        if not existing and recorded:
            raise SplitFileMissing(f"split file {recorded[0]} is missing (recorded with {owner}); "
                                   "pass data=<folder> (--data) to use the seed-0 split of a data folder")
        if not existing:
            raise SplitNotRecorded(f"no split recorded with {owner}; pass data=<folder> (--data)")
        chosen = HeldOut(load_split(existing[0]), FROM_RUN, os.path.abspath(existing[0]))
    if classes is not None and chosen.split.classes != list(classes):
        raise InputError(f"the model's {len(classes)} classes differ from the split's {len(chosen.split.classes)} "
                         f"({chosen.path}); use the data it was trained on")
    return chosen
