"""`data check` and `data synth`: what a data folder holds, and generating the embedded set."""
from __future__ import annotations

import os
import sys
import time
from collections import Counter

from tqdm import tqdm

from cnnbench.data.folder import scan_folder
from cnnbench.data.images import ImageError, load_rgb_with_mode
from cnnbench.data.synth import synthesize


def check_folder(path, verify: bool = False) -> dict:
    """Counts per class, total, and everything skipped with its reason (paths relative to the root).

    verify=True also decodes every image (progress bar on stderr) and lists those that fail, plus
    how many images of each pixel mode were found (e.g. grayscale "L" images converted to RGB).
    """
    index = scan_folder(path)
    report = {
        "root": index.root,
        "layout": index.layout,
        "num_classes": len(index.classes),
        "total": len(index.samples),
        "classes": index.classes,
        "per_class": index.counts(),
        "skipped": [{"path": _relative(p, index.root), "reason": r} for p, r in index.skipped],
        "verified": verify,
    }
    if verify:
        unreadable, modes = [], Counter()
        for sample in tqdm(index.samples, desc="verifying images", unit="img", file=sys.stderr):
            try:
                modes[load_rgb_with_mode(sample.path)[1]] += 1
            except ImageError as e:
                unreadable.append({"path": _relative(e.path, index.root), "reason": e.reason})
        report["unreadable"] = unreadable
        report["readable"] = len(index.samples) - len(unreadable)
        report["source_modes"] = dict(sorted(modes.items()))
    return report


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def render_check(report: dict) -> str:
    """The `data check` report as text for a person."""
    lines = [f"{report['root']} ({report['layout']} layout): {report['num_classes']} classes, "
             f"{report['total']} images"]
    width = max(len(name) for name in report["per_class"])
    lines += [f"  {name:<{width}}  {count:>6}" for name, count in report["per_class"].items()]
    lines.append(f"skipped: {len(report['skipped'])}")
    lines += [f"  {item['path']}: {item['reason']}" for item in report["skipped"]]
    if report["verified"]:
        modes = ", ".join(f"{mode} {count}" for mode, count in report["source_modes"].items())
        lines.append(f"verified: {report['readable']} readable ({modes}), {len(report['unreadable'])} unreadable")
        lines += [f"  {item['path']}: {item['reason']}" for item in report["unreadable"]]
    return "\n".join(lines)


def synth_command(out, classes: int = 16, per_class: int = 100, size: int = 160, seed: int = 0) -> dict:
    """Generate the synthetic set into `out` and report what was written."""
    started = time.perf_counter()
    root = synthesize(out, classes=classes, per_class=per_class, size=size, seed=seed)
    seconds = time.perf_counter() - started
    index = scan_folder(root)
    return {
        "root": root,
        "classes": len(index.classes),
        "class_names": index.classes,
        "per_class": per_class,
        "images": len(index.samples),
        "size": size,
        "seed": seed,
        "seconds": round(seconds, 2),
    }
