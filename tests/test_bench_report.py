"""Bench reports on hand-made rows: table, CSV, chart, --compare ratios and report validation."""
import csv
import json

import pytest

from cnnbench.bench.report import (CSV_COLUMNS, SCHEMA_VERSION, compare_rows, load_report, render_table, write_chart,
                          write_csv)


def _row(target, backend, precision, images_per_s, **extra):
    row = {"target": target, "kind": "checkpoint", "source": "/x", "backend": backend, "precision": precision,
           "variant": "eager", "device": "cpu", "mode": "compute", "batch": 8, "crops_per_image": 10, "error": None}
    if images_per_s is not None:  # a failed row has no measurements
        row.update({"images_per_s": images_per_s, "crops_per_s": 10 * images_per_s, "p50_ms": 8000 / images_per_s,
                    "p90_ms": 9000 / images_per_s, "p99_ms": 9500 / images_per_s, "mean_ms": 8000 / images_per_s,
                    "cv": 0.02, "unstable": False, "host_peak_rss_mib": 512.0, "peak_fraction": 0.25,
                    "top1": 80.0, "agreement_top1": 99.5, "speedup": 1.0})
    row.update(extra)
    return row


def _result(rows):
    machine = {"cpu": "Test CPU", "gpu": None, "cpu_cores": 2, "torch": "2.x", "onnxruntime": "1.x"}
    return {"schema_version": SCHEMA_VERSION, "created": "2025-01-01T00:00:00", "device": "cpu", "batch": 8,
            "iters": 3, "seconds": None, "warmup": 1, "machine": machine, "rows": rows,
            "peaks": {"fp32": {"flops": 1e11, "kernel": "torch.mm 1024x1024"}, "fp16": {"flops": None, "note": "n/a: no fp16 units"}},
            "skipped": ["m tensorrt fp32: TensorRT runs on CUDA only"], "warnings": ["noisy"]}


def test_table_lists_rows_failures_skips_and_peaks():
    rows = [_row("resnet26", "torch", "fp32", 2.0),
            _row("resnet26", "onnxruntime", "fp16", 7.5, unstable=True, cv=0.12, speedup=3.75),
            _row("broken", "onnxruntime", "fp32", None, error="ExportError: hash mismatch")]
    text = render_table(_result(rows))
    lines = text.splitlines()
    assert "batch 8 images x 10 crops" in lines[0] and "Test CPU" in lines[0]
    body = [line for line in lines if line.startswith("resnet26")]
    assert len(body) == 2 and len({len(line) for line in lines[1:2] + body}) == 1  # fixed width
    assert "12.0%!" in body[1] and "3.75x" in body[1] and "7.5" in body[1]
    assert "broken onnxruntime fp32 eager (compute): ExportError: hash mismatch" in text
    assert "skipped: m tensorrt fp32" in text and "fp32 0.100 TFLOP/s (torch.mm 1024x1024)" in text and "n/a: no fp16 units" in text


def test_csv_has_every_column_and_blank_for_missing(tmp_path):
    rows = [_row("a", "torch", "fp32", 4.0), _row("b", "torch", "fp32", None, error="boom")]
    path = write_csv(str(tmp_path / "r.csv"), rows)
    with open(path, newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(CSV_COLUMNS)
    assert float(table[0]["crops_per_s"]) == 40.0 and table[1]["images_per_s"] == "" and table[1]["error"] == "boom"


def test_chart_is_a_png(tmp_path):
    path = write_chart(str(tmp_path / "c.png"), _result([_row("a", "torch", "fp32", 4.0),
                                                        _row("a", "onnxruntime", "fp32", 9.0)]))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_gives_new_over_old_for_matching_rows_only():
    old = _result([_row("a", "torch", "fp32", 4.0), _row("a", "onnxruntime", "fp32", 10.0)])
    new = [_row("a", "torch", "fp32", 5.0), _row("a", "onnxruntime", "fp32", 8.0),
           _row("a", "onnxruntime", "fp16", 12.0), _row("a", "torch", "fp32", 6.0, batch=16)]
    comparison = compare_rows(new, old, "old.json")
    ratios = {(r["backend"], r["precision"], r["batch"]): r["throughput_ratio"] for r in comparison["rows"]}
    assert ratios == {("torch", "fp32", 8): pytest.approx(1.25), ("onnxruntime", "fp32", 8): pytest.approx(0.8)}
    p50 = {r["backend"]: r["p50_ratio"] for r in comparison["rows"]}
    assert p50["torch"] == pytest.approx(0.8)  # latency moves the other way
    assert len(comparison["unmatched"]) == 2
    text = render_table({**_result(new), "comparison": comparison})
    assert "compared with old.json" in text and "x1.25" in text and "x0.8 " in text


def test_load_report_refuses_what_is_not_a_bench_report(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_report(str(tmp_path / "missing.json"))
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a bench report"):
        load_report(str(tmp_path / "junk.json"))
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="schema_version"):
        load_report(str(tmp_path / "other.json"))
    (tmp_path / "newer.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "rows": []}))
    with pytest.raises(ValueError, match="newer"):
        load_report(str(tmp_path / "newer.json"))
