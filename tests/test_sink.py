"""Sink-token bias compensation: closed form, KV-cache generation, left padding, reload, OPT, bad input."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_bc import BCQuantizationConfig, QuantLinear, quantize_model
from optimum_bc.algorithms.compensation import InputMoments, ResidualMoments
from optimum_bc.layers.positions import token_positions

from .conftest import VOCAB, tiny_llama, tiny_opt


def _cfg(calib_ids: torch.Tensor, **kwargs) -> BCQuantizationConfig:
    # The sink mechanics under test need the variant that always fits a sink bias (auto may choose none).
    options = {
        "bits": 3,
        "group_size": 32,
        "method": "gptq",
        "num_samples": 16,
        "seq_len": 32,
        "bc_target": "sequential",
    }
    options |= kwargs
    return BCQuantizationConfig(dataset=calib_ids, **options)


def test_sink_bias_equals_per_class_means() -> None:
    torch.manual_seed(0)
    tokens, d_in, d_out, sink = 240, 12, 7, 2
    positions = torch.arange(tokens) % 24
    x = torch.randn(tokens, d_in) + 3 * (positions < sink).float()[:, None] * torch.randn(d_in)
    x_q = x + 0.1 * torch.randn(tokens, d_in)
    W, Q = torch.randn(d_out, d_in), torch.randn(d_out, d_in)
    moments = InputMoments(d_in, "sequential", sink_tokens=sink)
    for chunk in range(0, tokens, 50):
        rows = slice(chunk, chunk + 50)
        moments.add_batch(x[rows], x_q[rows], positions[rows])
    comp = moments.compensate(W, Q, torch.float64)
    residual = x @ W.T - x_q @ Q.T
    late = positions >= sink
    torch.testing.assert_close(comp.bias.float(), residual[late].mean(0), atol=1e-4, rtol=1e-4)
    for t in range(sink):
        expected = residual[positions == t].mean(0) - residual[late].mean(0)
        torch.testing.assert_close(comp.sink[t].float(), expected, atol=1e-4, rtol=1e-4)
    full = comp.bias[None].float() + torch.cat([comp.sink.float(), torch.zeros(1, d_out)])[positions.clamp(max=sink)]
    streamed = ResidualMoments(d_out, classes=sink + 1)
    streamed.add_batch(residual, positions)
    assert streamed.mse() == pytest.approx(float((residual**2).mean()), rel=1e-4)
    assert streamed.mse(comp.applied) == pytest.approx(float(((residual - full) ** 2).mean()), rel=1e-3)
    assert streamed.mse(comp.applied) < streamed.mse()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_quantized_model_has_sink_bias_and_kv_cache_matches_full_forward(family, calib_ids) -> None:
    model = tiny_llama() if family == "llama" else tiny_opt()
    report = quantize_model(model, _cfg(calib_ids, bc_sink_tokens=1))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.sink_bias is not None and m.sink_bias.shape == (1, m.out_features) for m in layers)
    assert any(torch.count_nonzero(m.sink_bias) for m in layers)
    assert all(r.mse_after <= r.mse_before * (1 + 1e-5) for r in report.layers)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :9], use_cache=True)
        step = [out.logits]
        cache = out.past_key_values
        for t in range(9, 12):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            step.append(out.logits)
    torch.testing.assert_close(torch.cat(step, dim=1), full, atol=1e-4, rtol=1e-4)
    generated = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 9)


def test_sink_bias_is_added_only_at_the_first_positions(calib_ids) -> None:
    model = tiny_llama()
    quantize_model(model, _cfg(calib_ids, bc_sink_tokens=2))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 6, layer.in_features)
    positions = torch.tensor(
        [[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9], [0, 0, 0, 1, 2, 3]]
    )  # fresh, cached, left-padded
    with token_positions(positions):
        out = layer(x)
    layer_sink = layer.sink_bias
    layer.sink_bias = None
    plain = layer(x)
    extra = out - plain
    for b in range(3):
        for t in range(6):
            p = int(positions[b, t])
            expected = layer_sink[p] if p < 2 else torch.zeros(layer.out_features)
            torch.testing.assert_close(extra[b, t], expected, atol=1e-5, rtol=1e-5)


def test_left_padding_gives_the_unpadded_logits(calib_ids) -> None:
    model = tiny_llama()
    quantize_model(model, _cfg(calib_ids, bc_sink_tokens=1))
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(ids).logits[:, -1]
        left = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, -1]
    torch.testing.assert_close(left, plain, atol=1e-4, rtol=1e-4)


def test_sink_bias_saved_and_reloaded_bit_identical(calib_ids, tmp_path) -> None:
    tiny_llama().save_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=_cfg(calib_ids))
    assert model.config.quantization_config.bc_sink_tokens == 1
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    x = torch.randint(0, VOCAB, (2, 16))
    assert torch.equal(reloaded(x).logits, model(x).logits)
    layer = reloaded.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.sink_bias, model.model.layers[0].self_attn.q_proj.sink_bias)


def test_position_table_follows_kv_cache_positions(calib_ids) -> None:
    model = tiny_llama()
    quantize_model(model, _cfg(calib_ids, method="rtn", bc_granularity="position"))
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        last = model(ids[:, 6:], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(last, full[:, 6:], atol=1e-4, rtol=1e-4)


def test_no_sink_and_version_1_configs() -> None:
    assert BCQuantizationConfig().bc_sink_tokens == 1
    assert BCQuantizationConfig(bc_sink_tokens=0).layer_sink_tokens == 0
    assert BCQuantizationConfig(bias_compensation=False).layer_sink_tokens == 0
    old = BCQuantizationConfig.from_dict({"quant_method": "bc", "bits": 4, "config_version": 1})
    assert old.bc_sink_tokens == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bc_sink_tokens": -1}, "bc_sink_tokens=-1 is invalid"),
        ({"bc_sink_tokens": 1.5}, "bc_sink_tokens=1.5 is invalid"),
        ({"bc_sink_tokens": 8, "seq_len": 8}, "fewer than seq_len=8"),
    ],
)
def test_bad_sink_values_fail_with_message(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        BCQuantizationConfig(**kwargs)


def test_layer_outside_its_block_needs_positions(calib_ids) -> None:
    model = tiny_llama()
    quantize_model(model, _cfg(calib_ids, bc_sink_tokens=1))
    layer = model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="no token positions were published"):
        layer(torch.randn(1, 4, layer.in_features))
