"""`runtime.predict_files`: top-k classes for image files and folders, every file accounted for.

Results are written as they come, batch by batch, to a CSV or JSON Lines file: a killed run keeps
every row it wrote, and the same command run again resumes it (ResultsFile). Memory does
not grow with the number of files: only the file list is held, never the logits or results of
earlier batches (unless the caller asks for them: no output file and no ``on_result``).
"""
from __future__ import annotations

import csv as csv_format
import io
import json
import os
import time
from typing import Callable

import torch

from cnnbench.common import topk_indices
from cnnbench.common.errors import InputError
from cnnbench.common.runs import newest_runs
from cnnbench.data.folder import is_image_name
from cnnbench.runtime.loader import load
from cnnbench.runtime.pipeline import BatchResult, FileStream


def predict_files(model_path, paths, *, backend: str = "auto", device: str = "auto", precision: str = "fp32",
                  batch: int = 64, crops: int = 10, topk: int = 5, csv=None, jsonl=None, workers: int | None = None,
                  progress: bool = True, on_result: Callable[[dict], None] | None = None) -> dict:
    """Predict files and folders (searched recursively for image files).

    Each result is {"path", "top": [{"class", "prob"}]} (softmax of the crop-averaged logits, best
    first) or {"path", "error"}, handed out in path order (unlistable folders last) as each batch
    finishes: written to ``csv`` or ``jsonl`` (one row per file, flushed per batch) and passed to
    ``on_result``. An existing output file is resumed: files it already has a row for are skipped.
    With neither an output file nor ``on_result``, the summary's "results" holds them all.
    "ok" is False when any file failed (this run or the resumed one). model_path None: the newest
    finished run's best.pt (common.runs).
    """
    if topk < 1:
        raise InputError(f"topk must be at least 1, got {topk}")
    model_path = newest_checkpoint() if model_path is None else os.fspath(model_path)
    sink = PredictionSink(csv, jsonl, on_result)
    files, unlistable = expand_paths(paths)
    predictor = load(model_path, backend=backend, device=device, precision=precision)
    topk = min(topk, len(predictor.classes))
    start = time.perf_counter()
    with sink.open(topk):
        todo = [path for path in files if not sink.already_written(path)]
        for part in FileStream(predictor, todo, crops=crops, batch=batch, workers=workers, progress=progress):
            sink.hand_out(batch_results(part, todo, predictor.classes, topk))
        sink.hand_out_unlistable(unlistable)
    return {"model": model_path, "predictor": predictor.name, "backend": predictor.backend, "device": predictor.device,
            "crops": crops, "topk": topk, "images": len(files) + len(unlistable), **sink.summary(),
            "seconds": time.perf_counter() - start}


def batch_results(part: BatchResult, paths: list[str], classes: list[str], topk: int) -> list[dict]:
    """One batch's results in path order: the top-k classes of each image, or why it failed."""
    probs = torch.softmax(part.logits.double(), dim=1).numpy()
    best = topk_indices(part.logits.numpy(), topk) if len(part.positions) else []
    results = {position: {"path": paths[position],
                          "top": [{"class": classes[c], "prob": float(probs[row, c])} for c in best[row]]}
               for row, position in enumerate(part.positions)}
    results.update({position: {"path": paths[position], "error": reason} for position, reason in part.failures})
    return [results[position] for position in sorted(results)]


def expand_paths(paths) -> tuple[list[str], list[tuple[str, str]]]:
    """(files, unlistable folders with the reason).

    Files are kept as given (each gets a result, even a missing one); folders contribute the image
    files under them, sorted.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    unlistable: list[tuple[str, str]] = []

    def record(error: OSError) -> None:
        unlistable.append((error.filename, f"cannot list folder ({error.strerror})"))

    for path in map(os.fspath, paths):
        if not os.path.isdir(path):
            files.append(path)
            continue
        for folder, dirs, names in os.walk(path, onerror=record):
            dirs.sort()
            files.extend(os.path.join(folder, n) for n in sorted(names) if is_image_name(n))
    if not files and not unlistable:
        raise InputError(f"no image files found in {', '.join(map(os.fspath, paths)) or 'the given paths'}")
    return files, unlistable


def newest_checkpoint() -> str:
    """The best.pt of the newest finished trained run (runs/train or e.g. runs/demo/train)."""
    return newest_runs("train").newest


class PredictionSink:
    """Where prediction results go, the same for local, served (serve.client) and Ray (cluster) predict.

    An output file (CSV or JSON Lines, resumed when it holds rows: ResultsFile), the caller's
    ``on_result``, and, with neither, a list kept for the summary; it counts successes, failures and
    rows found already written. ``with sink.open(topk):`` once the top-k is known closes (and syncs)
    the file however the run ends.
    """

    def __init__(self, csv=None, jsonl=None, on_result: Callable[[dict], None] | None = None):
        if csv is not None and jsonl is not None:
            raise InputError("write the predictions as CSV or as JSON Lines, not both")
        self.output_path, self.output_format = (csv, "csv") if csv is not None else (jsonl, "jsonl")
        self.on_result = on_result
        self.output: ResultsFile | None = None
        self.kept: list[dict] | None = [] if self.output_path is None and on_result is None else None
        self.counts = {"succeeded": 0, "failed": 0, "resumed": 0}

    def open(self, topk: int) -> "PredictionSink":
        """Open (or resume) the output file for rows of ``topk`` classes: ``with sink.open(topk): ...``."""
        if self.output_path is not None:
            self.output = ResultsFile(self.output_path, self.output_format, topk)
        return self

    def already_written(self, path: str) -> bool:
        """Whether a resumed file already holds this input's row (then counted, not redone)."""
        ok = self.output.take(path) if self.output is not None else None
        if ok is None:
            return False
        self.counts["resumed"] += 1
        self.counts["succeeded" if ok else "failed"] += 1
        return True

    def hand_out(self, results: list[dict]) -> None:
        """Count, write (one write for the lot), then pass on these results, in order."""
        for result in results:
            self.counts["failed" if "error" in result else "succeeded"] += 1
        if self.output is not None:
            self.output.append(results)
        for result in results:
            if self.on_result is not None:
                self.on_result(result)
            if self.kept is not None:
                self.kept.append(result)

    def hand_out_unlistable(self, unlistable: list[tuple[str, str]]) -> None:
        """Folders that could not be listed (expand_paths) are rows with their reason, last."""
        self.hand_out([{"path": folder, "error": reason} for folder, reason in unlistable
                       if not self.already_written(folder)])

    def summary(self) -> dict:
        """The counts, "ok" (no file failed, in this run or the resumed one), and the results or the file."""
        out = {**self.counts, "ok": self.counts["failed"] == 0}
        if self.kept is not None:
            out["results"] = self.kept
        if self.output_path is not None:
            out[self.output_format] = os.fspath(self.output_path)
        return out

    def __enter__(self) -> "PredictionSink":
        return self

    def __exit__(self, *exc) -> None:
        if self.output is not None:
            self.output.close()


# A killed process loses nothing it flushed (the kernel holds it); fsync bounds what a power cut or an
# OS crash can take to the last few seconds, without a disk flush per batch.
FSYNC_SECONDS = 5.0
OUTPUT_FORMATS = ("csv", "jsonl")


class ResultsFile:
    """Prediction rows appended to a CSV or JSON Lines file, whole lines at a time, one per input.

    Opening a file that holds rows resumes it: a torn last line (a crash in the middle of a write)
    is cut off, and the rows before it are remembered by path so that ``take`` says which inputs
    are done. A file of other columns (another topk) or that is not a predictions file is refused.
    CSV columns: path, status (ok | error), class_1, prob_1, ... class_k, prob_k, error. JSON Lines:
    each result as predict_files gives it. Probabilities are written to 6 decimals in both.
    """

    def __init__(self, path, output_format: str, topk: int):
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
        self.path = os.fspath(path)
        self.format = output_format
        self.topk = topk
        self.header = (["path", "status"] + [f"{name}_{i}" for i in range(1, topk + 1) for name in ("class", "prob")]
                       + ["error"])
        self._done: dict[str, list[bool]] = {}  # path -> ok? of each row already in the file
        try:
            if os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
                self._cut_torn_tail()
                self._read_rows()
            parent = os.path.dirname(self.path)
            if parent:
                os.makedirs(parent, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8", newline="")
        except OSError as e:
            raise InputError(f"cannot write predictions to {self.path} ({e.strerror or e})") from None
        if self.format == "csv" and self._file.tell() == 0:
            self._write(self._csv_line(self.header), sync=True)
        self._synced = time.monotonic()

    def take(self, path: str) -> bool | None:
        """None when the file holds no (more) rows for ``path``; else whether that row is a success, used up."""
        statuses = self._done.get(path)
        if not statuses:
            return None
        ok = statuses.pop()
        if not statuses:
            del self._done[path]
        return ok

    def append(self, results: list[dict]) -> None:
        """Write these results' rows (one write, then flushed; fsynced every FSYNC_SECONDS)."""
        if results:
            text = "".join(self._csv_row(r) if self.format == "csv" else self._json_row(r) for r in results)
            self._write(text, sync=time.monotonic() - self._synced >= FSYNC_SECONDS)

    def close(self) -> None:
        if not self._file.closed:
            self._write("", sync=True)
            self._file.close()

    def _write(self, text: str, sync: bool) -> None:
        self._file.write(text)
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def _csv_row(self, result: dict) -> str:
        if "error" in result:
            return self._csv_line([result["path"], "error"] + [""] * (2 * self.topk) + [result["error"]])
        cells = [v for t in result["top"] for v in (t["class"], f"{t['prob']:.6f}")]
        return self._csv_line([result["path"], "ok"] + cells + [""] * (2 * self.topk - len(cells)) + [""])

    @staticmethod
    def _csv_line(cells: list[str]) -> str:
        out = io.StringIO()
        csv_format.writer(out, lineterminator="\n").writerow(cells)
        return out.getvalue()

    @staticmethod
    def _json_row(result: dict) -> str:
        if "top" in result:
            result = {**result, "top": [{**t, "prob": round(t["prob"], 6)} for t in result["top"]]}
        return json.dumps(result, ensure_ascii=False) + "\n"

    def _cut_torn_tail(self) -> None:
        """Truncate the file after its last newline: a row without one was cut short by a crash."""
        with open(self.path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            position = end
            while position > 0:
                step = min(1 << 16, position)
                f.seek(position - step)
                chunk = f.read(step)
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    position = position - step + newline + 1
                    break
                position -= step
            if position != end:
                f.truncate(position)

    def _read_rows(self) -> None:
        refuse = f"{self.path} is not a predictions file of this kind"
        with open(self.path, encoding="utf-8", newline="") as f:
            if self.format == "csv":
                reader = csv_format.reader(f)
                header = next(reader, None)
                if header is not None and header != self.header:
                    raise InputError(f"{refuse} (its columns {','.join(header)[:200]}; expected "
                                     f"{','.join(self.header)}, topk {self.topk}): name another file, or delete it "
                                     "to start over")
                for number, row in enumerate(reader, start=2):
                    if len(row) != len(self.header) or row[1] not in ("ok", "error"):
                        raise InputError(f"{refuse}: line {number} is not a prediction row; name another file")
                    self._done.setdefault(row[0], []).append(row[1] == "ok")
            else:
                for number, line in enumerate(f, start=1):
                    try:
                        row = json.loads(line)
                    except ValueError:
                        row = None
                    usable = isinstance(row, dict) and isinstance(row.get("path"), str) and (
                        "error" in row or (isinstance(row.get("top"), list) and len(row["top"]) == self.topk))
                    if not usable:
                        raise InputError(f"{refuse} (topk {self.topk}): line {number} is not a prediction row "
                                         "with that many classes; name another file, or delete it to start over")
                    self._done.setdefault(row["path"], []).append("error" not in row)
