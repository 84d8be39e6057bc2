"""The pointing game per CAM method and layer: the table ``gradcam --errors --methods --layers`` prints,
its JSON, its bar chart, and the rows the demo report shows.

Every row explains the TRUE class of the same test images (localisation, not classification), with
one crop and with ten crops (paste-back), split by whether the ``crops``-crop model classified the
image correctly; every layer has its ceiling, the ideal map at that layer's resolution
(gradcam.pointing.ideal_map_hit). ``best`` is the row that points best with ten crops: the measured
candidate for gradcam.core.DEFAULT_CAMS (the measurement is only meaningful on a
model that has learned).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

from cnnbench.data.crops import CENTRE, DENSE, TEN
from cnnbench.gradcam.core import method_name
from cnnbench.gradcam.panels import save_figure
from cnnbench.gradcam.pointing import format_share, pointing_summary

GAMES = (CENTRE.name, TEN.name)  # the crop modes every row is scored with
GAME_KEYS = {CENTRE.name: "1_crop", TEN.name: "10_crops", DENSE.name: "dense"}


@dataclass
class PointingTally:
    """Hits per (layer, method, crop mode), in image order, and per layer the ideal map's hits.

    ``correct`` holds, per scored image, whether the ``crops``-crop model classified it correctly.
    """

    crops: str
    layers: dict[str, dict]  # layer name -> {"module": Layer.describe(), "cells": side of its map}
    methods: list[str]
    hits: dict[tuple[str, str, str], list[bool]] = field(default_factory=dict)
    ideal: dict[tuple[str, str], list[bool]] = field(default_factory=dict)
    correct: list[bool] = field(default_factory=list)

    def add(self, layer: str, method: str, crops: str, hit: bool) -> None:
        self.hits.setdefault((layer, method, crops), []).append(hit)

    def add_ideal(self, layer: str, crops: str, hit: bool) -> None:
        self.ideal.setdefault((layer, crops), []).append(hit)

    def row(self, layer: str, method: str) -> dict:
        """One row: the method at the layer, one crop and ten crops (and dense where scored), and the split."""
        row = {"method": method, "label": method_name(method), "layer": layer}
        for crops, key in GAME_KEYS.items():
            if (layer, method, crops) in self.hits:
                row[key] = pointing_summary(self.hits[(layer, method, crops)])
        split = self.crops if (layer, method, self.crops) in self.hits else TEN.name
        scored = list(zip(self.hits.get((layer, method, split), []), self.correct))
        row["by_prediction"] = {"crops": split,
                                "correct": pointing_summary([hit for hit, right in scored if right]),
                                "misclassified": pointing_summary([hit for hit, right in scored if not right])}
        return row

    def table(self) -> dict:
        rows = [self.row(layer, method) for layer in self.layers for method in self.methods]
        layers = {layer: {**facts, "ideal_map": {GAME_KEYS[c]: pointing_summary(self.ideal.get((layer, c), []))
                                                 for c in GAMES}}
                  for layer, facts in self.layers.items()}
        scored = [r for r in rows if r["10_crops"]["images"]]
        best = max(scored, key=lambda r: r["10_crops"]["share"]) if scored else None  # first of equals: listed order
        return {"explained": "true class", "crops": self.crops, "layers": layers, "rows": rows,
                "best": None if best is None else {"method": best["method"], "label": best["label"],
                                                   "layer": best["layer"], "10_crops": best["10_crops"]}}


def pointing_table_block(table: dict) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the table as text cells, for a report: one line per method and layer, then the
    ideal map of each layer."""
    headers = ["layer", "method", "1 crop", "10 crops", f"correct ({table['crops']})",
               f"misclassified ({table['crops']})"]
    lines = []
    for r in table["rows"]:
        facts = table["layers"][r["layer"]]
        lines.append([f"{facts['module']} {facts['cells']}x{facts['cells']}", r["label"], format_share(r["1_crop"]),
                      format_share(r["10_crops"]), format_share(r["by_prediction"]["correct"]),
                      format_share(r["by_prediction"]["misclassified"])])
    for facts in table["layers"].values():
        ideal = facts["ideal_map"]
        lines.append([f"{facts['module']} {facts['cells']}x{facts['cells']}", "ideal map (ceiling)",
                      format_share(ideal["1_crop"]), format_share(ideal["10_crops"]), "", ""])
    return headers, lines


def render_pointing_table(table: dict) -> list[str]:
    """The table as aligned text lines, with the best row named."""
    headers, lines = pointing_table_block(table)
    widths = [max(len(cell) for cell in column) for column in zip(headers, *lines)]
    out = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [headers, *lines]]
    best = table["best"]
    if best:
        out.append(f"  points best with 10 crops: {best['label']} at {best['layer']} ({format_share(best['10_crops'])}); "
                   "the default is gradcam.core.DEFAULT_CAMS")
    return out


def save_pointing_plot(table: dict, path) -> str:
    """Bar chart: per crop mode a panel, per layer a group of bars (one per method), the layer's ceiling
    as a dashed line over its group."""
    layers = list(table["layers"])
    methods = list(dict.fromkeys(r["method"] for r in table["rows"]))
    share = {(r["layer"], r["method"], key): r[key]["share"] for r in table["rows"] for key in ("1_crop", "10_crops")}
    fig = Figure(figsize=(max(5.0, 1.2 + 0.5 * len(methods) * len(layers)) * 2, 3.8))
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / len(methods)
    for ax, key, title in zip(axes, ("1_crop", "10_crops"), ("1 crop", "10 crops")):
        for m, method in enumerate(methods):
            values = [100 * (share[(layer, method, key)] or 0.0) for layer in layers]
            ax.bar(np.arange(len(layers)) + (m - (len(methods) - 1) / 2) * width, values, width,
                   label=method_name(method))
        for i, layer in enumerate(layers):
            ceiling = table["layers"][layer]["ideal_map"][key]["share"]
            if ceiling is not None:
                ax.hlines(100 * ceiling, i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                          label="ideal map (ceiling)" if i == 0 else None)
        facts = table["layers"]
        ax.set_xticks(range(len(layers)), [f"{facts[lay]['module']}\n{facts[lay]['cells']}x{facts[lay]['cells']}"
                                           for lay in layers], fontsize=8)
        ax.set_title(f"{title}: true-class map peaks inside the object", fontsize=9)
        ax.set_ylim(0, 105)  # room for a 100 % ceiling line
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("% of test images")
    fig.legend(*axes[1].get_legend_handles_labels(), loc="center right", fontsize=7)  # beside the bars, never on them
    fig.subplots_adjust(left=0.06, right=0.88, bottom=0.2, top=0.88, wspace=0.05)
    return save_figure(fig, path)
