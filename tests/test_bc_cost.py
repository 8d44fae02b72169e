"""Bias compensation from first moments and streamed residuals, against an explicit computation on a tiny model.

The calibrator keeps no ``in x in`` matrix for BC: the biases come from sums of the float and quantized inputs (taken
in separate passes) and the report's MSEs from the residuals streamed in the pass to the next block. Here both are
recomputed by hand from the inputs every Linear sees in the float and in the quantized model.
"""

from contextlib import contextmanager

import pytest
import torch

from optimum_bc import BCQuantizationConfig, QuantizationReport, QuantLinear, quantize_model
from optimum_bc.algorithms.bc_select import fallback_mode, leader, race_modes
from optimum_bc.algorithms.rtn import rtn_quantize
from optimum_bc.layers import kernels

from .conftest import tiny_llama


def _cfg(calib_ids: torch.Tensor, **kwargs) -> BCQuantizationConfig:
    options = {"bits": 3, "group_size": 32, "method": "rtn", "num_samples": 16, "seq_len": 32, "batch_size": 4}
    return BCQuantizationConfig(dataset=calib_ids, **(options | kwargs))


@contextmanager
def _recording(model: torch.nn.Module, names: list[str], store: dict):
    """Record every named Linear's input and output, concatenated over the forward passes inside."""

    def hook(module, args, output, name):
        x, y = args[0].reshape(-1, args[0].shape[-1]), output.reshape(-1, output.shape[-1])
        store.setdefault(name, []).append((x.detach().float(), y.detach().float()))

    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _io(model: torch.nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    store: dict = {}
    with torch.no_grad(), kernels.use_backend("reference"), _recording(model, names, store):
        for chunk in ids.split(4):
            model(chunk)
    return {n: (torch.cat([x for x, _ in v]), torch.cat([y for _, y in v])) for n, v in store.items()}


def test_sequential_biases_sinks_codes_and_report_equal_an_explicit_computation(calib_ids) -> None:
    """RTN (codes independent of the data), sequential target with a sink token: every stored bias and sink row is
    the per-class mean of ``W x - Q x̂`` over the calibration tokens, with ``x`` the float model's inputs and ``x̂``
    the quantized model's; the report's MSEs are those measured directly on those tokens."""
    reference = tiny_llama()
    model = tiny_llama()
    report = quantize_model(model, _cfg(calib_ids, bc_target="sequential", bc_sink_tokens=1))
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14
    fp, q = _io(reference, names, calib_ids), _io(model, names, calib_ids)
    rows = {r.name: r for r in report.layers}
    first = (torch.arange(calib_ids.numel()) % calib_ids.shape[1]) == 0
    for name in names:
        module, float_layer = model.get_submodule(name), reference.get_submodule(name)
        W = float_layer.weight.detach()
        qw = rtn_quantize(W, bits=3, group_size=32, sym=False)
        torch.testing.assert_close(module.dequantize_weight(torch.float32), qw.dequantize(), rtol=1e-3, atol=1e-3)
        (x, y_fp), (x_q, y_q) = fp[name], q[name]
        r = x @ W.T - x_q @ qw.dequantize().T
        later, sink = r[~first].mean(0), r[first].mean(0)
        torch.testing.assert_close(module.bias.float(), later, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(module.sink_bias[0].float() + module.bias.float(), sink, rtol=1e-4, atol=1e-4)
        # The report: the residual before BC (float output - quantized output + what BC adds) and after it.
        after = y_fp - y_q
        before = after + module.bias.float() + torch.where(first[:, None], module.sink_bias[0].float(), 0.0)
        assert rows[name].mse_before == pytest.approx(float(before.pow(2).mean()), rel=1e-4)
        assert rows[name].mse_after == pytest.approx(float(after.pow(2).mean()), rel=1e-4)
        assert rows[name].mse_after < rows[name].mse_before


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_auto_report_mse_equals_a_direct_measurement(calib_ids, method) -> None:
    """Where auto chooses per block (here one calibration batch: the stated rule), each layer's row is measured
    against the target of its block's choice on the final model (with the chosen biases stored). In the race every
    row names the winner and its MSEs are the sequential target's on the leading stream, with the winner's bias."""
    raced = quantize_model(tiny_llama(), _cfg(calib_ids, method=method))
    assert "auto race" in raced.bc_summary and "auto race" in raced.format_table()
    chosen = raced.blocks[0].bc_choice
    assert all(r.bc_choice == chosen and r.mse_before > 0 and r.mse_after >= 0 for r in raced.layers)
    calib_ids = calib_ids[:4]
    reference = tiny_llama()
    model = tiny_llama()
    report = quantize_model(model, _cfg(calib_ids, method=method, num_samples=4))
    assert all("nothing to hold out" in b.bc_fallback for b in report.blocks)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    fp, q = _io(reference, names, calib_ids), _io(model, names, calib_ids)
    first = (torch.arange(calib_ids.numel()) % calib_ids.shape[1]) == 0
    for row in report.layers:
        module = model.get_submodule(row.name)
        # LLaMA's Linears have no bias of their own: the stored bias is all BC's.
        applied = module.bias.float() + torch.where(first[:, None], module.sink_bias[0].float(), 0.0)
        (x, y_fp), (_, y_q) = fp[row.name], q[row.name]
        if row.bc_choice.startswith("float"):
            before = x @ (reference.get_submodule(row.name).weight.T - module.dequantize_weight(torch.float32).T)
        else:
            before = y_fp - y_q + applied
        assert row.mse_before == pytest.approx(float(before.pow(2).mean()), rel=1e-4)
        assert row.mse_after == pytest.approx(float((before - applied).pow(2).mean()), rel=1e-4)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_report_counts_block_passes_and_splits_time_and_round_trips(calib_ids, method) -> None:
    """The report says where each block's time went and how many block forwards it ran; save/load keeps it. With
    auto BC on 4 batches and RTN (the shared-weight race): stage 0's float pass, the leading stream's pass to the next
    block (the report pairs the float outputs kept from stage 0's pass: no float pass of its own), and one pass per
    other stream of the race; the 4 true-sequential stages each stop after their inputs, on the leading stream and on
    every other sequential stream. With GPTQ (the race of whole models) each candidate is one manual calibration:
    BC off one pass to the next block, each BC variant its float pass and its pass to the next block; every
    candidate stops once per stage."""
    report = quantize_model(tiny_llama(), _cfg(calib_ids, method=method))
    order = race_modes(1)
    leading = fallback_mode(1)  # the stated rule's mode leads at block 0, then the stream ahead after each block
    for i, block in enumerate(report.blocks):
        if method == "gptq":
            assert block.block_passes == pytest.approx(1 + 2 * (len(order) - 1))
            assert block.stopped_passes == pytest.approx(4 * len(order))
        else:
            if i:
                previous = report.blocks[i - 1].bc_scores
                leading = leader({mode: previous[mode] for mode in block.bc_scores}, order)
            others = [mode for mode in block.bc_scores if mode != leading]
            assert block.block_passes == pytest.approx(2 + len(others))
            assert block.stopped_passes == pytest.approx(4 * (1 + sum(m.startswith("sequential") for m in others)))
        split = block.forward_seconds + block.statistics_seconds + block.solve_seconds + block.bc_seconds
        assert 0 < split <= block.seconds and block.bc_seconds > 0 and block.solve_seconds > 0
    assert "time split" in report.format_table()
    again = QuantizationReport.from_dict(report.to_dict())
    assert again.blocks == report.blocks and again.bc_summary == report.bc_summary
    quiet = report.without_timings()
    assert all(b.forward_seconds == b.bc_seconds == 0.0 for b in quiet.blocks)
    off = quantize_model(tiny_llama(), _cfg(calib_ids, method="gptq", bias_compensation=False))
    assert all(b.block_passes == pytest.approx(1) and b.bc_seconds == 0 for b in off.blocks)
