"""Mixture of experts: per-expert Hessians from routed tokens only, RTN for unrouted experts, per-expert BC, packed
storage that survives save/reload, on three expert layouts (Mixtral ``[E, out, in]``, Qwen3-MoE, GPT-OSS's
transposed ``[E, in, out]`` with its own expert biases)."""

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc.algorithms import get_algorithm
from optimum_bc.calibration.expert_calibration import ExpertCalibrator
from optimum_bc.calibration.experts import EXPERTS_ATTR, PackedExperts, packed_expert_modules
from optimum_bc.layers import kernels

from .tiny_families import SEQ_LEN, VOCAB, tiny_model


def _ids(seed: int = 1) -> list[torch.Tensor]:
    return list(torch.randint(3, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed)))


def _cfg(method: str = "gptq", **kw: object) -> BCQuantizationConfig:
    return BCQuantizationConfig(
        bits=kw.pop("bits", 4), group_size=-1, method=method, dataset=_ids(), num_samples=2, seq_len=SEQ_LEN, **kw
    )


@dataclass
class _Batch:
    hidden: torch.Tensor
    valid: torch.Tensor


def _moe_block(model_type: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The sparse MoE block of block 0 and its experts module (from the module holding 3-D parameters)."""
    model = tiny_model(model_type)
    layer = model.model.layers[0]
    moe = layer.mlp
    return moe, moe.experts


def _batches(hidden_size: int, padded: bool = True) -> list[_Batch]:
    g = torch.Generator().manual_seed(3)
    out = []
    for b in range(2):
        valid = torch.ones(2, 12, dtype=torch.bool)
        if padded and b == 1:
            valid[1, 8:] = False  # right padding: never in a statistic
        out.append(_Batch(torch.randn(2, 12, hidden_size, generator=g), valid))
    return out


def _run(block: torch.nn.Module, batch: _Batch) -> torch.Tensor:
    out = block(batch.hidden)
    return out[0] if isinstance(out, tuple) else out


class _Recording(get_algorithm("gptq")):  # type: ignore[misc]
    """GPTQ that keeps its Hessian (for comparison with a manual computation)."""

    seen: list[tuple[int, torch.Tensor]] = []

    def quantize(self, weight: torch.Tensor):  # noqa: ANN201
        _Recording.seen.append((self.num_tokens, self.hessian(weight.device).clone()))
        return super().quantize(weight)


def _options(config: BCQuantizationConfig) -> dict:
    return {
        "bits": config.bits,
        "group_size": config.group_size,
        "sym": config.sym,
        "damp_percent": config.damp_percent,
        "desc_act": config.desc_act,
        "format": config.format,
    }


@torch.no_grad()
def test_expert_hessians_come_from_routed_tokens_only() -> None:
    moe, experts = _moe_block("mixtral")
    batches = _batches(experts.hidden_dim)
    # Manual: the router's top-k of every valid token; expert e's Hessian is 2 X_e^T X_e / n_e of its tokens.
    rows: dict[int, list[torch.Tensor]] = {e: [] for e in range(experts.num_experts)}
    for batch in batches:
        x = batch.hidden.reshape(-1, experts.hidden_dim)[batch.valid.reshape(-1)]
        _, _, index = moe.gate(x)
        for e in rows:
            rows[e].append(x[(index == e).any(-1)])
    config = _cfg(bias_compensation=False)
    _Recording.seen = []
    reports = ExpertCalibrator(config, _options(config), _Recording, _run).quantize(
        moe, "", batches, SimpleNamespace()
    )
    gate_up = _Recording.seen[: experts.num_experts]  # gate_up first (forward order), then down
    for e, (count, hessian) in enumerate(gate_up):
        x = torch.cat(rows[e]).float()
        assert count == x.shape[0] > 0
        torch.testing.assert_close(hessian, 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    assert [r.tokens for r in reports if r.name == "experts.gate_up_proj"] == [len(torch.cat(rows[e])) for e in rows]
    assert isinstance(experts.parametrizations.gate_up_proj[0], PackedExperts)


def test_unrouted_expert_falls_back_to_rtn_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model("gpt_oss")
    for layer in model.model.layers:
        layer.mlp.router.bias.data[3] = -1e4  # no token ever picks expert 3
    with caplog.at_level("WARNING", logger="optimum_bc"):
        report = quantize_model(model, _cfg())
    assert "model.layers.0.mlp.experts.gate_up_proj expert 3: 0 calibration tokens" in caplog.text
    rows = [r for r in report.experts if r.expert == 3]
    assert rows and all(r.tokens == 0 and r.method == "rtn" for r in rows)
    assert all(r.tokens > 0 and r.method == "gptq" for r in report.experts if r.expert != 3)
    assert "RTN (no token): [3]" in report.format_table()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
@torch.no_grad()
def test_bc_lowers_the_moe_block_output_error(model_type: str) -> None:
    moe, experts = _moe_block(model_type)
    reference = copy.deepcopy(moe)
    batches = _batches(model_type == "gpt_oss" and experts.hidden_size or experts.hidden_dim, padded=False)
    errors = {}
    for bc in (False, True):
        block = copy.deepcopy(moe)
        config = _cfg("rtn", bits=3, bias_compensation=bc)
        reports = ExpertCalibrator(config, _options(config), get_algorithm("rtn"), _run).quantize(
            block, "", batches, SimpleNamespace()
        )
        errors[bc] = sum(float(((_run(block, b) - _run(reference, b)) ** 2).mean()) for b in batches)
        if bc:
            compensated = [r for r in reports if r.mse_before is not None]
            assert compensated and all(r.mse_after < r.mse_before for r in compensated)
    assert errors[True] < errors[False]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_packed_experts_save_reload_equal_logits_and_generate(model_type: str, tmp_path) -> None:
    model = tiny_model(model_type)
    float_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.dim() == 3)
    report = quantize_model(model, _cfg())
    packed = packed_expert_modules(model)
    assert len(packed) == 2 * len(model.model.layers)  # gate_up and down of every block
    assert sum(p.weight_bytes() for p in packed.values()) < 0.3 * float_bytes
    router = model.model.layers[0].mlp.router if model_type == "gpt_oss" else model.model.layers[0].mlp.gate
    assert router.weight.dtype.is_floating_point and not hasattr(router, "qweight")  # routers stay float
    x = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(x).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert set(getattr(reloaded.config, EXPERTS_ATTR)) == set(packed)
    assert set(packed_expert_modules(reloaded)) == set(packed)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, logits)
    out = reloaded.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 15)
    assert report.tokens_per_expert()


def test_report_lists_tokens_per_expert(tmp_path) -> None:
    from optimum_bc.integrations.quantizer import load_report

    model = tiny_model("mixtral")
    report = quantize_model(model, _cfg())
    counts = report.tokens_per_expert()
    assert set(counts) == {
        f"model.layers.{i}.mlp.experts.{p}"
        for i in range(len(model.model.layers))
        for p in ("gate_up_proj", "down_proj")
    }
    top_k = model.config.num_experts_per_tok
    for per_expert in counts.values():  # every calibration token reaches top_k experts (no padding here)
        assert len(per_expert) == model.config.num_local_experts
        assert sum(per_expert) == report.calibration_tokens * top_k
    assert "tokens per expert" in report.format_table()
    model.save_pretrained(tmp_path)
    assert load_report(str(tmp_path)).tokens_per_expert() == counts


def test_experts_stay_parametrized_and_reject_float_assignment() -> None:
    model = tiny_model("qwen3_moe")
    quantize_model(model, _cfg("rtn", bias_compensation=False))
    experts = model.model.layers[0].mlp.experts
    assert parametrize.is_parametrized(experts, "gate_up_proj")
    weight = experts.gate_up_proj
    assert weight.dim() == 3 and weight.dtype == torch.float32
    with pytest.raises(RuntimeError, match="right_inverse"):
        experts.gate_up_proj = torch.zeros_like(weight)


@pytest.mark.parametrize("save_format", ["compressed-tensors", "gptq"])
def test_export_of_packed_experts_is_refused(save_format: str, tmp_path) -> None:
    from optimum_bc.export import export_model

    model = tiny_model("qwen3_moe")
    quantize_model(model, _cfg("rtn", bias_compensation=False, bc_sink_tokens=0))
    with pytest.raises(ValueError, match="packed mixture-of-experts weights"):
        export_model(model, tmp_path / "out", format=save_format)
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_experts_in_modules_to_not_convert_stay_float() -> None:
    model = tiny_model("mixtral")
    config = _cfg(modules_to_not_convert=["lm_head", "experts"])
    report = quantize_model(model, config)
    assert not packed_expert_modules(model) and not report.experts
    assert model.model.layers[0].mlp.experts.gate_up_proj.dim() == 3


def test_dequantize_folds_into_own_expert_biases_and_refuses_hooked_ones() -> None:
    x = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    model = tiny_model("gpt_oss")  # BC folds into down_proj_bias: the float model holds everything
    quantize_model(model, _cfg())
    with torch.no_grad(), kernels.use_backend("reference"):  # the exact path, which dequantize reproduces
        logits = model(x).logits
    with torch.no_grad():
        model.dequantize()
        assert not packed_expert_modules(model)
        assert model.model.layers[0].mlp.experts.down_proj.dim() == 3
        torch.testing.assert_close(model(x).logits, logits, rtol=1e-5, atol=1e-5)
    mixtral = tiny_model("mixtral")  # BC biases live only in the hook: refused, nothing changed
    quantize_model(mixtral, _cfg())
    with pytest.raises(ValueError, match="per-expert compensation biases"):
        mixtral.dequantize()
    assert len(packed_expert_modules(mixtral)) == 2 * len(mixtral.model.layers)
