"""Per-layer error plot of a QuantizationReport (matplotlib, optional extra ``plot``)."""

from .report import QuantizationReport


def plot_layer_errors(report: QuantizationReport, path: str) -> None:
    """Write a PNG: output MSE of every quantized layer before and after bias compensation (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the per-layer plot needs matplotlib: pip install 'optimum-bc[plot]'") from err
    rows = [r for r in report.layers if r.mse_before is not None]
    if not rows:
        raise ValueError("the report has no per-layer MSE (bias compensation was off); nothing to plot")
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, len(rows) * 0.06), 4.0))
    ax.plot(x, [r.mse_before for r in rows], label="before BC", linewidth=1)
    ax.plot(x, [r.mse_after for r in rows], label="after BC", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("quantized layer (forward order)")
    ax.set_ylabel("output MSE on calibration tokens")
    ax.set_title("optimum-bc: per-layer output error")
    ticks = list(range(0, len(rows), max(1, len(rows) // 12)))
    ax.set_xticks(ticks, [rows[i].name.split(".")[-1] + f"@{rows[i].block}" for i in ticks], rotation=60, fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
