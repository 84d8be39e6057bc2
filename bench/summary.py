"""What a bench run concludes from its rows: speedups over each target's baseline, warnings about
noise, and the files it writes (JSON, CSV, PNG)."""
from __future__ import annotations

import os
from typing import Callable, Optional

from cnnbench.bench import report
from cnnbench.bench.harness import CV_WARN
from cnnbench.bench.targets import RowPlan
from cnnbench.data.crops import TEN
from cnnbench.export.manifest import graph_crops
from cnnbench.runtime.backends import EXPORT_BACKENDS
from cnnbench.runtime.selection import measurements, record_measurements


def add_speedups(measured: list[tuple[RowPlan, dict]]) -> None:
    """Each row's images/s over its target's PyTorch eager fp32 row (same mode, batch and device)."""
    baselines = {(plan.target.reference_key, row["mode"]): row
                 for plan, row in measured if plan.is_baseline and row.get("images_per_s")}
    for plan, row in measured:
        baseline = baselines.get((plan.target.reference_key, row["mode"]))
        row["speedup"] = (row["images_per_s"] / baseline["images_per_s"]
                          if baseline is not None and row.get("images_per_s") else None)
        row["speedup_vs"] = (f"{baseline['target']} torch fp32 eager" if baseline is not None else None)


def record_backend_choices(measured: list[tuple[RowPlan, dict]], device: str, bench_json: str,
                           threads: Optional[int]) -> dict:
    """Each measured export's rows merged into the record beside its manifest (runtime.selection, what
    `--backend auto` reads): {target: {"record": path, precision: the fastest verified backend}}.

    Only the rows of the crop mode a user of the export gets by default count: its graph's mode, or
    the exact ten crops for a graph that takes crops."""
    by_target: dict = {}
    for plan, row in measured:
        manifest = plan.target.manifest
        if manifest is None or plan.backend not in EXPORT_BACKENDS:
            continue
        if row["crops"] == (graph_crops(manifest) or TEN.name):
            by_target.setdefault(plan.target, []).append(row)
    written = {}
    for target, rows in by_target.items():
        try:
            path, choices = record_measurements(target.manifest, device,
                                                measurements(rows, bench_json=bench_json, threads=threads))
        except OSError as exc:  # a read-only export folder: the measurements still stand
            path, choices = f"not written: {exc}", {}
        written[target.name] = {"record": path, **choices}
    return written


def warnings(rows: list[dict], load_at_start: Optional[float]) -> list[str]:
    return (_busy_machine_warning(load_at_start) + _stability_warnings(rows) + _above_peak_warnings(rows)
            + _gate_warnings(rows)
            + [f"{r['target']} {r['backend']} {r['precision']}: {r['note']}" for r in rows if r.get("note")])


def _gate_warnings(rows: list[dict]) -> list[str]:
    """Rows whose logits failed their precision's parity gates: fast, but not verified (never chosen by auto)."""
    return [f"{r['target']} {r['backend']} {r['precision']} {r['variant']} {r['mode']}: parity gates failed against "
            f"{r['gate_reference']}: " + "; ".join(r["gate_failures"] or ["?"])
            for r in rows if r.get("gates_passed") is False]


def _busy_machine_warning(load: Optional[float]) -> list[str]:
    cores = os.cpu_count() or 1  # the load average counts the whole host, so its cores, not our affinity
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


def output_path(out: Optional[str]) -> str:
    """The bench JSON's path: ``out``, else runs/bench/bench-<time>.json."""
    return os.fspath(out) if out else report.default_out_path()


def write_outputs(result: dict, out: Optional[str], log: Callable[[str], None]) -> None:
    """JSON, CSV and PNG (all atomic); a chart that cannot be drawn is a warning, not a lost run."""
    json_path = output_path(out)
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
