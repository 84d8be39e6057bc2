"""Bench outputs: the terminal table, the versioned JSON, the CSV, the PNG chart, and --compare."""
from __future__ import annotations

import csv
import io
import math
import os

from cnnbench.common import atomic_write, atomic_write_json, read_json
from cnnbench.common.errors import InputError, MissingFileError

SCHEMA_VERSION = 1

# What identifies "the same measurement" across two runs (for --compare).
ROW_KEY = ("target", "backend", "precision", "variant", "device", "mode", "batch", "crops")

CSV_COLUMNS = (
    "target", "kind", "backend", "precision", "variant", "device", "mode", "batch", "crops", "crops_per_image",
    "images_per_s", "crops_per_s", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "stddev_ms", "cv", "unstable",
    "iterations", "warmup", "host_peak_rss_mib", "cuda_max_allocated_mib", "flops_per_image",
    "achieved_flops_per_s", "peak_flops_per_s", "peak_precision", "peak_fraction", "eval_images", "top1", "top5",
    "agreement_top1", "reference", "gates_passed", "max_abs_diff", "mean_abs_diff", "gate_reference", "speedup", "stage_decode_ms", "stage_resize_ms", "stage_model_ms",
    "stage_input_wait_ms", "preprocess", "note", "source", "error",
)


def row_key(row: dict) -> tuple:
    # Reports from before crop modes were measured hold exact ten-crop rows only.
    return tuple(row.get(k, "10" if k == "crops" else None) for k in ROW_KEY)


# --- terminal table --------------------------------------------------------------------------------
_TABLE = (
    # header, width, row -> text
    ("target", 18, lambda r: str(r["target"])),
    ("backend", 11, lambda r: r["backend"]),
    ("prec", 4, lambda r: r["precision"]),
    ("variant", 22, lambda r: r["variant"]),
    ("dev", 4, lambda r: r["device"]),
    ("mode", 4, lambda r: "e2e" if r["mode"] == "end-to-end" else "comp"),
    ("img/s", 8, lambda r: _num(r.get("images_per_s"), 1)),
    ("crops/s", 9, lambda r: _num(r.get("crops_per_s"), 1)),
    ("p50 ms", 8, lambda r: _num(r.get("p50_ms"), 1)),
    ("p90 ms", 8, lambda r: _num(r.get("p90_ms"), 1)),
    ("p99 ms", 8, lambda r: _num(r.get("p99_ms"), 1)),
    ("CV", 7, lambda r: _pct(r.get("cv"), 1) + ("!" if r.get("unstable") else "")),
    ("%peak", 6, lambda r: _pct(r.get("peak_fraction"), 0)),
    ("RSS MiB", 7, lambda r: _num(r.get("host_peak_rss_mib"), 0)),
    ("top1", 5, lambda r: _num(r.get("top1"), 1)),
    ("agree10", 7, lambda r: _num(r.get("agreement_top1"), 1)),
    ("gates", 5, lambda r: {True: "pass", False: "FAIL"}.get(r.get("gates_passed"), "-")),
    ("speedup", 7, lambda r: "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"),
)


def render_table(result: dict) -> str:
    """Fixed-width table of the rows, then warnings, failures, stage breakdowns and comparisons."""
    lines = [_title(result)]
    header = " ".join(h.rjust(w) if i >= 6 else h.ljust(w) for i, (h, w, _) in enumerate(_TABLE))
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        if row.get("error"):
            continue
        cells = []
        for i, (_, width, cell) in enumerate(_TABLE):
            text = _fit(cell(row), width)
            cells.append(text.rjust(width) if i >= 6 else text.ljust(width))
        lines.append(" ".join(cells))
    lines += _stage_lines(result["rows"])
    lines += _peak_lines(result.get("peaks", {}))
    lines += _choice_lines(result.get("backend_choices") or {})
    failed = [r for r in result["rows"] if r.get("error")]
    if failed:
        lines.append("failed:")
        lines += [f"  {r['target']} {r['backend']} {r['precision']} {r['variant']} ({r['mode']}): {r['error']}"
                  for r in failed]
    for note in result.get("skipped", []):
        lines.append(f"skipped: {note}")
    for warning in result.get("warnings", []):
        lines.append(f"warning: {warning}")
    if result.get("comparison"):
        lines.append(render_comparison(result["comparison"]))
    outputs = [result.get(k) for k in ("json", "csv", "png") if result.get(k)]
    if outputs:
        lines.append("wrote " + ", ".join(outputs))
    return "\n".join(lines)


def _title(result: dict) -> str:
    m = result["machine"]
    device = m["gpu"] or m["cpu"]
    budget = f"{result['iters']} iters" if result.get("iters") else f"{result.get('seconds')} s"
    return (f"bench: batch {result['batch']} images x 10 crops on {result['device']} ({device}, "
            f"{m['cpu_cores']} cores, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
            f"openvino {m.get('openvino')}); "
            f"{budget} per row after {result['warmup']} warm-up; "
            f"accuracy on {result.get('eval_images_note', 'n/a')}; agree10: top-1 agreement with the exact "
            "ten-crop fp32 reference (every row, dense and one-crop rows too); gates: the row's precision's "
            "parity gates against the fp32 reference of its own crop mode")


def _stage_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r.get("error") or r["mode"] != "end-to-end" or r.get("stage_model_ms") is None:
            continue
        lines.append(
            f"  stages {r['target']} {r['backend']} {r['precision']} {r['variant']}: per batch "
            f"model {r['stage_model_ms']:.1f} ms, waiting for input {r['stage_input_wait_ms']:.1f} ms "
            f"(decode {r['stage_decode_ms']:.1f} + resize {r['stage_resize_ms']:.1f} ms of CPU work per batch, "
            f"spread over the loader's workers; preprocess={r['preprocess']})")
    return (["end-to-end stage breakdown:"] + lines) if lines else []


def _peak_lines(peaks: dict) -> list[str]:
    parts = []
    for precision, peak in peaks.items():
        if peak.get("flops"):
            unit = "TOP/s" if precision == "int8" else "TFLOP/s"
            parts.append(f"{precision} {peak['flops'] / 1e12:.3f} {unit} ({peak['kernel']})")
        else:
            parts.append(f"{precision} {peak.get('note', 'n/a')}")
    return ["measured matmul peak: " + "; ".join(parts)] if parts else []


def _choice_lines(choices: dict) -> list[str]:
    """What `--backend auto` now picks on this machine for each export measured (runtime.selection)."""
    lines = []
    for target, record in choices.items():
        picks = ", ".join(f"{p} {b}" for p, b in record.items() if p != "record") or "none verified"
        lines.append(f"  {target}: {picks} ({record['record']})")
    return (["--backend auto on this machine (fastest verified per precision):"] + lines) if lines else []


def _num(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _pct(value, digits: int) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


# --- files -----------------------------------------------------------------------------------------
def write_json(path: str, result: dict) -> str:
    atomic_write_json(path, result)
    return path


def write_csv(path: str, rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in CSV_COLUMNS})
    atomic_write(path, buffer.getvalue())
    return path


def write_chart(path: str, result: dict) -> str:
    """Horizontal bars of images/s per row, each annotated with its top-1 agreement and accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not r.get("error") and r.get("images_per_s")]
    labels = [f"{r['target']} · {r['backend']} {r['precision']} {r['variant']} · {_mode_short(r)}" for r in rows]
    values = [r["images_per_s"] for r in rows]
    height = max(2.5, 0.45 * len(rows) + 1.5)
    fig, ax = plt.subplots(figsize=(11, height))
    try:
        colours = [_BACKEND_COLOURS.get(r["backend"], "tab:gray") for r in rows]
        bars = ax.barh(range(len(rows)), values, color=colours)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"images/s (batch {result['batch']}, 10 crops each)")
        ax.set_title(f"bench on {result['device']} ({result['machine']['gpu'] or result['machine']['cpu']})",
                     fontsize=10)
        top = max(values, default=1.0)
        for bar, row in zip(bars, rows):
            ax.text(bar.get_width() + 0.01 * top, bar.get_y() + bar.get_height() / 2, _annotation(row),
                    va="center", fontsize=7)
        ax.set_xlim(0, top * 1.7)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path


_BACKEND_COLOURS = {"torch": "tab:orange", "onnxruntime": "tab:blue", "openvino": "tab:purple", "tensorrt": "tab:green"}


def _mode_short(row: dict) -> str:
    return "e2e" if row["mode"] == "end-to-end" else "compute"


def _annotation(row: dict) -> str:
    parts = [f"{row['images_per_s']:,.1f}/s"]
    if row.get("agreement_top1") is not None:
        parts.append(f"agree {row['agreement_top1']:.1f}%")
    if row.get("top1") is not None:
        parts.append(f"top-1 {row['top1']:.1f}%")
    if row.get("speedup") is not None:
        parts.append(f"{row['speedup']:.2f}x")
    return "  ".join(parts)


def default_out_path(out_dir: str = "runs/bench", stamp: str | None = None) -> str:
    import time

    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(out_dir, f"bench-{stamp}.json")


# --- compare ---------------------------------------------------------------------------------------
def load_report(path: str) -> dict:
    """An earlier bench JSON; a clear error for a missing file, a non-bench file or a newer schema."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: no such bench report to compare with")
    try:
        report = read_json(path)
    except ValueError as exc:
        raise InputError(f"{path}: not a bench report (JSON error: {exc})") from None
    if not isinstance(report, dict) or "schema_version" not in report or "rows" not in report:
        raise InputError(f"{path}: not a bench report (no schema_version/rows)")
    if report["schema_version"] > SCHEMA_VERSION:
        raise InputError(f"{path}: bench schema {report['schema_version']} is newer than this program reads "
                         f"({SCHEMA_VERSION})")
    return report


def compare_rows(new_rows: list[dict], old_report: dict, old_path: str) -> dict:
    """Ratio new/old of images/s and p50 latency for each row measured in both runs."""
    old_by_key = {row_key(r): r for r in old_report["rows"] if not r.get("error")}
    matched, unmatched = [], []
    for row in new_rows:
        if row.get("error"):
            continue
        old = old_by_key.get(row_key(row))
        if old is None or not old.get("images_per_s"):
            unmatched.append(_label(row))
            continue
        matched.append({
            **{k: row.get(k) for k in ROW_KEY},
            "old_images_per_s": old["images_per_s"],
            "new_images_per_s": row["images_per_s"],
            "throughput_ratio": row["images_per_s"] / old["images_per_s"],
            "p50_ratio": row["p50_ms"] / old["p50_ms"] if old.get("p50_ms") else None,
        })
    return {"old": old_path, "old_created": old_report.get("created"), "rows": matched, "unmatched": unmatched}


def render_comparison(comparison: dict) -> str:
    lines = [f"compared with {comparison['old']} ({comparison.get('old_created') or 'undated'}): "
             "new/old images/s (p50 latency new/old)"]
    for r in comparison["rows"]:
        p50 = "-" if r["p50_ratio"] is None else f"{r['p50_ratio']:.3g}"
        lines.append(f"  {_label(r):<60} {r['old_images_per_s']:>9.1f} -> {r['new_images_per_s']:>9.1f} img/s  "
                     f"x{r['throughput_ratio']:.3g}  (p50 x{p50})")
    if comparison["unmatched"]:
        lines.append("  not in the old report: " + "; ".join(comparison["unmatched"]))
    return "\n".join(lines)


def _label(row: dict) -> str:
    return (f"{row['target']} {row['backend']} {row['precision']} {row['variant']} {row['device']} "
            f"{row['mode']} b{row['batch']}")
