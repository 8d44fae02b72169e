"""The BC-gain plot: ratio after / before per layer type, from the report's numbers, drawn for 200+ layers."""

from pathlib import Path

import pytest

from optimum_bc.calibration.plotting import bc_gain_by_type, plot_layer_errors
from optimum_bc.calibration.report import LayerReport, QuantizationReport


TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _report(blocks: int = 30) -> QuantizationReport:
    layers = [
        LayerReport(f"model.layers.{b}.x.{t}", b, 0.1, 0.0, mse_before=1.0 + b, mse_after=(1.0 + b) * (0.5 + 0.05 * i))
        for b in range(blocks)
        for i, t in enumerate(TYPES)
    ]
    layers.append(LayerReport("model.layers.0.x.exact", 0, 0.1, 0.0, mse_before=0.0, mse_after=0.0))
    layers.append(LayerReport("model.layers.0.x.no_bc", 0, 0.1, 0.0))
    return QuantizationReport(layers=layers)


def test_gain_by_type() -> None:
    gains = bc_gain_by_type(_report())
    assert list(gains) == list(TYPES)  # forward order; no ratio for an exact layer or one without BC
    for i, name in enumerate(TYPES):
        assert [b for b, _ in gains[name]] == list(range(30))
        assert [g for _, g in gains[name]] == pytest.approx([0.5 + 0.05 * i] * 30)


def test_plot_of_210_layers(tmp_path: Path) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    path = tmp_path / "gain.png"
    plot_layer_errors(_report(), str(path))
    height, width = plt.imread(path).shape[:2]
    assert (width, height) == (1320, 495)


def test_nothing_to_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="no per-layer MSE"):
        plot_layer_errors(QuantizationReport(layers=[LayerReport("a.q_proj", 0, 0.1, 0.0)]), str(tmp_path / "x.png"))
