"""The demo's report: `report.md` (images linked) and a self-contained `report.html` (images inlined).

Both are rendered from one list of blocks, so the two always say the same thing. Tables that a
stage already formats (parity, bench) are its own text rendering; nothing is re-derived here.
"""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from cnnbench.common import atomic_write
from cnnbench.gradcam.core import method_name
from cnnbench.gradcam.pointing import format_share
from cnnbench.gradcam.pointing_table import pointing_table_block


def write_report(result: dict, out: Path) -> dict:
    blocks = _blocks(result, out)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write(md_path, _markdown(blocks, out))
    atomic_write(html_path, _html(blocks))
    return {"markdown": str(md_path), "html": str(html_path)}


def _blocks(r: dict, out: Path) -> list[tuple]:
    from cnnbench.bench.report import render_table
    from cnnbench.export import format_parity_table

    blocks: list[tuple] = [
        ("h1", "cnnbench demo report"),
        ("p", f"Data: {r['data']} (embedded synthetic set{', quick' if r['quick'] else ''}). "
              f"Whole pipeline: {r['seconds']:.0f} s on {r['bench']['machine']['cpu']} "
              f"({r['bench']['machine']['cpu_cores']} cores, {r['bench']['device']})."),
        ("h2", "Accuracy on the held-out test split"),
        ("p", "Each model through its exported fp32 graph (ONNX Runtime), which the parity table below "
              "checks against the PyTorch fp32 model."),
        ("table", ["model", "params", "top-1 (1 crop)", "top-5 (1 crop)", "top-1 (10 crops)", "top-5 (10 crops)",
                   "mean per-class (10 crops)"], _accuracy_rows(r)),
        ("p", _lessons_note(r["lessons"])),
        ("h2", "Training curves"),
    ]
    if r.get("training_budget"):
        blocks.append(("p", _budget_note(r["training_budget"], r["training"])))
    for arch, t in r["training"].items():
        blocks.append(("img", os.path.join(t["run_dir"], "curves.png"),
                       f"{arch}: {t['epochs']} epochs in {t['precision']}, best val top-1 {t['best_val_top1']:.1f}% "
                       f"(1 crop) at epoch {t['best_epoch']}; {t['seconds']:.0f} s of training"
                       f"{_parts_note(t['parts'])}; recipe: {t['recipe']}"))
    blocks += [("h2", "Export parity against the PyTorch fp32 reference"),
               ("pre", format_parity_table(r["export"]["exports"])),
               ("p", f"TensorRT: {r['export']['tensorrt']}")]
    cam_rows = [[name, precision, f"{a['cam']['mean_correlation']:.4f}", f"{a['cam']['min_correlation']:.4f}",
                 f"{a['cam']['gates']['mean_correlation']['limit']}", "yes" if a["cam"]["passed"] else "NO", str(len(a["top1_differs"]))]
                for name, v in r["validation"].items() if "artifacts" in v
                for precision, a in v["artifacts"].items() if a.get("cam")]
    blocks.append(("table", ["export", "precision", "CAM r (mean)", "CAM r (min)", "gate", "passed", "top-1 differs"],
                   cam_rows))
    blocks += [("h2", "Benchmark"), ("pre", render_table(r["bench"]))]
    if r["bench"].get("png"):
        blocks.append(("img", r["bench"]["png"], "throughput per target and backend, with top-1 agreement"))
    blocks += _explanation_blocks(r["gradcam"])
    blocks += [("h2", "Reproduce"),
               ("table", ["step", "seconds", "command"], [[s["step"], f"{s['seconds']:.1f}", s["command"]] for s in r["steps"]])]
    return blocks


def _explanation_blocks(gradcam: dict) -> list[tuple]:
    """Per model: the pointing game of the galleries' method (the default), the table per method and layer
    with each layer's ceiling, the default's panels beside Grad-CAM at last's, and the galleries."""
    blocks: list[tuple] = [("h2", "Grad-CAM and its family: where the networks look")]
    for arch, g in gradcam.items():
        if not g.get("ok"):
            blocks.append(("p", f"{arch}: {g.get('error')}"))
            continue
        shown = f"{method_name(g['method'])} at {g['layer']}"
        pointing = g.get("pointing_game")
        if pointing:
            blocks.append(("p", f"{arch}, {shown} (the default; maps of the true class): the pointing game (the "
                                f"map's peak inside the object mask) {100 * pointing['1_crop']['share']:.1f}% with 1 "
                                f"crop, {100 * pointing['10_crops']['share']:.1f}% with 10 crops "
                                f"({pointing['10_crops']['images']} test images); with 10 crops, of the images the "
                                f"model classifies correctly {format_share(pointing['by_prediction']['correct'])}, "
                                f"of the misclassified {format_share(pointing['by_prediction']['misclassified'])}. "
                                f"The ceiling, an ideal {pointing['ideal_map']['cells']}x{pointing['ideal_map']['cells']} "
                                f"map (the object mask averaged over each map cell): "
                                f"{100 * pointing['ideal_map']['1_crop']['share']:.1f}% with 1 crop, "
                                f"{100 * pointing['ideal_map']['10_crops']['share']:.1f}% with 10."))
        table = g.get("pointing_table")
        if table:
            headers, rows = pointing_table_block(table)
            blocks.append(("p", f"{arch}: the same game per method and layer (true class; the last two columns "
                                f"split the {table['crops']}-crop game by that model's prediction). Each layer's "
                                "ideal map is its ceiling. The maps are the documented ten-crop paste-back (the mean "
                                "over covering crops), not the seamless display maps of the panels."))
            blocks.append(("table", headers, rows))
            if table.get("png"):
                blocks.append(("img", table["png"], f"{arch}: hits per method and layer, each layer's ceiling dashed"))
        galleries = g["galleries"]
        if galleries.get("side_by_side"):
            blocks.append(("img", galleries["side_by_side"], f"{arch}: Grad-CAM at last beside {shown}, true class"))
        for kind, caption in (("correct", "correctly classified"), ("errors", "misclassified: maps of the true and the predicted class")):
            if galleries.get(kind):
                blocks.append(("img", galleries[kind], f"{arch}: {caption} ({shown})"))
    return blocks


def _budget_note(budget: dict, training: dict) -> str:
    """The training plan: the budget, its split and what each model trained in it (train.budget's record)."""
    split = "both models train the whole budget side by side" if budget["resnet_share"] == 1 else (
        f"the ResNet trains {budget['resnet_share']:.0%} of it, then its core passes to the Xception")
    per_model = []
    for arch, t in training.items():
        done = t.get("budget")
        if done:
            per_model.append(f"{arch} {done['minutes']:g} min: {done['done_steps']} steps, {done['images']} images "
                             f"in {done['seconds']:.0f} s (plan re-made {len(done['plans']) - 1} times)")
    return (f"Trained by the clock: a {budget['minutes']:g}-minute training budget ({split}); each run measured its "
            f"speed and planned its steps, LR decay and resizing switch to end within its minutes. "
            + "; ".join(per_model) + ".")


def _parts_note(parts: list[dict]) -> str:
    """A resumed run's parts, when it had several: where each trained and in which precision."""
    if len(parts) < 2:
        return ""
    return " in " + ", ".join(f"epochs {p['epochs'][0]}-{p['epochs'][1]} on {p['device']} in {p['precision']}"
                              for p in parts)


def _lessons_note(lessons: dict) -> str:
    """The seed report's two lessons, as this run shows them (pipeline.seed_lessons)."""
    gains = ", ".join(f"{name} {gain:+.1f}" for name, gain in lessons["ten_crop_gain"].items())
    note = f"Ten crops against one, top-1 points: {gains}."
    if "ensemble_margin" in lessons:
        verdict = "above both members" if lessons["ensemble_above_members"] else "not above both members"
        note += (f" The logit-sum ensemble with ten crops is {verdict}: {lessons['ensemble_margin']:+.1f} points "
                 f"against the better one ({lessons['best_member']}). Both lessons need models that have learned: "
                 f"the training budget (below) decides how much they have.")
    return note


def _accuracy_rows(r: dict) -> list[list[str]]:
    rows = []
    params = {arch: t["params"] for arch, t in r["training"].items()}
    for name, acc in r["accuracy"].items():
        one, ten = acc["1_crop"], acc["10_crops"]
        count = params.get(name, sum(params.values()))
        rows.append([name, f"{count / 1e6:.2f}M", f"{one['top1']:.1f}%", f"{one['top5']:.1f}%", f"{ten['top1']:.1f}%",
                     f"{ten['top5']:.1f}%", f"{ten['mean_per_class']:.1f}%"])
    return rows


def _markdown(blocks: list[tuple], out: Path) -> str:
    parts = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            parts.append(f"# {block[1]}")
        elif kind == "h2":
            parts.append(f"## {block[1]}")
        elif kind == "p":
            parts.append(block[1])
        elif kind == "pre":
            parts.append(f"```\n{block[1]}\n```")
        elif kind == "table":
            header, rows = block[1], block[2]
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
            parts.append("\n".join(lines))
        elif kind == "img":
            parts.append(f"![{block[2]}]({os.path.relpath(block[1], out)})\n\n*{block[2]}*")
    return "\n\n".join(parts) + "\n"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:12px}
figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}figcaption{color:#555;font-size:14px}"""


def _html(blocks: list[tuple]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>cnnbench demo report</title>", f"<style>{_STYLE}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "pre":
            parts.append(f"<pre>{esc(block[1])}</pre>")
        elif kind == "table":
            head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(block[1]).read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{esc(block[2])}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{esc(block[2])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
