"""BC's token budget (:mod:`optimum_bc.calibration.bc_budget`): BC, the auto race and the report's MSEs run on the
first calibration batches up to ``BC_TOKENS`` tokens, the weight method on every window; within the budget nothing
changes. The budget is shrunk here so that the tiny calibration sets (16 windows of 32 tokens, batches of 4) exceed
it; the 1-process / 2-rank equality with a budget is in tests/test_distributed.py."""

import pytest
import torch

from optimum_bc import QuantLinear, quantize_model
from optimum_bc.algorithms.bc_select import fallback_mode, leader, race_modes
from optimum_bc.algorithms.rtn import rtn_quantize
from optimum_bc.calibration import bc_budget
from optimum_bc.calibration.bc_budget import budget_batches

from .conftest import tiny_llama
from .test_bc_cost import _cfg, _io


pytestmark = pytest.mark.usefixtures("one_thread")


def test_budget_takes_the_leading_whole_batches_up_to_the_budget(monkeypatch) -> None:
    """The leading batches whose tokens add up to at most the budget, at least the first; a rank's share is the
    prefix of its (contiguous) batches that falls inside."""
    monkeypatch.setattr(bc_budget, "BC_TOKENS", 300)
    assert budget_batches([128, 100, 90, 128], [0, 1, 2, 3], 4) == (2, 2, 228)
    monkeypatch.setattr(bc_budget, "BC_TOKENS", 318)
    assert budget_batches([128, 100, 90, 128], [0, 1, 2, 3], 4) == (3, 3, 318)
    monkeypatch.setattr(bc_budget, "BC_TOKENS", 10)
    assert budget_batches([128, 100], [0, 1], 2) == (1, 1, 128)
    monkeypatch.undo()
    assert bc_budget.BC_TOKENS >= 8 * 512  # runs up to 8 x 512 tokens are unchanged by it


def test_biases_and_report_on_the_budget_equal_an_explicit_computation(calib_ids, monkeypatch) -> None:
    """RTN, sequential target, sink token, a budget of half the tokens: every bias is the per-class mean of
    ``W x - Q x̂`` over the first 8 windows only, and the report's MSEs (their own budget: 4 windows) are measured
    directly on the first 4."""
    monkeypatch.setattr(bc_budget, "BC_TOKENS", 8 * 32)
    monkeypatch.setattr(bc_budget, "REPORT_TOKENS", 4 * 32)
    reference, model = tiny_llama(), tiny_llama()
    report = quantize_model(model, _cfg(calib_ids, bc_target="sequential", bc_sink_tokens=1))
    assert report.calibration_tokens == 16 * 32 and report.bc_tokens == 8 * 32 and report.mse_tokens == 4 * 32
    assert "BC on 256, its MSEs on 128" in report.format_table()
    ids = calib_ids[:8]
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    fp, q = _io(reference, names, ids), _io(model, names, ids)
    rows = {r.name: r for r in report.layers}
    first = (torch.arange(ids.numel()) % ids.shape[1]) == 0
    for name in names:
        module = model.get_submodule(name)
        W = reference.get_submodule(name).weight.detach()
        Q = rtn_quantize(W, bits=3, group_size=32, sym=False).dequantize()
        (x, y_fp), (x_q, y_q) = fp[name], q[name]
        r = x @ W.T - x_q @ Q.T
        torch.testing.assert_close(module.bias.float(), r[~first].mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(module.sink_bias[0].float() + module.bias.float(), r[first].mean(0))
        reported = slice(0, 4 * ids.shape[1])  # the report's first 4 windows
        after = (y_fp - y_q)[reported]
        sink = torch.where(first[:, None], module.sink_bias[0].float(), 0.0)[reported]
        before = after + module.bias.float() + sink
        assert rows[name].mse_before == pytest.approx(float(before.pow(2).mean()), rel=1e-4)
        assert rows[name].mse_after == pytest.approx(float(after.pow(2).mean()), rel=1e-4)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_within_the_budget_nothing_changes_and_beyond_it_the_bias_does(calib_ids, monkeypatch, method) -> None:
    """A budget of exactly the calibration tokens gives the model and report of the default budget (bit for bit);
    one batch less changes the biases, but not the weights GPTQ fits in block 0's first stage (its Hessians keep
    every window; later stages see inputs the earlier stages' biases moved)."""
    default = tiny_llama()
    report = quantize_model(default, _cfg(calib_ids, method=method))
    monkeypatch.setattr(bc_budget, "BC_TOKENS", 16 * 32)
    exact = tiny_llama()
    again = quantize_model(exact, _cfg(calib_ids, method=method))
    assert again.without_timings() == report.without_timings()
    state = default.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in exact.state_dict().items())
    monkeypatch.setattr(bc_budget, "BC_TOKENS", 12 * 32)
    fewer = tiny_llama()
    budgeted = quantize_model(fewer, _cfg(calib_ids, method=method))
    assert budgeted.bc_tokens == 12 * 32
    biases = [k for k in state if k.endswith(".bias")]
    assert biases and all(not torch.equal(fewer.state_dict()[k], state[k]) for k in biases)
    block0 = [f"model.layers.0.self_attn.{p}_proj.qweight" for p in "qkv"]
    assert all(torch.equal(fewer.state_dict()[k], state[k]) for k in block0)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_pass_counts_drop_with_the_budget(calib_ids, monkeypatch, method) -> None:
    """On half the tokens (2 of 4 batches) the float pass, the race's other streams and their stopped passes count
    half; RTN runs on the budget batches alone. GPTQ races whole models: each candidate keeps its stopped passes
    and its pass to the next block on every batch, and each BC candidate's float pass counts half."""
    monkeypatch.setattr(bc_budget, "BC_TOKENS", 8 * 32)
    report = quantize_model(tiny_llama(), _cfg(calib_ids, method=method))
    leading = fallback_mode(1)
    for i, block in enumerate(report.blocks):
        if method == "gptq":
            bc_candidates = len(race_modes(1)) - 1
            assert block.block_passes == pytest.approx(1 + bc_candidates * (1 + 0.5))
            assert block.stopped_passes == pytest.approx(4 * len(race_modes(1)))
            continue
        if i:
            previous = report.blocks[i - 1].bc_scores
            leading = leader({mode: previous[mode] for mode in block.bc_scores}, race_modes(1))
        others = [mode for mode in block.bc_scores if mode != leading]
        sequential = sum(m.startswith("sequential") for m in others)
        assert block.block_passes == pytest.approx(0.5 + 0.5 * (1 + len(others)))
        assert block.stopped_passes == pytest.approx(2 + 4 * 0.5 * sequential)
