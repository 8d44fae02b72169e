"""Bias-compensation gain plot of a QuantizationReport (matplotlib, optional extra ``plot``).

Per layer type (``q_proj``, ``down_proj``, ...: the last part of the layer name) the ratio output-MSE after BC /
before BC: below 1 where BC helped. Two panels stay readable at hundreds of layers: the spread of the ratio per type
(one box each) and the ratio against the block index (one line per type).
"""

from collections import defaultdict

from .report import QuantizationReport


def bc_gain_by_type(report: QuantizationReport) -> dict[str, list[tuple[int, float]]]:
    """``{layer type: [(block, mse_after / mse_before), ...]}`` in forward order, for layers with both MSEs (a zero
    ``mse_before``, an exactly quantized layer, has no ratio and is left out)."""
    gains: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in report.layers:
        if row.mse_before is not None and row.mse_after is not None and row.mse_before > 0:
            gains[row.name.rsplit(".", 1)[-1]].append((row.block, row.mse_after / row.mse_before))
    return dict(gains)


def plot_layer_errors(report: QuantizationReport, path: str) -> None:
    """Write a PNG of the BC gain (output MSE after / before bias compensation) per layer type."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the per-layer plot needs matplotlib: pip install 'optimum-bc[plot]'") from err
    gains = bc_gain_by_type(report)
    if not gains:
        raise ValueError("the report has no per-layer MSE (bias compensation was off); nothing to plot")
    types = list(gains)
    fig, (spread, by_block) = plt.subplots(1, 2, figsize=(12.0, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    spread.boxplot([[g for _, g in gains[t]] for t in types], showfliers=True)
    spread.set_xticks(range(1, len(types) + 1), types, rotation=45, ha="right", fontsize=8)
    spread.set_ylabel("output MSE after BC / before BC")
    spread.set_title("per layer type")
    for name in types:
        blocks, ratios = zip(*gains[name], strict=True)
        by_block.plot(blocks, ratios, marker=".", markersize=3, linewidth=1, label=name)
    by_block.set_xlabel("block")
    by_block.set_title("per block")
    by_block.legend(fontsize=7, ncol=max(1, len(types) // 8 + 1))
    for ax in (spread, by_block):
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    total = sum(len(v) for v in gains.values())
    fig.suptitle(f"optimum-bc: bias-compensation gain over {total} layers (below 1: BC lowered the error)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
