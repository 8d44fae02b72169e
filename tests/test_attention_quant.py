"""Activation quantization of attention's batched MatMuls (act_attention): the registered attention function, its
per-module scales fitted in calibration, save/reload, and the refusals."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, BitImageProcessor

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc.calibration.attention_observers import ATTENTION_MODULES_ATTR
from optimum_bc.formats.activations import fake_quantize
from optimum_bc.layers.attention_quant import (
    ATTN_IMPLEMENTATION,
    INPUTS,
    AttentionQuantizer,
    quantized_attention,
)
from optimum_bc.vision import build_image_calibration

from .conftest import VOCAB, tiny_llama
from .test_vision import PROCESSOR, _images, tiny_dinov2, tiny_vit


def _cfg(calib_ids: torch.Tensor, **kwargs) -> BCQuantizationConfig:
    options = {"bits": 8, "group_size": -1, "method": "rtn", "num_samples": 16, "seq_len": 32, "act_bits": 8}
    return BCQuantizationConfig(dataset=calib_ids, act_attention=True, **(options | kwargs))


def _vision_cfg(**kwargs) -> BCQuantizationConfig:
    options = {"bits": 8, "group_size": -1, "method": "rtn", "act_bits": 8, "num_samples": 8, "batch_size": 4}
    return BCQuantizationConfig(dataset=_images(8), act_attention=True, **(options | kwargs))


def _pixels(n: int = 4) -> torch.Tensor:
    samples = build_image_calibration(_images(n, seed=3), BitImageProcessor(**PROCESSOR), n)
    return torch.cat([s["pixel_values"] for s in samples])


def _manual_attention(module, quant: AttentionQuantizer, q, k, v, mask) -> torch.Tensor:
    """Eager attention written out: fake-quantize q, k, v with the module's scales, softmax, fake-quantize P, PV."""

    def fq(name: str, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, getattr(quant, f"{name}_scale"), getattr(quant, f"{name}_zero"), quant.specs[name])

    groups = getattr(module, "num_key_value_groups", 1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = fq("query", q) @ fq("key", k).transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    probs = fq("probs", torch.softmax(scores, dim=-1))
    return (probs @ fq("value", v)).transpose(1, 2)


def _check_against_manual(module, heads: int, kv_heads: int, head_dim: int, causal: bool) -> None:
    quant = module.attn_quant
    assert all(float(getattr(quant, f"{n}_scale")) > 0 for n in INPUTS)
    assert float(quant.probs_zero) == 0.0  # probabilities on the unsigned grid
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, heads, 9, head_dim, generator=g)
    k, v = torch.randn(2, kv_heads, 9, head_dim, generator=g), torch.randn(2, kv_heads, 9, head_dim, generator=g)
    mask = None
    if causal:
        mask = torch.full((9, 9), torch.finfo(torch.float32).min).triu(1).expand(2, 1, 9, 9)
    with torch.no_grad():
        out, probs = quantized_attention(module, q, k, v, mask, scaling=head_dim**-0.5)
        expected = _manual_attention(module, quant, q, k, v, mask)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    step = float(quant.probs_scale)
    codes = probs / step
    torch.testing.assert_close(codes, codes.round(), atol=1e-3, rtol=0)  # P̂ is on the grid


@pytest.mark.usefixtures("one_thread")
def test_llama_attention_equals_manual_eager_with_the_same_scales(calib_ids) -> None:
    model = tiny_llama()
    quantize_model(model, _cfg(calib_ids))
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert getattr(model.config, ATTENTION_MODULES_ATTR) == [f"model.layers.{i}.self_attn" for i in range(2)]
    attn = model.model.layers[1].self_attn
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    _check_against_manual(attn, config.num_attention_heads, config.num_key_value_heads, head_dim, causal=True)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", ["dinov2", "vit"])
def test_vision_attention_equals_manual_eager_with_the_same_scales(family) -> None:
    model = tiny_dinov2() if family == "dinov2" else tiny_vit()
    calibration = build_image_calibration(_images(8), BitImageProcessor(**PROCESSOR), 8)
    quantize_model(model, _vision_cfg(), calibration=calibration)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    attention = [m for m in model.modules() if isinstance(getattr(m, "attn_quant", None), AttentionQuantizer)]
    assert len(attention) == 2
    _check_against_manual(attention[0], 4, 4, 16, causal=False)


@pytest.mark.usefixtures("one_thread")
def test_llama_save_reload_identical(calib_ids, tmp_path) -> None:
    tiny_llama().save_pretrained(tmp_path / "float")
    config = _cfg(calib_ids, bits=4, group_size=32, act_scale="percentile")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.config._attn_implementation == ATTN_IMPLEMENTATION
    for name in INPUTS:
        saved = getattr(model.model.layers[1].self_attn.attn_quant, f"{name}_scale")
        assert torch.equal(getattr(reloaded.model.layers[1].self_attn.attn_quant, f"{name}_scale"), saved)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # padded rows go through the additive mask
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


@pytest.mark.usefixtures("one_thread")
def test_dinov2_save_reload_identical(tmp_path) -> None:
    tiny_dinov2().save_pretrained(tmp_path / "float")
    BitImageProcessor(**PROCESSOR).save_pretrained(tmp_path / "float")
    model = AutoModel.from_pretrained(tmp_path / "float", quantization_config=_vision_cfg(act_scale="minmax"))
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModel.from_pretrained(tmp_path / "q")
    assert reloaded.config._attn_implementation == ATTN_IMPLEMENTATION
    pixels = _pixels()
    with torch.no_grad():
        assert torch.equal(
            reloaded(pixel_values=pixels).last_hidden_state, model(pixel_values=pixels).last_hidden_state
        )


@pytest.mark.usefixtures("one_thread")
def test_attention_error_grows_as_bits_drop(calib_ids) -> None:
    """Weights and Linear inputs stay at 8 bits; only the attention MatMul inputs change: 8 < 6 < 4 bits."""
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = tiny_llama()(ids).logits
    model = tiny_llama()
    quantize_model(model, _cfg(calib_ids, bias_compensation=False))
    errors = {}
    for bits in (8, 6, 4):
        for module in model.modules():
            quant = getattr(module, "attn_quant", None)
            if isinstance(quant, AttentionQuantizer):
                for spec_name, spec in quant.specs.items():
                    quant.specs[spec_name] = type(spec)(bits, spec.sym, spec.granularity, True)  # dynamic min-max
        with torch.no_grad():
            out = model(ids).logits
        errors[bits] = float((out - ref).square().mean() / ref.square().mean())
    assert errors[8] < errors[6] < errors[4]
    assert errors[4] > 3 * errors[8]


@pytest.mark.usefixtures("one_thread")
def test_attention_bits_follow_act_bits_end_to_end(calib_ids) -> None:
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = tiny_llama()(ids).logits
    errors = {}
    for act_bits in (8, 4):
        model = tiny_llama()
        quantize_model(model, _cfg(calib_ids, act_bits=act_bits, bias_compensation=False))
        with torch.no_grad():
            errors[act_bits] = float((model(ids).logits - ref).square().mean() / ref.square().mean())
        model.set_attn_implementation("eager")  # the same model with float attention
        with torch.no_grad():
            float_attention = float((model(ids).logits - ref).square().mean() / ref.square().mean())
        assert float_attention < errors[act_bits]  # quantizing the attention adds error
    assert errors[8] < errors[4]


def test_act_attention_needs_act_bits() -> None:
    with pytest.raises(ValueError, match="act_attention=True is invalid.*act_bits set.*Fix: act_bits=8"):
        BCQuantizationConfig(act_attention=True)
    with pytest.raises(ValueError, match="act_attention=1 is invalid.*Fix"):
        BCQuantizationConfig(act_bits=8, act_attention=1)


def test_unsupported_attention_implementation_refused_before_calibration(calib_ids) -> None:
    model = tiny_llama()
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(
        ValueError, match="attn_implementation='flex_attention'.*Fix: load it with attn_implementation"
    ):
        quantize_model(model, _cfg(calib_ids))
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # nothing was quantized
    assert not hasattr(model.model.layers[0].self_attn, "attn_quant")


def test_model_without_attention_interface_refused(calib_ids, monkeypatch) -> None:
    model = tiny_llama()
    monkeypatch.setattr(type(model), "_supports_attention_backend", False)
    with pytest.raises(ValueError, match="does not route its attention through.*Fix: act_attention=False"):
        quantize_model(model, _cfg(calib_ids))


@pytest.mark.usefixtures("one_thread")
def test_dequantize_goes_back_to_float_attention(calib_ids, tmp_path) -> None:
    tiny_llama().save_pretrained(tmp_path / "float")
    config = _cfg(calib_ids, bc_sink_tokens=0)  # no sink biases: the dense save is a plain float checkpoint
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    model.dequantize()
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, AttentionQuantizer) for m in model.modules())
    model.save_pretrained(tmp_path / "dense")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w8a8_w4a8_w4a4_with_attention_run_end_to_end_in_order(calib_ids, method) -> None:
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = tiny_llama()(ids).logits
    errors = {}
    for scheme, bits, group_size, act_bits in (("W8A8", 8, -1, 8), ("W4A8", 4, 32, 8), ("W4A4", 4, 32, 4)):
        model = tiny_llama()
        quantize_model(model, _cfg(calib_ids, bits=bits, group_size=group_size, act_bits=act_bits, method=method))
        assert model.model.layers[0].self_attn.attn_quant.specs["query"].bits == act_bits
        with torch.no_grad():
            errors[scheme] = float((model(ids).logits - ref).square().mean() / ref.square().mean())
    assert errors["W8A8"] < errors["W4A8"] < errors["W4A4"]
