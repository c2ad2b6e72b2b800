"""What ``evaluate`` writes beside results.json: the markdown table (also ``report``'s), the figure, and the plot of
the refinement curve when the config asks for one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from explainer.core.io import atomic_path, atomic_write_text
from explainer.core.maps import minmax_normalize
from explainer.core.viz import plot_curves

CURVE_FIELDS = ("r", "share_refined", "seconds")


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4g}"


def markdown_table(results: dict[str, Any]) -> str:
    """A markdown report: settings, then one row per method (arrows give each metric's better direction)."""
    specs = results.get("metric_specs", {})
    names = list(specs) or sorted({k for m in results["methods"].values() for k in m["metrics"]})
    arrow = {"higher": "↑", "lower": "↓"}
    lines = [f"# Evaluation: {results['explanandum']}", "",
             f"{results['dataset']}, split `{results['split']}`, {results['num_images']} images, target "
             f"`{results['target']}`, baseline `{results['baseline']}`, device `{results['device']}`.", "",
             *[f"Note: {n}." for n in results.get("notes", [])], *([""] if results.get("notes") else []),
             "| method | s/image | " + " | ".join(f"{n} {arrow.get(specs.get(n, {}).get('direction'), '')}".strip()
                                                for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    notes = []
    for meth, entry in results["methods"].items():
        row = [meth, _fmt(entry["seconds_per_image"])] + [_fmt(entry["metrics"].get(n)) for n in names]
        lines.append("| " + " | ".join(row) + " |")
        for n, why in entry.get("skipped_metrics", {}).items():
            notes.append(f"- {meth}: `{n}` skipped: {why}")
    if notes:
        lines += ["", "Skipped (– in the table):", *notes]
    chosen = {meth: entry["thresholds"] for meth, entry in results["methods"].items() if entry.get("thresholds")}
    if chosen:
        val = results.get("validation_images", {})
        lines += ["", f"Thresholds (metric option threshold: val) chosen per method on {val.get('num_images', '?')} "
                      f"`{val.get('split', '?')}` images, the best mean IoU of the grid 0.05..0.95:"]
        for meth, per_metric in chosen.items():
            by_value: dict[float, list[str]] = {}
            for metric, sel in per_metric.items():
                by_value.setdefault(sel["threshold"], []).append(metric)
            lines.append(f"- {meth}: " + "; ".join(f"{t:g} ({', '.join(ms)})" for t, ms in by_value.items()))
    lines += curve_table(results)
    lines += ["", "↑ higher is better, ↓ lower is better. Metric definitions: `explainer.metrics` "
                  "(see metric_specs in results.json)."]
    return "\n".join(lines) + "\n"


def curve_metrics(results: dict[str, Any]) -> list[str]:
    """The metrics of the refinement curves' rows, in order of first appearance."""
    names: list[str] = []
    for entry in results["methods"].values():
        for row in entry.get("refinement_curve", []):
            names += [k for k in row if k not in CURVE_FIELDS and k not in names]
    return names


def curve_table(results: dict[str, Any]) -> list[str]:
    """Markdown lines of the refinement curves (none without one): per method and fraction ``r``, the share of
    masks refined, the seconds of the calls and the metrics."""
    curves = {m: e["refinement_curve"] for m, e in results["methods"].items() if e.get("refinement_curve")}
    if not curves:
        return []
    info = results.get("refinement", {})
    arrow = {"higher": "↑", "lower": "↓"}
    names = curve_metrics(results)
    lines = ["", f"Refinement curve: `{info.get('call', 'explanation(trust=True, refine=r)')}`, the fraction r of "
                 f"each call's masks (up to {info.get('images_per_call', '?')} images a call), those of lowest trust, "
                 "finetuned per image:", "",
             "| method | r | refined | seconds | " + " | ".join(
                 f"{n} {arrow.get(info.get('directions', {}).get(n), '')}".strip() for n in names) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(names)]
    for meth, rows in curves.items():
        for row in rows:
            lines.append(f"| {meth} | {row['r']:g} | {row['share_refined']:.1%} | {_fmt(row['seconds'])} | "
                         + " | ".join(_fmt(row.get(n)) for n in names) + " |")
    return lines


def refinement_path(out: str | Path) -> Path:
    """Where the refinement plot goes: ``refinement.png`` beside ``results.json`` (``<stem>_refinement.png``
    beside any other name)."""
    out = Path(out)
    return out.with_name("refinement.png" if out.stem == "results" else f"{out.stem}_refinement.png")


def save_refinement_plot(results: dict[str, Any], path: str | Path) -> Path | None:
    """The refinement curves of every method that has one: each metric, and the seconds, against ``r``."""
    curves = {m: e["refinement_curve"] for m, e in results["methods"].items() if e.get("refinement_curve")}
    if not curves:
        return None
    panels = [(name, name) for name in curve_metrics(results)] + [("seconds", "seconds of the calls")]
    return plot_curves(curves, "r", panels, path, xlabel="fraction of masks refined, lowest trust first (r)",
                       title=f"Refinement curve, {results['num_images']} {results['split']} images "
                             f"({results['explanandum']})")


def save_figure(figure: dict[str, Any], path: str | Path) -> Path | None:
    """A grid PNG: one row per (image, class), the image then each method's map (min-max, jet) over it, the
    class's ground-truth region outlined in white where the data has one, and a legend (matplotlib, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    imgs = figure["images"]
    methods = list(figure["maps"])
    if not imgs or not methods:
        return None
    regions = figure.get("regions") or [None] * len(imgs)
    rows, cols = len(imgs), 1 + len(methods)
    fig = Figure(figsize=(1.9 * cols, 1.9 * rows + 0.7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for r, img in enumerate(imgs):
        rgb = img.permute(1, 2, 0).clamp(0, 1).numpy()
        region = regions[r] if r < len(regions) else None
        axes[r, 0].imshow(rgb)
        axes[r, 0].set_ylabel(figure["titles"][r], fontsize=11)
        for c, meth in enumerate(methods, start=1):
            ax = axes[r, c]
            ax.imshow(rgb)
            maps = figure["maps"][meth]
            if r < len(maps):
                m = minmax_normalize(maps[r], rel_eps=0.0)
                im = ax.imshow(m.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for ax in axes[r]:
            if region is not None and bool(region.any()):
                ax.contour(region.float().numpy(), levels=[0.5], colors="white", linewidths=1.0)
    axes[0, 0].set_title("image", fontsize=10)
    for c, meth in enumerate(methods, start=1):
        axes[0, c].set_title(meth, fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout(rect=(0, 0.6 / (1.9 * rows + 0.7), 1, 1))
    if im is not None:
        cax = fig.add_axes((0.3, 0.15 / (1.9 * rows + 0.7), 0.4, 0.2 / (1.9 * rows + 0.7)))
        fig.colorbar(im, cax=cax, orientation="horizontal")
        cax.set_title("map (min-max per map); white outline: the class's ground-truth region; rows: the class "
                      "explained", fontsize=8)
        cax.tick_params(labelsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def write_outputs(results: dict[str, Any], figure: dict[str, Any] | None, out: str | Path) -> dict[str, Path]:
    """results.json at ``out``; ``.md``, ``.png`` and, with refinement curves, :func:`refinement_path` beside it
    (each written atomically)."""
    out = Path(out)
    paths = {"json": atomic_write_text(out, json.dumps(results, indent=2) + "\n"),
             "md": atomic_write_text(out.with_suffix(".md"), markdown_table(results))}
    if figure is not None:
        png = save_figure(figure, out.with_suffix(".png"))
        if png is not None:
            paths["png"] = png
    curve = save_refinement_plot(results, refinement_path(out))
    if curve is not None:
        paths["refinement"] = curve
    return paths
