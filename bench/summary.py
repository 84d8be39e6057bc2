"""What a bench run concludes from its rows: speedups over each target's baseline, warnings about
noise, and the files it writes (JSON, CSV, PNG)."""
from __future__ import annotations

import os
from typing import Callable, Optional

from bench import report
from bench.harness import CV_WARN
from bench.targets import RowPlan


def add_speedups(measured: list[tuple[RowPlan, dict]]) -> None:
    """Each row's images/s over its target's PyTorch eager fp32 row (same mode, batch and device)."""
    baselines = {(plan.target.reference_key, row["mode"]): row
                 for plan, row in measured if plan.is_baseline and row.get("images_per_s")}
    for plan, row in measured:
        baseline = baselines.get((plan.target.reference_key, row["mode"]))
        row["speedup"] = (row["images_per_s"] / baseline["images_per_s"]
                          if baseline is not None and row.get("images_per_s") else None)
        row["speedup_vs"] = (f"{baseline['target']} torch fp32 eager" if baseline is not None else None)


def warnings(rows: list[dict], load_at_start: Optional[float]) -> list[str]:
    return (_busy_machine_warning(load_at_start) + _stability_warnings(rows) + _above_peak_warnings(rows)
            + [f"{r['target']} {r['backend']} {r['precision']}: {r['note']}" for r in rows if r.get("note")])


def _busy_machine_warning(load: Optional[float]) -> list[str]:
    cores = os.cpu_count() or 1
    if load is None or load < cores:
        return []
    return [f"the machine was busy when the bench started (1-minute load average {load:.1f} on {cores} cores): "
            "other processes compete for the cores, so these timings understate what the machine can do"]


def _above_peak_warnings(rows: list[dict]) -> list[str]:
    """A model faster than the matmul peak means the peak kernels were slowed (a busy machine) or are
    weaker than the backend's own: the fraction is then only a relative figure."""
    above = [f"{r['target']} {r['backend']} {r['precision']} {r['variant']} {r['mode']} "
             f"({100 * r['peak_fraction']:.0f}%)" for r in rows if (r.get("peak_fraction") or 0) > 1]
    if not above:
        return []
    return ["achieved FLOP/s above the measured matmul peak in " + "; ".join(above)
            + ": the peak was measured low (a busy machine, or kernels slower than the backend's own)"]


def _stability_warnings(rows: list[dict]) -> list[str]:
    noisy = [f"{r['target']} {r['backend']} {r['precision']} {r['variant']} {r['mode']} ({100 * r['cv']:.0f}%)"
             for r in rows if r.get("unstable")]
    if not noisy:
        return []
    return [f"CV above {100 * CV_WARN:.0f}% (marked ! in the table) in {len(noisy)} row(s): the timings are noisy "
            "(a busy machine or too few iterations); rerun with more --seconds or --iters: " + "; ".join(noisy)]


def write_outputs(result: dict, out: Optional[str], log: Callable[[str], None]) -> None:
    """JSON, CSV and PNG (all atomic); a chart that cannot be drawn is a warning, not a lost run."""
    json_path = os.fspath(out) if out else report.default_out_path()
    stem = json_path[:-5] if json_path.endswith(".json") else json_path
    result["json"], result["csv"], result["png"] = json_path, stem + ".csv", stem + ".png"
    report.write_csv(result["csv"], result["rows"])
    try:
        report.write_chart(result["png"], result)
    except Exception as exc:  # noqa: BLE001 - the numbers matter more than the picture
        result["png"] = None
        result["warnings"].append(f"chart not written: {type(exc).__name__}: {exc}")
    report.write_json(json_path, result)
    log(f"wrote {json_path}, {result['csv']}" + (f", {result['png']}" if result["png"] else ""))
