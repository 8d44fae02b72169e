"""Activation quantization (act_bits): the fake quantizer, the static scale fits, and W/A quantization of tiny LMs."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_bc import BCQuantizationConfig, QuantLinear, quantize_model
from optimum_bc.formats.activations import ActObserver, ActSpec, fake_quantize, quantize_input, range_params

from .conftest import VOCAB, tiny_llama


def _cfg(calib_ids: torch.Tensor, **kwargs) -> BCQuantizationConfig:
    options = {"bits": 8, "group_size": -1, "method": "gptq", "num_samples": 16, "seq_len": 32, "act_bits": 8}
    return BCQuantizationConfig(dataset=calib_ids, **(options | kwargs))


def _logit_error(model: torch.nn.Module, ref: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(ids).logits
    return float((out - ref).square().mean() / ref.square().mean())


@pytest.mark.parametrize("sym", [False, True])
def test_fake_quantize_stays_on_the_grid_within_half_a_step(sym) -> None:
    spec = ActSpec(bits=4, sym=sym, granularity="tensor", dynamic=False)
    x = torch.randn(1000) * 3
    scale, zero = range_params(x.min(), x.max(), spec)
    q = fake_quantize(x, scale, zero, spec)
    codes = q / scale + zero
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert len(torch.unique(codes.round())) <= 2**4
    assert float((q - x).abs().max()) <= float(scale) / 2 + 1e-5


def test_dynamic_per_token_has_one_grid_per_row() -> None:
    spec = ActSpec(bits=8, sym=False, granularity="token", dynamic=True)
    x = torch.randn(3, 5, 64) * torch.tensor([1.0, 10.0, 100.0, 0.1, 1.0]).view(1, 5, 1)
    err = (quantize_input(x, spec) - x).abs().amax(-1)
    # each row's error follows its own range, so small rows stay accurate
    assert float(err[:, 3].max()) < 0.01 * float(err[:, 2].max())


def test_mse_and_percentile_beat_minmax_on_heavy_tails() -> None:
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))  # heavy tails: the extremes stretch min-max
    errors = {}
    for method in ("minmax", "percentile", "mse"):
        spec = ActSpec(bits=4, sym=False, granularity="tensor", dynamic=False)
        obs = ActObserver(spec, method)
        obs.add_batch(x)
        scale, zero = obs.params()
        errors[method] = float((fake_quantize(x, scale, zero, spec) - x).square().mean())
    assert errors["mse"] < errors["percentile"] < errors["minmax"]
    assert errors["mse"] < 0.5 * errors["minmax"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"act_bits": 5}, "act_bits=5"),
        ({"act_bits": 8, "act_scale": "max"}, "act_scale='max'"),
        ({"act_bits": 8, "act_granularity": "token"}, 'act_scale="dynamic"'),
        ({"act_bits": 8, "act_granularity": "row"}, "act_granularity='row'"),
        ({"act_bits": 8, "act_sym": 1}, "act_sym=1"),
    ],
)
def test_bad_activation_fields_fail_with_the_fix(kwargs, message) -> None:
    with pytest.raises(ValueError, match="Fix:") as err:
        BCQuantizationConfig(**kwargs)
    assert message in str(err.value)


def test_activation_fields_round_trip_through_to_dict() -> None:
    config = BCQuantizationConfig(act_bits=6, act_scale="percentile", act_sym=True)
    again = BCQuantizationConfig(**config.to_dict())
    assert (again.act_bits, again.act_scale, again.act_granularity, again.act_sym) == (6, "percentile", "tensor", True)
    assert (
        BCQuantizationConfig(act_bits=8, act_scale="dynamic", bias_compensation=False, method="rtn").needs_calibration
        is False
    )
    assert BCQuantizationConfig(act_bits=8, bias_compensation=False, method="rtn").needs_calibration is True


@pytest.mark.usefixtures("one_thread")
def test_w8a8_close_w4a4_worse_and_bc_helps(calib_ids) -> None:
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = tiny_llama()(ids).logits
    errors = {}
    for name, bits, act_bits, bc in (("w8a8", 8, 8, True), ("w4a4", 4, 4, True), ("w4a4_nobc", 4, 4, False)):
        model = tiny_llama()
        quantize_model(model, _cfg(calib_ids, bits=bits, act_bits=act_bits, bias_compensation=bc, method="rtn"))
        errors[name] = _logit_error(model, ref, ids)
    assert errors["w8a8"] < 0.01
    assert errors["w4a4"] > 3 * errors["w8a8"]
    assert errors["w4a4"] < errors["w4a4_nobc"]


@pytest.mark.usefixtures("one_thread")
def test_dynamic_per_token_w4a8_runs_and_is_between(calib_ids) -> None:
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = tiny_llama()(ids).logits
    errors = {}
    for act_bits in (8, 4):
        model = tiny_llama()
        config = _cfg(calib_ids, bits=4, act_bits=act_bits, act_scale="dynamic", act_granularity="token")
        quantize_model(model, config)
        layer = model.model.layers[0].mlp.down_proj
        assert "input_scale" not in dict(layer.named_buffers())
        errors[act_bits] = _logit_error(model, ref, ids)
    assert errors[8] < errors[4]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("target", ["auto", "sequential", "float"])
def test_bc_targets_the_quantized_activations(calib_ids, target) -> None:
    """The first layer's compensation is mean(W x - W_q Q_a(x)) over the calibration tokens, for every target (the
    float target's quantized layer also sees the float input through its input quantizer)."""
    float_model = tiny_llama()
    seen = {}
    block = float_model.model.layers[0]
    handle = block.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    with torch.no_grad():
        float_model(calib_ids)
    handle.remove()
    x = seen["x"].reshape(-1, 64)
    W = block.self_attn.q_proj.weight.detach()
    model = tiny_llama()
    config = _cfg(calib_ids, bits=4, act_bits=4, bc_sink_tokens=0, method="rtn", bc_target=target)
    quantize_model(model, config)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.input_scale.shape == (1,)
    x_hat = quantize_input(x, layer.act_spec, layer.input_scale, layer.input_zero)
    expected = (x @ W.T - x_hat @ layer.dequantize_weight(torch.float32).T).mean(0)
    torch.testing.assert_close(layer.bias.float(), expected, atol=1e-4, rtol=1e-3)
    # Without the activation error in the target, the bias would be measurably different.
    weight_only = (x @ W.T - x @ layer.dequantize_weight(torch.float32).T).mean(0)
    assert float((weight_only - expected).abs().max()) > 1e-3
    # The report's error before BC is measured against the same target: it includes the activation error too.
    residual = x @ W.T - x_hat @ layer.dequantize_weight(torch.float32).T
    (row,) = [r for r in model.quantization_report.layers if r.name == "model.layers.0.self_attn.q_proj"]
    assert row.mse_before == pytest.approx(float(residual.square().mean()), rel=1e-3)
    assert row.mse_after == pytest.approx(float((residual - expected).square().mean()), rel=1e-3)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_dynamic_scales_take_every_layers_target_from_one_float_pass(calib_ids, granularity) -> None:
    """Dynamic scales need no fitting, so the float target's Q_a(x) of every layer comes from stage 0's float pass:
    no stopped float pass per stage, and the last stage's layer still gets mean(W x - W_q Q_a(x))."""
    float_model = tiny_llama()
    seen = {}
    down = float_model.model.layers[0].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    with torch.no_grad():
        float_model(calib_ids)
    handle.remove()
    x = seen["x"].reshape(-1, down.in_features)
    model = tiny_llama()
    options = {"act_scale": "dynamic", "act_granularity": granularity, "batch_size": calib_ids.shape[0]}
    config = _cfg(calib_ids, bits=4, act_bits=4, bc_sink_tokens=0, method="rtn", bc_target="float", **options)
    report = quantize_model(model, config)
    assert all(block.stopped_passes == 0 for block in report.blocks)
    layer = model.model.layers[0].mlp.down_proj
    x_hat = quantize_input(x, layer.act_spec)
    expected = (x @ down.weight.detach().T - x_hat @ layer.dequantize_weight(torch.float32).T).mean(0)
    torch.testing.assert_close(layer.bias.float(), expected, atol=1e-4, rtol=1e-3)


@pytest.mark.usefixtures("one_thread")
def test_w4a8_save_reload_exact(calib_ids, tmp_path) -> None:
    tiny_llama().save_pretrained(tmp_path / "float")
    config = _cfg(calib_ids, bits=4, group_size=32, act_bits=8, act_scale="percentile")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    layer = reloaded.model.layers[1].mlp.down_proj
    assert torch.equal(layer.input_scale, model.model.layers[1].mlp.down_proj.input_scale)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_export_to_weight_only_formats_is_refused() -> None:
    from optimum_bc.export import COMPRESSED_TENSORS, GPTQ, check_config_exportable

    config = BCQuantizationConfig(bits=4, group_size=128, act_bits=8, bc_sink_tokens=0)
    for save_format in (COMPRESSED_TENSORS, GPTQ):
        with pytest.raises(ValueError, match="act_bits=8: activation quantization.*Fix"):
            check_config_exportable(config, save_format)


def test_fused_experts_refuse_activation_quantization_before_calibration(monkeypatch) -> None:
    from optimum_bc.calibration.calibrator import BlockCalibrator

    from .tiny_families import SEQ_LEN, tiny_model
    from .tiny_families import VOCAB as FAMILY_VOCAB

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a block was quantized before the refusal")

    monkeypatch.setattr(BlockCalibrator, "_finish_stage", never)
    ids = list(torch.randint(3, FAMILY_VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1)))
    config = BCQuantizationConfig(bits=4, group_size=-1, act_bits=8, dataset=ids, num_samples=2, seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match="act_bits=8 is not available for model_type 'mixtral'.*Fix: act_bits=None"):
        quantize_model(tiny_model("mixtral"), config)
