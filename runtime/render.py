"""Human-readable renderings of runtime results (the CLI prints these without --json)."""
from __future__ import annotations


def render_evaluation(r: dict) -> str:
    lines = [f"{r['predictor']}: {r['images']} test images, {r['crops']} crop(s), {r['backend']} on {r['device']} ({r['precision']})",
             f"  top-1 {r['top1']:.2f}%   top-5 {r['top5']:.2f}%   mean per-class {r['mean_per_class']:.2f}%",
             f"  {r['images_per_s']:.1f} images/s; split {r['split']}"]
    lines += [f"  unreadable: {f['path']}: {f['error']}" for f in r.get("failures", [])]
    return "\n".join(lines)


def render_prediction(item: dict) -> str:
    """One file's line: its top classes with their probabilities, or its error."""
    if "error" in item:
        return f"{item['path']}: ERROR {item['error']}"
    top = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in item["top"])
    return f"{item['path']}: {top}"


def render_predictions(r: dict) -> str:
    """The result lines held in the summary (none when they were streamed), then the counts."""
    lines = [render_prediction(item) for item in r.get("results", [])]
    counts = f"{r['succeeded']} classified, {r['failed']} failed"
    if r.get("resumed"):
        counts += f" ({r['resumed']} of them already in the file from an earlier run, not redone)"
    written = [f"; {label} {r[key]}" for key, label in (("csv", "CSV"), ("jsonl", "JSON Lines")) if r.get(key)]
    lines.append(counts + "".join(written))
    return "\n".join(lines)
