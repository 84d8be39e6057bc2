"""Benchmark: speed, accuracy and agreement of every backend and precision side by side.

`run_bench` measures; `render_table` turns its result into the terminal table.
"""
from cnnbench.bench.harness import BatchTooLargeError, Measurement, measure, measure_batch, summarize
from cnnbench.bench.report import SCHEMA_VERSION, render_table
from cnnbench.bench.run import run_bench

__all__ = ["BatchTooLargeError", "Measurement", "SCHEMA_VERSION", "measure", "measure_batch", "render_table",
           "run_bench", "summarize"]
