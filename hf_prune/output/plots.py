"""The model card's picture: what share of its heads, KV heads, MLP neurons (and routed experts) each layer keeps."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ..report import PruningReport

PLOT_FILE = "pruning_plot.png"


def _kept(pair: tuple[int, int]) -> float:
    before, after = pair
    return after / before if before else 0.0


def plot_kept_structure(report: PruningReport, path: Path) -> Path:
    """A bar chart per layer (original indices); removed layers are marked. Drawn on a bare
    `Figure` (Agg canvas), so no pyplot state or display backend is touched."""
    layers = report.layers
    series = {"attention heads": [_kept(layer.heads) for layer in layers]}
    if any(layer.kv_heads != layer.heads for layer in layers):  # GQA: KV heads are a group of their own
        series["KV heads"] = [_kept(layer.kv_heads) for layer in layers]
    series["MLP neurons"] = [_kept(layer.neurons) for layer in layers]
    if any(layer.experts[0] for layer in layers):  # mixture of experts: the routed experts each layer keeps
        series["routed experts"] = [_kept(layer.experts) for layer in layers]

    figure = Figure(figsize=(max(6.0, 0.28 * len(layers) + 2), 3.2), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    for offset, (label, values) in enumerate(series.items()):
        positions = [layer.layer + (offset - (len(series) - 1) / 2) * width for layer in layers]
        axes.bar(positions, values, width=width, label=label)
    for layer in layers:
        if layer.removed:
            axes.axvspan(layer.layer - 0.45, layer.layer + 0.45, color="0.85", zorder=0)
            axes.text(layer.layer, 0.5, "removed", rotation=90, ha="center", va="center", fontsize=7, color="0.3")
    axes.set_xticks(range(len(layers)))
    axes.tick_params(axis="x", labelsize=7)
    axes.set_xlim(-0.6, len(layers) - 0.4)
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("layer")
    axes.set_ylabel("share kept")
    axes.set_title(f"What each layer keeps ({report.model_type}, parameters -{100 * report.removed_fraction:.1f}%)")
    axes.legend(loc="lower right", fontsize=8, ncols=len(series))
    figure.savefig(path)
    return path
