"""Reading what LoadGen wrote: the detail log's ``:::MLLOG {json}`` lines and the accuracy log.

The detail log is LoadGen's own record of a test (validity, why not, throughput, latency percentiles,
early stopping); the summary text is kept beside it for people, never parsed.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import numpy as np

MLLOG = ":::MLLOG "
_PERCENTILE = re.compile(r"^result_(\d+\.\d+)_percentile_latency_ns$")
_QUERY_PERCENTILE = re.compile(r"^result_(\d+\.\d+)_percentile_per_query_latency_ns$")


def read_detail(folder: str) -> tuple[dict, list[str]]:
    """(key -> value of every MLLOG record, the messages LoadGen flagged as errors) of ``folder``'s detail log."""
    path = os.path.join(folder, "mlperf_log_detail.txt")
    values, errors = {}, []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith(MLLOG):
                continue
            record = json.loads(line[len(MLLOG):])
            values[record["key"]] = record["value"]
            if record.get("metadata", {}).get("is_error"):
                errors.append(f"{record['key']}: {record['value']}")
    if "result_validity" not in values:
        raise RuntimeError(f"{path}: LoadGen wrote no result (the test did not finish); "
                           f"errors: {'; '.join(errors) or 'none'}")
    return values, errors


def performance_result(values: dict, errors: list[str]) -> dict:
    """The fields a performance row reports: validity and why not, throughput, latency percentiles (ms)."""
    valid = values["result_validity"] == "VALID"
    reasons = []
    if not valid:
        reasons += [values[k].strip() for k in ("result_invalid_reason",) if values.get(k, "").strip()]
        if values.get("early_stopping_met") is False:
            reasons.append("early stopping not met:" + values.get("early_stopping_result", "").rstrip())
        reasons += errors
    result = {
        "validity": values["result_validity"],
        "invalid_reason": " | ".join(" ".join(r.split()) for r in reasons) or None,
        "early_stopping_met": values.get("early_stopping_met"),
        "min_duration_met": values.get("result_min_duration_met"),
        "min_queries_met": values.get("result_min_queries_met"),
        "perf_constraints_met": values.get("result_perf_constraints_met"),
        "queries": values.get("result_query_count"),
        "samples_per_s": _first(values, "result_samples_per_second", "result_completed_samples_per_sec",
                                "result_qps_with_loadgen_overhead"),
        "scheduled_samples_per_s": values.get("result_scheduled_samples_per_sec"),
        "mean_latency_ms": _ms(values.get("result_mean_latency_ns")),
        "latency_ms": {m.group(1): _ms(v) for k, v in values.items() if (m := _PERCENTILE.match(k))},
        "query_latency_ms": {m.group(1): _ms(v) for k, v in values.items() if (m := _QUERY_PERCENTILE.match(k))},
        "early_stopping_latency_ms": _ms(_first(values, "early_stopping_latency_ss", "early_stopping_latency_ms")),
        "overlatency_queries": values.get("result_overlatency_query_count"),
        "effective": {k[len("effective_"):]: v for k, v in values.items() if k.startswith("effective_")
                      and k[len("effective_"):] in _EFFECTIVE_SHOWN},
    }
    return result


_EFFECTIVE_SHOWN = ("target_qps", "target_latency_ns", "target_latency_percentile", "samples_per_query",
                    "min_duration_ms", "min_query_count", "performance_sample_count")


def read_accuracy_log(folder: str, total: int) -> tuple[np.ndarray, list[int]]:
    """The float32 logits LoadGen logged per QSL index ([total, K]) and the indices it never logged.

    LoadGen may log a sample twice (MultiStream pads its last query); the first record counts.
    """
    path = os.path.join(folder, "mlperf_log_accuracy.json")
    with open(path, encoding="utf-8") as handle:
        records = json.load(handle)
    rows: dict[int, np.ndarray] = {}
    for record in sorted(records, key=lambda r: r["seq_id"]):
        if record["qsl_idx"] not in rows:
            rows[record["qsl_idx"]] = np.frombuffer(bytes.fromhex(record["data"]), dtype=np.float32)
    missing = [i for i in range(total) if i not in rows]
    width = max((len(r) for r in rows.values()), default=0)
    logits = np.full((total, width), np.nan, dtype=np.float32)
    for index, row in rows.items():
        if len(row) == width:
            logits[index] = row
        else:  # an empty response: the SUT failed this sample
            missing.append(index)
    return logits, sorted(missing)


def _first(values: dict, *keys) -> Optional[float]:
    return next((values[k] for k in keys if k in values), None)


def _ms(ns) -> Optional[float]:
    return None if ns is None else ns / 1e6
