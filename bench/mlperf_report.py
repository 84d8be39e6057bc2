"""The mlperf command's terminal output: one table per scenario, then why runs were INVALID, then errors."""
from __future__ import annotations

from cnnbench.bench.mlperf_scenarios import SCENARIOS

# The agreement of the two harnesses: LoadGen Offline within 10 % of the closed-loop compute rate.
OFFLINE_AGREEMENT = 0.10

_ROW = (("target", 18, lambda r: str(r["target"])), ("backend", 11, lambda r: r["backend"]),
        ("prec", 4, lambda r: r["precision"]), ("variant", 16, lambda r: r["variant"]),
        ("crops", 5, lambda r: str(r["crops"])), ("batch", 5, lambda r: str(r["batch"])),
        ("result", 7, lambda r: "ERROR" if r.get("error") else r.get("validity") or "-"))

_METRICS = {
    "offline": (("samples/s", 9, lambda r: _num(r.get("samples_per_s"), 2)),
                ("closed/s", 8, lambda r: _num(r.get("closed_loop_images_per_s"), 2)),
                ("ratio", 5, lambda r: _num(r.get("loadgen_to_closed_loop"), 2)),
                ("step/s", 9, lambda r: _num((r.get("calibration") or {}).get("sut_step_images_per_s"), 2)),
                ("samples", 7, lambda r: _num((r.get("effective") or {}).get("samples_per_query"), 0))),
    "server": (("QPS", 8, lambda r: _num((r.get("server") or {}).get("target_qps"), 2)),
               ("INVALID@", 8, lambda r: _num((r.get("server") or {}).get("lowest_invalid_qps_above"), 2)),
               ("1.2x", 7, lambda r: _edge(r.get("server"))),
               ("bound ms", 8, lambda r: _num((r.get("server") or {}).get("latency_bound_ms"), 0)),
               ("p99 ms", 8, lambda r: _num(_latency(r, "99.00"), 1)),
               ("trials", 6, lambda r: str(len((r.get("server") or {}).get("trials", [])))),
               ("queries", 7, lambda r: _num(r.get("queries"), 0))),
    "singlestream": (("p90 ms", 8, lambda r: _num(_latency(r, "90.00"), 2)),
                     ("ES p90", 8, lambda r: _num(r.get("early_stopping_latency_ms"), 2)),
                     ("p50 ms", 8, lambda r: _num(_latency(r, "50.00"), 2)),
                     ("queries", 7, lambda r: _num(r.get("queries"), 0))),
    "multistream": (("p99 ms", 8, lambda r: _num((r.get("query_latency_ms") or {}).get("99.00"), 1)),
                    ("ES p99", 8, lambda r: _num(r.get("early_stopping_latency_ms"), 1)),
                    ("p50 ms", 8, lambda r: _num((r.get("query_latency_ms") or {}).get("50.00"), 1)),
                    ("queries", 7, lambda r: _num(r.get("queries"), 0))),
}
_ACCURACY = (("top1", 6, lambda r: _num((r.get("accuracy") or {}).get("top1"), 2)),
             ("eval", 6, lambda r: _num((r.get("accuracy") or {}).get("eval_top1"), 2)),
             ("same", 4, lambda r: _same(r.get("accuracy"))))


def render_mlperf(result: dict) -> str:
    settings = result["settings"]
    length = ("MLPerf's own minimums (--official)" if settings["official"] else
              f"short runs: {settings['seconds']:g} s and at least {_min_queries(settings)} queries each "
              "(for comparing our own targets; --official for MLPerf's 10-minute runs)")
    lines = [f"MLPerf LoadGen {result.get('loadgen_version') or '?'} on {result['device']} "
             f"({result['machine'].get('cpu') or result['machine'].get('gpu') or ''}); {length}"]
    for name in result["scenarios"]:
        rows = [r for r in result["rows"] if r["scenario"] == name]
        columns = _ROW + (_METRICS[name] if "performance" in result["modes"] else ()) + (
            _ACCURACY if "accuracy" in result["modes"] else ())
        lines += ["", f"{name}: {SCENARIOS[name].measures}"]
        header = " ".join(h.ljust(w) if i < len(_ROW) - 1 else h.rjust(w) for i, (h, w, _) in enumerate(columns))
        lines += [header, "-" * len(header)]
        for row in rows:
            lines.append(" ".join(_fit(get(row), w).ljust(w) if i < len(_ROW) - 1 else _fit(get(row), w).rjust(w)
                                  for i, (_, w, get) in enumerate(columns)))
        for row in rows:
            label = f"{row['target']} {row['backend']} {row['precision']} {row['variant']}"
            if row.get("error"):
                lines.append(f"  ERROR {label}: {row['error']}")
            elif row.get("invalid_reason"):
                lines.append(f"  INVALID {label}: {row['invalid_reason']}")
            elif abs((row.get("loadgen_to_closed_loop") or 1) - 1) > OFFLINE_AGREEMENT:
                step = (row.get("calibration") or {}).get("sut_step_images_per_s")
                lines.append(f"  GAP {label}: LoadGen Offline ran {row['loadgen_to_closed_loop']:.2f}x the closed loop "
                             f"(more than {OFFLINE_AGREEMENT:.0%} apart); the SUT step alone (crops cut, model, logits "
                             f"back) ran {_num(step, 2)}/s: "
                             + ("the gap is the SUT's own host work" if step and abs(
                                 row["samples_per_s"] / step - 1) <= OFFLINE_AGREEMENT
                                else "the gap is in LoadGen's issuing and completion (or a noisy machine)"))
            elif _edge(row.get("server")) not in ("-", "INVALID"):
                lines.append(f"  EDGE NOT SHOWN {label}: the run at 1.2x the reported QPS was "
                             + ("VALID (the search ran out of trials above it)" if row["server"]["edge_proof"]
                                else "not run (--server-trials ran out)"))
    lines += ["", "QPS: the highest Server rate found VALID; INVALID@: the lowest rate above it that was not; "
              "1.2x: the verdict of the run at 1.2x QPS (INVALID: the search found the edge). "
              "ES: LoadGen's early-stopping estimate of the percentile (MLPerf's reported latency). "
              "closed/s: the bench's closed-loop compute rate at the same batch (the model on pre-cut crops); step/s: "
              "the SUT's own step (crops cut, model, logits back) in a closed loop. same: accuracy mode's "
              "top-1 equals the eval pipeline's on the same images.",
              f"LoadGen logs and mlperf.json: {result['out']}"]
    if result.get("skipped"):
        lines.append("skipped: " + "; ".join(result["skipped"]))
    return "\n".join(lines)


def _min_queries(settings: dict) -> str:
    counts = settings.get("min_queries") or {}
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v is not None) or "one"


def _latency(row: dict, percentile: str):
    return (row.get("latency_ms") or {}).get(percentile)


def _edge(server) -> str:
    if not server or server.get("target_qps") is None:
        return "-"
    proof = server.get("edge_proof")
    return proof["validity"] if proof else "not run"


def _same(accuracy) -> str:
    if not accuracy:
        return "-"
    return "yes" if accuracy.get("matches_eval") else "NO"


def _num(value, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"
