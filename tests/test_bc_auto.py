"""``bc_target="auto"``: the race of whole-model streams, the held-out choice per block (layer-level BC), its closed
forms, the fallback, old configs, OPT positions."""

import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from optimum_bc import BCQuantizationConfig, QuantLinear, quantize_model
from optimum_bc.algorithms.bc_select import (
    RACE_MODES,
    AutoLayer,
    FoldInputSums,
    choose_block_mode,
    held_out_folds,
    race_modes,
)
from optimum_bc.algorithms.compensation import ResidualMoments
from optimum_bc.calibration.block_inputs import _Batch
from optimum_bc.layers import kernels
from optimum_bc.layers.positions import token_positions

from .conftest import VOCAB, tiny_llama, tiny_opt


def _cfg(calib_ids: torch.Tensor, **kwargs) -> BCQuantizationConfig:
    options = {"bits": 3, "group_size": 32, "method": "gptq", "num_samples": 16, "seq_len": 32, "batch_size": 4}
    return BCQuantizationConfig(dataset=calib_ids, **(options | kwargs))


def _rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])[valid.reshape(-1)]


def test_candidates_and_error_drop_match_direct_means() -> None:
    g = torch.Generator().manual_seed(0)
    d_in, d_out, T = 6, 5, 10
    W, Q = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, d_in, generator=g)
    sums = FoldInputSums(d_in, sink_tokens=1)
    xs, xqs, folds = [], [], []
    for b in range(4):
        x = torch.randn(T, d_in, generator=g) + (b % 2)
        x[0] += 5  # the sink position is an outlier
        x_q = x + 0.2 * torch.randn(T, d_in, generator=g)
        sums.add_batch(b % 2, x, x_q, torch.arange(T))
        xs.append(x), xqs.append(x_q), folds.append(torch.full((T,), b % 2))
    x, x_q, fold = torch.cat(xs), torch.cat(xqs), torch.cat(folds)
    pos = torch.arange(T).repeat(4)
    r_float, r_seq = x @ (W - Q).T, x @ W.T - x_q @ Q.T
    res = sums.residual_sums(W, Q)
    torch.testing.assert_close(res.candidate("float", [0, 1])[0], r_float.mean(0), rtol=1e-4, atol=1e-5)
    bias, sink = res.candidate("sequential+sink", [1])
    in_fold = fold == 1
    later = r_seq[in_fold & (pos > 0)].mean(0)
    torch.testing.assert_close(bias, later, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sink[0], r_seq[in_fold & (pos == 0)].mean(0) - later, rtol=1e-4, atol=1e-4)
    none_bias, none_sink = res.candidate("none", [0, 1])
    assert not none_bias.any() and not none_sink.any()
    # error_drop is E||r||² - E||r - b||² (per element) of the sequential residual on all tokens
    bias, sink = res.candidate("sequential+sink", [0, 1])
    applied = bias + torch.where((pos == 0)[:, None], sink[0], 0.0)
    drop = float((r_seq**2).mean() - ((r_seq - applied) ** 2).mean())
    assert res.error_drop(bias, sink) == pytest.approx(drop, rel=1e-3)
    assert drop > 0
    with pytest.raises(ValueError, match="unknown bias compensation mode"):
        res.candidate("median", [0])


def _shift_batches(shifts: list[float], W: torch.Tensor) -> tuple[list[_Batch], list[_Batch]]:
    """Batches whose inputs have mean ``shift`` per batch, and their float-layer targets ``W x``."""
    g = torch.Generator().manual_seed(1)
    inputs, targets = [], []
    for shift in shifts:
        x = torch.randn(2, 16, W.shape[1], generator=g) + shift
        valid = torch.ones(2, 16, dtype=torch.bool)
        inputs.append(_Batch(hidden=x, kwargs={}, valid=valid))
        targets.append(_Batch(hidden=x @ W.T, kwargs={}, valid=valid))
    return inputs, targets


def _one_layer_block(W: torch.Tensor, Q: torch.Tensor, inputs: list[_Batch]) -> tuple[nn.Linear, AutoLayer]:
    layer = nn.Linear(W.shape[1], W.shape[0])
    layer.weight.data, layer.bias.data = Q.clone(), torch.zeros(W.shape[0])
    sums = FoldInputSums(W.shape[1], sink_tokens=0)
    residual = ResidualMoments(W.shape[0])
    for b, batch in enumerate(inputs):
        x = _rows(batch.hidden, batch.valid)
        sums.add_batch(b % 2, x, x, torch.arange(16).repeat(2))
        residual.add_batch(x @ W.T - x @ Q.T)
    auto = AutoLayer("layer", layer, sums.residual_sums(W, Q), torch.zeros(W.shape[0]))
    auto.residual["sequential"] = residual
    return layer, auto


def test_auto_picks_none_where_a_bias_hurts_held_out_data() -> None:
    """The mean error flips sign between the two halves of the calibration data: any bias fitted on one half doubles
    the other half's mean error, so held-out data says no bias; the fitted (in-sample) error would have said yes."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(4, 8, generator=g)
    Q = W + 0.3
    inputs, targets = _shift_batches([2.0, -2.0, 2.0, -2.0], W)
    layer, auto = _one_layer_block(W, Q, inputs)
    choice = choose_block_mode([auto], layer, inputs, targets, lambda m, h, kw: m(h), torch.device("cpu"))
    assert choice.mode == "none" and choice.fallback is None
    assert set(choice.scores) == {"none", "float", "sequential"}
    assert all(choice.scores[m] > choice.scores["none"] * 1.5 for m in ("float", "sequential"))
    assert not layer.bias.any()  # the stored bias is the layer's own
    before, after = auto.report_mse("none")
    x = torch.cat([_rows(b.hidden, b.valid) for b in inputs])
    assert before == after == pytest.approx(float(((x @ (W - Q).T) ** 2).mean()), rel=1e-4)
    # In-sample the all-data bias would look free (the overall mean error is ~0), so only held-out data decides.
    assert auto.sums.error_drop(*auto.sums.candidate("sequential", [0, 1])) >= 0


def test_auto_keeps_a_bias_that_pays_held_out() -> None:
    g = torch.Generator().manual_seed(3)
    W = torch.randn(4, 8, generator=g)
    Q = W + 0.3
    inputs, targets = _shift_batches([2.0, 2.0, 2.0, 2.0], W)
    layer, auto = _one_layer_block(W, Q, inputs)
    choice = choose_block_mode([auto], layer, inputs, targets, lambda m, h, kw: m(h), torch.device("cpu"))
    assert choice.mode != "none"
    # What is left is the zero-mean part (scored after the per-token RMS normalisation: 0.13 of "none" here).
    assert choice.scores[choice.mode] < 0.2 * choice.scores["none"]
    torch.testing.assert_close(layer.bias.data, auto.sums.candidate(choice.mode, [0, 1])[0])


def _final_divergence(model: nn.Module, reference: nn.Module, ids: torch.Tensor) -> float:
    """The race's final score of a finished model: the mean KL divergence of its next-token distributions from the
    float model's on the calibration windows, the sink position (0) left out."""
    with torch.no_grad(), kernels.use_backend("reference"):
        p = reference(ids).logits.float().log_softmax(-1)[:, 1:]
        q = model(ids).logits.float().log_softmax(-1)[:, 1:]
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_auto_race_stores_the_winning_stream(calib_ids, method) -> None:
    """Every candidate stream runs through the model; the one that ends closest to the float model wins, and the
    model it leaves is that stream: the KL divergence of its logits from the float model's, measured on the finished
    model, is the winner's score."""
    model = tiny_llama()
    report = quantize_model(model, _cfg(calib_ids, method=method))
    assert len(report.blocks) == 2
    assert set(report.blocks[0].bc_scores) == set(race_modes(1)) == set(RACE_MODES)
    last = report.blocks[-1].bc_scores
    chosen = min(last, key=last.get)
    assert all(b.bc_choice == chosen and b.bc_fallback is None for b in report.blocks)
    assert all(r.bc_choice == chosen for r in report.layers)
    assert "BC chosen" in report.format_table()
    assert _final_divergence(model, tiny_llama(), calib_ids) == pytest.approx(last[chosen], rel=1e-4)
    assert "KL divergence" in report.bc_summary and chosen in report.bc_summary
    if "none" in last:  # the BC-off stream is the guard
        assert last[chosen] <= last["none"]
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and not chosen.endswith("+sink"):
            assert not module.sink_bias.any(), name


#: Each race mode and the manual variant (config keywords) it reproduces.
MANUAL = {
    "none": {"bias_compensation": False},
    "float+sink": {"bc_target": "float", "bc_sink_tokens": 1},
    "sequential": {"bc_target": "sequential", "bc_sink_tokens": 0},
    "sequential+sink": {"bc_target": "sequential", "bc_sink_tokens": 1},
}


@pytest.mark.parametrize("mode", RACE_MODES)
def test_each_race_stream_is_its_manual_variant(calib_ids, monkeypatch, mode) -> None:
    """With RTN (weights independent of the stream) the stream of each mode is exactly the model of the manual
    variant: forced to lead after block 0 and to win, its stored biases and logits are that variant's. Block 0 is
    calibrated with the stated rule's mode leading, so a sequential mode's biases there come from its own stream's
    stopped passes, block 1's from the leading stream's passes: both paths are checked."""
    from optimum_bc.calibration import auto_race

    monkeypatch.setattr(
        auto_race, "leader", lambda scores, order: mode if mode in scores else min(scores, key=scores.get)
    )
    raced = tiny_llama()
    report = quantize_model(raced, _cfg(calib_ids, method="rtn"))
    assert [b.bc_choice for b in report.blocks] == [mode, mode]
    manual = tiny_llama()
    quantize_model(manual, _cfg(calib_ids, method="rtn", **MANUAL[mode]))
    theirs = dict(manual.named_modules())
    for name, module in raced.named_modules():
        if isinstance(module, QuantLinear):
            torch.testing.assert_close(module.bias, theirs[name].bias, rtol=1e-4, atol=1e-5)
            sink = theirs[name].sink_bias
            if sink is None:
                assert not module.sink_bias.any()
            else:
                torch.testing.assert_close(module.sink_bias, sink, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), kernels.use_backend("reference"):
        torch.testing.assert_close(raced(calib_ids).logits, manual(calib_ids).logits, rtol=1e-4, atol=1e-4)


def test_tiny_calibration_falls_back_to_the_stated_rule(calib_ids, caplog) -> None:
    """One calibration batch holds nothing out: the report says so and the block takes sequential + sink, the
    same biases as asking for that variant explicitly."""
    with caplog.at_level(logging.WARNING, logger="optimum_bc"):
        auto = tiny_llama()
        report = quantize_model(auto, _cfg(calib_ids[:4], num_samples=4))
    assert all(b.bc_choice == "sequential+sink" and "nothing to hold out" in b.bc_fallback for b in report.blocks)
    assert "nothing to hold out" in caplog.text and "nothing to hold out" in report.format_table()
    explicit = tiny_llama()
    quantize_model(explicit, _cfg(calib_ids[:4], num_samples=4, bc_target="sequential", bc_sink_tokens=1))
    ours, theirs = dict(auto.named_modules()), dict(explicit.named_modules())
    for name, module in ours.items():
        if isinstance(module, QuantLinear):
            torch.testing.assert_close(module.bias, theirs[name].bias, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(module.sink_bias, theirs[name].sink_bias, rtol=1e-4, atol=1e-5)
    assert held_out_folds([0], 1) is None and held_out_folds([0, 1, 2], 3) == [[0, 2], [1]]
    # A data-parallel rank holding global batches 3 and 4 of 6 splits them by their global index.
    assert held_out_folds([3, 4], 6) == [[1], [0]]


def test_config_default_is_auto_and_old_values_keep_their_meaning(calib_ids) -> None:
    assert BCQuantizationConfig().bc_target == "auto"
    for target in ("sequential", "float"):
        config = BCQuantizationConfig.from_dict(BCQuantizationConfig(bc_target=target).to_dict())
        assert config.bc_target == target
    assert BCQuantizationConfig.from_dict({"quant_method": "bc", "config_version": 1}).bc_sink_tokens == 0
    with pytest.raises(ValueError, match="bc_target='Auto'.*'auto'"):
        BCQuantizationConfig(bc_target="Auto")
    report = quantize_model(tiny_llama(), _cfg(calib_ids, bc_target="sequential"))
    assert all(b.bc_choice is None and not b.bc_scores for b in report.blocks)
    assert all(r.bc_choice is None for r in report.layers)


@pytest.mark.parametrize("pre_ln", [True, False])
def test_position_granularity_on_opt_matches_a_manual_per_position_forward(calib_ids, tmp_path, pre_ln) -> None:
    """OPT's MLP sees flattened tokens; the per-position table still applies by token position. The paper's setting
    (float target, per-position table), checked against fc1/fc2 computed by hand, and after save/reload."""
    model = tiny_opt(pre_ln=pre_ln)
    quantize_model(model, _cfg(calib_ids, bc_granularity="position", bc_target="float"))
    fc1 = model.model.decoder.layers[0].fc1
    assert isinstance(fc1, QuantLinear) and fc1.position_bias.shape == (32, fc1.out_features)
    assert fc1.position_bias.abs().sum() > 0
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    x = torch.randn(2 * 20, fc1.in_features, generator=torch.Generator().manual_seed(6))
    positions = torch.arange(20).expand(2, 20)
    with torch.no_grad(), token_positions(positions), kernels.use_backend("reference"):  # exact fp32 path
        out = fc1(x)
    manual = x @ fc1.dequantize_weight(torch.float32).T + fc1.bias + fc1.position_bias[positions.reshape(-1)]
    torch.testing.assert_close(out, manual, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="calibrated for 32 positions"), torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 40)))


def test_cli_quantize_defaults_to_auto(capsys) -> None:
    """The generated CLI leaves --bc-target unset, so the config's default ("auto") applies, and says so."""
    from optimum_bc.cli import _build_parser, main
    from optimum_bc.cli.args import config_kwargs

    kwargs = config_kwargs(_build_parser().parse_args(["quantize", "some/model", "--output", "out"]))
    assert "bc_target" not in kwargs and BCQuantizationConfig(**kwargs).bc_target == "auto"
    assert main(["quantize", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--bc-target {auto,float,sequential}" in text and '"auto" (default' in text


@pytest.mark.parametrize(("method", "mode"), [("gptq", m) for m in RACE_MODES] + [("erq", "sequential+sink")])
def test_each_model_of_the_race_is_its_manual_variant(calib_ids, monkeypatch, method, mode) -> None:
    """A weight method that reads its inputs races whole models: each candidate quantizes its own copy of every block
    on its own stream, so the model the race leaves is the manual variant's, codes and biases alike (the shared-weight
    race fitted every stream's weights on its leading stream: docs/bc_auto.md, seventh round)."""
    from optimum_bc.calibration import model_race

    monkeypatch.setattr(model_race, "leader", lambda scores, order: mode)
    raced = tiny_llama()
    report = quantize_model(raced, _cfg(calib_ids, method=method))
    assert [b.bc_choice for b in report.blocks] == [mode, mode]
    assert set(report.blocks[-1].bc_scores) == set(RACE_MODES) and "whole models" in report.bc_summary
    assert all(b.bc_choice_seconds > 0 for b in report.blocks)
    manual = tiny_llama()
    alone = quantize_model(manual, _cfg(calib_ids, method=method, **MANUAL[mode]))
    assert [r.name for r in report.layers] == [r.name for r in alone.layers]
    # The report's passes count every candidate's: four calibrations' worth.
    assert report.blocks[0].block_passes > 3 * alone.blocks[0].block_passes
    theirs = dict(manual.named_modules())
    for name, module in raced.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(module.qweight, theirs[name].qweight), name
            assert torch.equal(module.bias, theirs[name].bias), name
            sink = theirs[name].sink_bias  # the auto config's layout keeps a (zero) sink row where it has none
            assert torch.equal(module.sink_bias, sink) if sink is not None else not module.sink_bias.any(), name
    with torch.no_grad(), kernels.use_backend("reference"):
        assert torch.equal(raced(calib_ids).logits, manual(calib_ids).logits)


def test_model_race_falls_back_to_shared_weights_when_copies_do_not_fit(calib_ids, monkeypatch, caplog) -> None:
    """Packed copies of every candidate's model that would take more than half the available CPU memory: the
    shared-weight race runs instead, and the log says why and what to set."""
    from optimum_bc.calibration import model_race

    class Tiny:
        available = 1024

    monkeypatch.setattr(model_race.psutil, "virtual_memory", lambda: Tiny())
    with caplog.at_level(logging.WARNING, logger="optimum_bc"):
        report = quantize_model(tiny_llama(), _cfg(calib_ids))
    assert "whole models" not in report.bc_summary and "auto race" in report.bc_summary
    assert "shared-weight race" in caplog.text and "bc_target" in caplog.text


@pytest.mark.parametrize("mode", ["none", "sequential"])
def test_a_sinkless_winner_of_the_model_race_saves_and_reloads_exactly(calib_ids, monkeypatch, tmp_path, mode) -> None:
    """A winner without first-token bias (or without any bias) still has the layout the saved config describes: zero
    sink rows where BC puts them, so the checkpoint reloads bit for bit."""
    from optimum_bc.calibration import model_race

    monkeypatch.setattr(model_race, "leader", lambda scores, order: mode)
    tiny_llama().save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=_cfg(calib_ids))
    assert model.quantization_report.blocks[-1].bc_choice == mode
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
    assert not reloaded.model.layers[0].self_attn.q_proj.sink_bias.any()
