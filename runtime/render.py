"""Human-readable renderings of runtime results (the CLI prints these without --json)."""
from __future__ import annotations


def render_evaluation(r: dict) -> str:
    lines = [f"{r['predictor']}: {r['images']} test images, {r['crops']} crop(s), {r['backend']} on {r['device']} ({r['precision']})",
             f"  top-1 {r['top1']:.2f}%   top-5 {r['top5']:.2f}%   mean per-class {r['mean_per_class']:.2f}%",
             f"  {r['images_per_s']:.1f} images/s; split {r['split']}"]
    lines += [f"  unreadable: {f['path']}: {f['error']}" for f in r.get("failures", [])]
    return "\n".join(lines)


def render_predictions(r: dict) -> str:
    lines = []
    for item in r["results"]:
        if "error" in item:
            lines.append(f"{item['path']}: ERROR {item['error']}")
        else:
            top = ", ".join(f"{t['class']} {100 * t['prob']:.1f}%" for t in item["top"])
            lines.append(f"{item['path']}: {top}")
    lines.append(f"{r['succeeded']} classified, {r['failed']} failed" + (f"; CSV {r['csv']}" if r.get("csv") else ""))
    return "\n".join(lines)
