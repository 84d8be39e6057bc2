"""Small helpers every stage shares: atomic writes, hashing, JSON, metrics."""
from cnnbench.common.io import atomic_write, atomic_write_json, read_json, sha256_file
from cnnbench.common.metrics import accuracy_report, topk_indices

__all__ = ["atomic_write", "atomic_write_json", "sha256_file", "read_json", "accuracy_report", "topk_indices"]
