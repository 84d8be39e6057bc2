"""Scoring bench rows: each target's held-out images, its fp32 reference logits, and a row's top-1/top-5,
agreement with that reference and parity gates on exactly the same images.

The agreement reference is always the exact ten crops in fp32 (PyTorch eager, else an fp32 ten-crop
graph), so a row of another crop mode (dense, one crop) shows how often it gives the exact ten crops'
answer. The parity gates (export.parity.GATES for the row's precision) compare a row with the fp32
reference of its OWN crop mode (for dense: PyTorch's dense ten crops with the export's centre
handling), as an export's parity does: what makes a row "verified" (runtime.selection)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from cnnbench import runtime
from cnnbench.bench.evalset import EvalSet, find_held_out, load_evalset
from cnnbench.bench.modes import eval_logits
from cnnbench.bench.targets import BenchTarget
from cnnbench.runtime.backends import backend_problem
from cnnbench.common import accuracy_report
from cnnbench.common.device import ieee_fp32
from cnnbench.data.crops import DENSE, TEN, crop_mode
from cnnbench.export.manifest import graph_crops
from cnnbench.export.parity import GATES, apply_gates, compare_logits, failed_gates


@dataclass
class Scores:
    """The eval sets (one per held-out split, shared by the targets that use it) and the reference
    logits on them, computed once per run."""

    device: str
    batch: int
    data: object                     # --data: a folder or split.json, or None (each target's own split)
    eval_limit: Optional[int]
    threads: Optional[int]
    progress: bool
    _eval_sets: dict = field(default_factory=dict)       # held-out split path (None: no split) -> EvalSet
    _eval_keys: dict = field(default_factory=dict)       # target path -> key of _eval_sets
    _source_logits: dict = field(default_factory=dict)   # (checkpoint, eval-set key) -> torch fp32 logits
    _references: dict = field(default_factory=dict)      # (reference key, eval set id) -> (logits, description)
    _mode_references: dict = field(default_factory=dict)  # (reference key, eval set id, crop mode) -> (logits, description)

    def _log(self, message: str) -> None:
        if self.progress:
            print(f"[bench] {message}", file=sys.stderr, flush=True)

    def eval_set(self, target: BenchTarget) -> EvalSet:
        if target.path not in self._eval_keys:
            held, why_none = find_held_out(target, self.data)
            key = held.path if held is not None else None
            self._eval_keys[target.path] = key
            if key not in self._eval_sets:
                self._eval_sets[key] = load_evalset(held, why_none, self.eval_limit)
        return self._eval_sets[self._eval_keys[target.path]]

    def remember_baseline(self, target: BenchTarget, evalset: EvalSet, logits: np.ndarray) -> None:
        """A checkpoint's eager fp32 row computed the reference logits already: keep them."""
        self._source_logits[(target.path, self._evalset_key(evalset))] = logits

    def score(self, target: BenchTarget, predictor, evalset: EvalSet, logits, positions, *, crops=TEN.name,
              precision: Optional[str] = None) -> dict:
        """Top-1/top-5 against the labels, top-1 agreement against the reference, and the parity gates of
        ``precision`` against the fp32 reference of crop mode ``crops``, same images."""
        scores = {"eval_images": None, "top1": None, "top5": None, "agreement_top1": None, "reference": None,
                  "gates_passed": None, "gate_failures": None, "gate_reference": None}
        if logits is None:
            scores["reference"] = scores["gate_reference"] = f"none: {evalset.description}"
            return scores
        index = np.arange(len(logits)) if positions is None else np.asarray(positions, dtype=np.int64)
        scores["eval_images"] = int(len(logits))
        labels = evalset.labels_for(predictor.classes)
        if labels is not None:
            accuracy = accuracy_report(logits, labels[index], num_classes=len(predictor.classes))
            scores["top1"], scores["top5"] = accuracy["top1"], accuracy["top5"]
        reference, description = self.reference(target, evalset)
        scores["reference"] = description
        if reference is not None:
            agree = np.argmax(logits, axis=1) == np.argmax(reference[index], axis=1)
            scores["agreement_top1"] = float(100 * agree.mean())
        scores.update(self._gates(target, evalset, logits, index, crops, precision))
        return scores

    def _gates(self, target: BenchTarget, evalset: EvalSet, logits, index, crops, precision) -> dict:
        if precision not in GATES:
            return {"gate_reference": f"none: no parity gates for {precision}"}
        reference, description = self.mode_reference(target, evalset, crops)
        if reference is None:
            return {"gate_reference": description}
        report = apply_gates(compare_logits(reference[index], np.asarray(logits)), precision)
        return {"gates_passed": report["passed"], "gate_failures": failed_gates(report) or None,
                "gate_reference": description, "max_abs_diff": report["max_abs_diff"],
                "mean_abs_diff": report["mean_abs_diff"]}

    def mode_reference(self, target: BenchTarget, evalset: EvalSet, crops) -> tuple[Optional[np.ndarray], str]:
        """The fp32 reference logits of ``target`` in crop mode ``crops`` (the exact ten crops: ``reference``)."""
        mode = crop_mode(crops).name
        if mode == TEN.name:
            return self.reference(target, evalset)
        key = (target.reference_key, id(evalset), mode)
        if key not in self._mode_references:
            self._mode_references[key] = self._compute_mode_reference(target, evalset, mode)
        return self._mode_references[key]

    def _compute_mode_reference(self, target: BenchTarget, evalset: EvalSet, mode: str):
        if target.sources and not target.missing_sources:
            centre = (target.manifest or {}).get("dense_centre")
            logits = sum(self._torch_mode_logits(source, evalset, mode, centre) for source in target.sources)
            what = "torch fp32 eager" if len(target.sources) == 1 else "sum of the members' torch fp32 logits"
            return logits, f"{what}, crops={mode}"
        why = "; ".join(target.missing_sources) or "no source checkpoints listed"
        if target.manifest is None or not any(a["format"] == "onnx" and a["precision"] == "fp32"
                                              for a in target.manifest["artifacts"]):
            return None, f"none (no fp32 ONNX graph, and {why})"
        predictor = runtime.load(target.path, backend="onnxruntime", device="cpu", precision="fp32", threads=self.threads)
        return (eval_logits(predictor, evalset.images(predictor.spec), self.batch, mode),
                f"fp32 ONNX on cpu (gated against PyTorch by its export), crops={mode} ({why})")

    def _torch_mode_logits(self, checkpoint: str, evalset: EvalSet, mode: str, centre: Optional[str]) -> np.ndarray:
        """PyTorch fp32 logits of a checkpoint in crop mode ``mode``; dense with an export's ``centre``."""
        import torch

        from cnnbench.data.spec import PreprocessSpec
        from cnnbench.models.checkpoint import load_checkpoint
        from cnnbench.models.dense import DEFAULT_CENTRE, DenseTenCropModel

        self._log(f"{mode}-crop reference logits of {checkpoint} (torch fp32 eager on {self.device})")
        if mode != DENSE.name:
            predictor = runtime.load(checkpoint, backend="torch", device=self.device, precision="fp32",
                                     threads=self.threads)
            return eval_logits(predictor, evalset.images(predictor.spec), self.batch, mode)
        network, meta = load_checkpoint(checkpoint)
        spec = PreprocessSpec.from_dict(meta["spec"])
        dense = DenseTenCropModel(network, spec, centre=centre or DEFAULT_CENTRE).eval().to(self.device)
        with torch.inference_mode(), ieee_fp32():
            return torch.cat([dense(chunk.to(self.device)).float().cpu()
                              for chunk in torch.split(evalset.images(spec), self.batch)]).numpy()

    def reference(self, target: BenchTarget, evalset: EvalSet) -> tuple[Optional[np.ndarray], str]:
        """The fp32 reference logits of ``target`` on ``evalset`` and what they are."""
        key = (target.reference_key, id(evalset))
        if key not in self._references:
            self._references[key] = self._compute_reference(target, evalset)
        return self._references[key]

    def _compute_reference(self, target: BenchTarget, evalset: EvalSet) -> tuple[Optional[np.ndarray], str]:
        if target.sources and not target.missing_sources:
            logits = sum(self._torch_fp32_logits(source, evalset) for source in target.sources)
            what = "torch fp32 eager" if len(target.sources) == 1 else "sum of the members' torch fp32 logits"
            return logits, what + ", exact ten crops"
        if target.manifest is None:
            return None, "none"
        why = "; ".join(target.missing_sources) or "no source checkpoints listed"
        if graph_crops(target.manifest) == DENSE.name:
            return None, f"none (a dense export's graph is no exact ten-crop reference, and {why})"
        if not any(a["format"] == "onnx" and a["precision"] == "fp32" for a in target.manifest["artifacts"]):
            return None, f"none (no fp32 ONNX graph, and {why})"
        device = self.device if backend_problem("onnxruntime", self.device) is None else "cpu"
        self._log(f"{target.name}: reference from its fp32 ONNX graph on {device} ({why})")
        predictor = runtime.load(target.path, backend="onnxruntime", device=device, precision="fp32",
                                 threads=self.threads)
        return (eval_logits(predictor, evalset.images(predictor.spec), self.batch),
                f"fp32 ONNX on {device}, exact ten crops ({why})")

    def _torch_fp32_logits(self, checkpoint: str, evalset: EvalSet) -> np.ndarray:
        key = (checkpoint, self._evalset_key(evalset))
        if key not in self._source_logits:
            self._log(f"reference logits of {checkpoint} (torch fp32 eager on {self.device})")
            predictor = runtime.load(checkpoint, backend="torch", device=self.device, precision="fp32",
                                     threads=self.threads)
            self._source_logits[key] = eval_logits(predictor, evalset.images(predictor.spec), self.batch)
        return self._source_logits[key]

    def _evalset_key(self, evalset: EvalSet) -> Optional[str]:
        return next(k for k, v in self._eval_sets.items() if v is evalset)

    def describe_eval_sets(self) -> list[dict]:
        return [{"source": key, "description": s.description, "images": len(s.paths) if s.has_files else 0,
                 "test_images": s.total, "skipped": [{"path": p, "error": e} for p, e in s.skipped]}
                for key, s in self._eval_sets.items()]

    def eval_note(self) -> str:
        notes = [f"{len(s.paths)} of {s.total} images of the {s.description}" if s.has_files else s.description
                 for s in self._eval_sets.values()]
        return "; ".join(notes) or "n/a"
