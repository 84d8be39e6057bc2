"""Parity of an exported graph with its PyTorch fp32 reference, and the gates that define "correct".

Every gate lives here, in one table shape {precision: {metric: (op, limit)}} read by ``apply_gates``:
GATES for the logits: fp32: top-1 agreement 100 %, max |dlogit| <= 1e-3 (absolute). fp16: top-1
agreement >= 99 %, top-5 set agreement >= 99 % (over images whose reference top-5 boundary is not a
near-tie: TOP_K_MARGIN), mean |dlogit| <= 1e-2; bf16 (the fp32 graph computed in
bf16 by OpenVINO, or PyTorch's bf16 rows) is judged like fp16. int8 (static quantisation,
export/int8.py): top-1 agreement >= 98 %.
CAM_GATES for the exported CAM against the reference Grad-CAM (gradcam.exported): mean Pearson
correlation >= 0.99 (fp32), 0.98 (fp16), 0.95 (int8: 8-bit activations move the feature maps; a
trained ResNet26 measured 0.998, a random tiny one 0.983).
They are never loosened by a caller; a failure names the gate, the measured value and the limit
that would have been needed to pass.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from cnnbench.common.device import ieee_fp32
from cnnbench.export.errors import ParityError

GATES = {
    "fp32": {"top1_agreement": (">=", 1.0), "max_abs_diff": ("<=", 1e-3)},
    "fp16": {"top1_agreement": (">=", 0.99), "top5_agreement": (">=", 0.99), "mean_abs_diff": ("<=", 1e-2)},
    "int8": {"top1_agreement": (">=", 0.98)},
}
GATES["bf16"] = GATES["fp16"]  # a half precision with fewer mantissa bits, judged by the same gates
CAM_GATES = {
    "fp32": {"mean_correlation": (">=", 0.99)},
    "fp16": {"mean_correlation": (">=", 0.98)},
    "int8": {"mean_correlation": (">=", 0.95)},
}
TOP_K = 5
# A top-k set boundary the reference itself places within this many logits is a near-tie: rounding decides
# which side a class lands on, so those images do not count towards top-k set agreement (a model near chance
# has many). A flip across a wider margin needs a logit error of at least half of it, far above fp16/bf16
# rounding (max |dlogit| ~ 7e-3 measured), so a broken graph still fails.
TOP_K_MARGIN = 0.05
DEFAULT_BATCH = 16


def reference_logits(reference: nn.Module, images: Tensor, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """Logits of the PyTorch reference in fp32 on CPU, eval mode, TF32 off; [N, K] float64."""
    reference = reference.eval()
    first = next(reference.parameters())
    if first.dtype != torch.float32 or first.device.type != "cpu":
        raise ValueError(f"the parity reference must be an fp32 CPU model, got {first.dtype} on {first.device}")
    chunks = []
    with ieee_fp32(), torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunks.append(reference(images[start:start + batch_size]).double().numpy())
    return np.concatenate(chunks)


def exported_logits(run_exported: Callable[[np.ndarray], np.ndarray], images: Tensor,
                    batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """The exported graph's logits over ``images`` in batches of ``batch_size``; [N, K] float64.

    Batches differ from the traced batch size (and the last one is usually shorter), so this
    also exercises the graph's dynamic batch axis.
    """
    arrays = images.numpy()
    chunks = [np.asarray(run_exported(arrays[start:start + batch_size]), dtype=np.float64)
              for start in range(0, len(arrays), batch_size)]
    return np.concatenate(chunks)


def compare_logits(reference: np.ndarray, exported: np.ndarray) -> dict:
    """Agreement and error metrics of exported logits against reference logits (both [N, K])."""
    if reference.shape != exported.shape:
        raise ValueError(f"logit shapes differ: reference {reference.shape}, exported {exported.shape}")
    n, classes = reference.shape
    k = min(TOP_K, classes)
    diff = np.abs(reference - exported)
    top_ref = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    top_exp = np.argsort(-exported, axis=1, kind="stable")[:, :k]
    same_set = np.array([set(a) == set(b) for a, b in zip(top_ref.tolist(), top_exp.tolist())], dtype=bool)
    ranked = -np.sort(-reference, axis=1)
    decisive = ranked[:, k - 1] - ranked[:, k] >= TOP_K_MARGIN if classes > k else np.ones(n, dtype=bool)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(exported, axis=1)
    cosine = np.sum(reference * exported, axis=1) / np.where(norms == 0, 1.0, norms)
    finite = bool(np.isfinite(exported).all())  # rankings of NaN logits mean nothing
    return {
        "n_images": int(n),
        "top1_agreement": float(np.mean(top_ref[:, 0] == top_exp[:, 0])) if finite else None,
        # over the images whose reference top-k boundary is decisive (all agree vacuously when none is)
        "top5_agreement": (float(np.mean(same_set[decisive])) if decisive.any() else 1.0) if finite else None,
        "top5_images": int(decisive.sum()),
        "top_k": k,
        "max_abs_diff": _finite(diff.max()),
        "mean_abs_diff": _finite(diff.mean()),
        "cosine": _finite(cosine.mean()),
    }


def top1_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """Fraction of rows whose highest logit is the same class in both (ties: the lower class index)."""
    return float(np.mean(np.argmax(reference, axis=1) == np.argmax(other, axis=1)))


def _finite(value) -> float | None:
    """A JSON-safe float; NaN/inf (an exported graph that overflowed) become None, which fails every gate."""
    value = float(value)
    return value if math.isfinite(value) else None


def apply_gates(metrics: dict, precision: str, table: dict = GATES) -> dict:
    """``metrics`` plus ``gates`` {name: {value, limit, op, passed}} and ``passed``, by ``table``
    (GATES for logits, CAM_GATES for CAM)."""
    if precision not in table:
        raise ValueError(f"no gates for precision {precision!r}; expected one of {sorted(table)}")
    gates = {}
    for name, (op, limit) in table[precision].items():
        value = metrics[name]
        passed = value is not None and (value >= limit if op == ">=" else value <= limit)
        gates[name] = {"value": value, "op": op, "limit": limit, "passed": passed}
    return {**metrics, "precision": precision, "gates": gates, "passed": all(g["passed"] for g in gates.values())}


def run_parity(reference: nn.Module, run_exported: Callable[[np.ndarray], np.ndarray], images: Tensor,
               precision: str, *, batch_size: int = DEFAULT_BATCH) -> dict:
    """Compare ``run_exported`` (numpy batch in, logits out) with the fp32 ``reference`` on ``images``.

    ``images`` is what the exported graph takes (normalised crops, or uint8 resized images for the
    in-graph ten-crop graph) and what ``reference`` takes too. Returns the report with its gates;
    it does not raise on a failed gate (see ``check_parity``).
    """
    if len(images) == 0:
        raise ValueError("parity needs at least one image")
    return compare_with_reference(reference_logits(reference, images, batch_size), run_exported, images, precision,
                                  batch_size=batch_size)


def compare_with_reference(expected: np.ndarray, run_exported: Callable[[np.ndarray], np.ndarray], images: Tensor,
                           precision: str, *, batch_size: int = DEFAULT_BATCH) -> dict:
    """run_parity with the reference's logits on ``images`` already computed (one reference pass
    serves every artifact of an export)."""
    got = exported_logits(run_exported, images, batch_size)
    return apply_gates(compare_logits(expected, got), precision)


def failed_gates(report: dict) -> list[str]:
    """One sentence per failed gate: the gate, the measured value, the limit, the limit that would pass."""
    lines = []
    for name, gate in report["gates"].items():
        if gate["passed"]:
            continue
        value = gate["value"]
        if value is None:
            lines.append(f"{name} is not finite (NaN/inf in the exported logits; limit {gate['op']} {gate['limit']:g})")
            continue
        lines.append(f"{name} = {_fmt(name, value)} (limit {gate['op']} {_fmt(name, gate['limit'])}; "
                     f"it would pass with a limit {gate['op']} {_fmt(name, value)})")
    return lines


def check_parity(report: dict, label: str) -> None:
    """Raise ParityError naming every failed gate of ``report``; ``label`` says which artifact."""
    if report["passed"]:
        return
    raise ParityError(f"{label}: {report['precision']} parity failed: " + "; ".join(failed_gates(report)), report)


def _fmt(name: str, value: float) -> str:
    if name.endswith("agreement"):
        return f"{100 * value:.2f} %"
    return f"{value:.3g}"


_COLUMNS = ("export", "artifact", "runtime", "images", "top-1", "top-5", "max|Δ|", "mean|Δ|", "cosine", "result",
            "vs exact 10 (top-1)")


def format_parity_table(exports: list[dict]) -> str:
    """A text table with one row per (export, artifact) from the manifests' ``parity`` sections."""
    rows = []
    for manifest in exports:
        for artifact, report in manifest["parity"]["artifacts"].items():
            failed = [name for name, gate in report["gates"].items() if not gate["passed"]]
            rows.append((
                manifest["name"], artifact, report.get("runtime", "?"), str(report["n_images"]),
                _pct(report["top1_agreement"]), _pct(report["top5_agreement"]),
                _sci(report["max_abs_diff"]), _sci(report["mean_abs_diff"]),
                "n/a" if report["cosine"] is None else f"{report['cosine']:.6f}",
                "PASS" if report["passed"] else "FAIL: " + ", ".join(failed),
                # a dense export's agreement with the exact ten crops: reported beside the gates, not gated
                _pct(report["exact_top1_agreement"]) if "exact_top1_agreement" in report else "",
            ))
    if not rows:
        return "(no parity results)"
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _sci(value) -> str:
    return "n/a" if value is None else f"{value:.2e}"
