"""Human-readable rendering of an export run (the CLI prints this without --json)."""
from __future__ import annotations

from cnnbench.export.parity import format_parity_table


def render_export(result: dict) -> str:
    lines = [f"exported to {m['export_dir']}: " + ", ".join(a["file"] for a in m["artifacts"]) for m in result["exports"]]
    lines += ["", format_parity_table(result["exports"]), "", f"TensorRT: {result['tensorrt']}"]
    lines += [f"FAILED: {problem}" for problem in result.get("failures", [])]
    return "\n".join(lines)
