"""Human-readable renderings of Grad-CAM results (the CLI prints these without --json)."""
from __future__ import annotations

from cnnbench.gradcam.core import method_name
from cnnbench.gradcam.pointing import format_share
from cnnbench.gradcam.pointing_table import render_pointing_table


def _error_line(r: dict) -> str | None:
    return f"error: {r['error']}" if "error" in r and "results" not in r and "artifacts" not in r else None


def render_gradcam(r: dict) -> str:
    if _error_line(r):
        return _error_line(r)
    lines = [f"{r['method']} of {r['model']} ({r['crops']} crop(s)) -> {r['out']}"]
    for item in r["results"]:
        peak = item["peak"]
        extra = f", CAM vs reference r={item['cam_correlation']:.4f}" if "cam_correlation" in item else ""
        lines.append(f"  {item['path']}: {item['predicted']} ({100 * item['top'][0]['prob']:.1f}%), peak at "
                     f"({peak['x']}, {peak['y']}){extra} -> {item['panel']}")
    lines += [f"  {f['path']}: ERROR {f['error']}" for f in r["failures"]]
    cam = r.get("cam_parity")
    if cam:
        lines.append(f"  CAM parity ({cam['precision']}): mean r {cam['mean_correlation']:.4f} (gate >= "
                     f"{cam['gates']['mean_correlation']['limit']}) {'passed' if cam['passed'] else 'FAILED'}")
    return "\n".join(lines)


def render_errors(r: dict) -> str:
    if _error_line(r):
        return _error_line(r)
    lines = [f"{r['checkpoint']}: {r['images']['n_images']} test images, {r['crops']} crop(s), top-1 {r['top1']:.1f}%, "
             f"{r['misclassified']} misclassified; maps: {method_name(r['method'])} at {r['layer']}",
             f"  galleries: {r['galleries']['errors']} (errors), {r['galleries']['correct']} (correct)"
             + (f", {r['galleries']['side_by_side']} (beside Grad-CAM at last)" if r["galleries"].get("side_by_side")
                else "")]
    pointing = r.get("pointing_game")
    if pointing:
        for key in [k for k in ("1_crop", "10_crops", "dense") if k in pointing]:
            lines.append(f"  pointing game, {key.replace('_', ' ')}: {format_share(pointing[key])} maps peak inside the object")
        ideal, side = pointing["ideal_map"], pointing["ideal_map"]["cells"]
        lines.append(f"  ceiling, an ideal {side}x{side} map (the object mask per last-map cell): "
                     f"{format_share(ideal['1_crop'])} with 1 crop, {format_share(ideal['10_crops'])} with 10")
        split = pointing["by_prediction"]
        lines.append(f"  pointing game, {split['crops']} crop(s), split by that prediction: correctly classified "
                     f"{format_share(split['correct'])}, misclassified {format_share(split['misclassified'])}")
    else:
        lines.append(f"  {r['pointing_game_note']}")
    table = r.get("pointing_table")
    if table:
        lines.append(f"  pointing game per method and layer (true class; split by the {table['crops']}-crop "
                     f"prediction) -> {table['png']}")
        lines += render_pointing_table(table)
    return "\n".join(lines)


def render_validation(r: dict) -> str:
    if "artifacts" not in r:
        return f"error: {r.get('error')}"
    lines = [f"{r['export']}: {r['images']['n_images']} held-out images; report {r['report']}"]
    for precision, a in r["artifacts"].items():
        gates = ", ".join(f"{name} {g['value']:.4g} ({'ok' if g['passed'] else 'FAILED'})" for name, g in a["parity"]["gates"].items())
        lines.append(f"  {precision} {a['file']}: {gates}")
        if a["cam"]:
            lines.append(f"    CAM r mean {a['cam']['mean_correlation']:.4f} min {a['cam']['min_correlation']:.4f} "
                         f"(gate >= {a['cam']['gates']['mean_correlation']['limit']}) "
                         f"{'ok' if a['cam']['passed'] else 'FAILED'}")
        exact_map = (a["cam"] or {}).get("exact_ten_crop_map")
        if "exact_top1_agreement" in a["parity"]:  # a dense export: how close to the exact ten crops (not gated)
            lines.append(f"    vs exact ten crops: top-1 agreement {100 * a['parity']['exact_top1_agreement']:.1f}%"
                         + (f", CAM r mean {exact_map['mean_correlation']:.4f}" if exact_map else ""))
        lines.append(f"    top-1 differs on {len(a['top1_differs'])} image(s)")
    lines += [f"  problem: {p}" for p in r["problems"]]
    return "\n".join(lines)
