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


# ----------------------------------------------------------------------------- routed dequantization (fast inference)


def _stacked_reference(packed: PackedExperts, dtype: torch.dtype) -> torch.Tensor:
    """The previous exact path: every expert's own ``dequantize_weight``, stacked (transposed as the family stores)."""
    weight = torch.stack([layer.dequantize_weight(torch.float32) for layer in packed.packed]).to(dtype)
    return weight.transpose(1, 2) if packed.transposed else weight


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_routed_dequantization_equals_the_exact_path(model_type: str) -> None:
    model = tiny_model(model_type)
    quantize_model(model, _cfg("rtn"))
    for packed in packed_expert_modules(model).values():  # the full read equals the per-expert dequantization
        assert torch.equal(packed(torch.empty(0)), _stacked_reference(packed, torch.float32))
    x = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    for implementation in ("eager", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            routed = model(x).logits
            with parametrize.cached():  # every expert dequantized once, the previous path
                full = model(x).logits
        assert torch.equal(routed, full), implementation
    model.to(torch.bfloat16)  # a lower-precision model: the same single rounding of the float32 weight
    for packed in packed_expert_modules(model).values():
        assert torch.equal(packed(torch.empty(0, dtype=torch.bfloat16)), _stacked_reference(packed, torch.bfloat16))
    with torch.no_grad():
        routed = model(x).logits
        with parametrize.cached():
            assert torch.equal(model(x).logits, routed)


@pytest.mark.parametrize(
    "config", [{"weight_format": "mxfp4", "group_size": 32}, {"bits": 3, "group_size": 16, "desc_act": True}]
)
def test_routed_dequantization_of_other_layouts(config: dict) -> None:
    """MX experts and act-order groups (a per-column ``g_idx``) take the same vectorized path exactly."""
    model = tiny_model("qwen3_moe")
    bits, group_size = config.pop("bits", 4), config.pop("group_size", -1)
    cfg = BCQuantizationConfig(
        bits=bits, group_size=group_size, method="gptq", dataset=_ids(), num_samples=2, seq_len=SEQ_LEN, **config
    )
    quantize_model(model, cfg)
    packed = next(iter(packed_expert_modules(model).values()))
    assert torch.equal(packed(torch.empty(0)), _stacked_reference(packed, torch.float32))
    x = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        routed = model(x).logits
        with parametrize.cached():
            assert torch.equal(model(x).logits, routed)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_generate_with_kv_cache_equals_full_dequantization(model_type: str) -> None:
    model = tiny_model(model_type)
    quantize_model(model, _cfg())
    x = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(6))
    kwargs = {"attention_mask": torch.ones_like(x), "max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    kwargs |= {"return_dict_in_generate": True, "output_logits": True}
    routed = model.generate(x, **kwargs)
    with parametrize.cached():
        full = model.generate(x, **kwargs)
    assert torch.equal(routed.sequences, full.sequences)
    assert all(torch.equal(a, b) for a, b in zip(routed.logits, full.logits, strict=True))


def test_scratch_buffer_is_shared_across_layers_and_bounded() -> None:
    model = tiny_model("mixtral")
    quantize_model(model, _cfg("rtn"))
    packed = packed_expert_modules(model)
    x = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model(x)
    buffers = {p._scratch.data_ptr(): p._scratch for p in packed.values()}
    assert len(buffers) == 2  # one for every gate_up_proj, one for every down_proj, whatever the number of layers
    one_layer = sum(_stacked_reference(p, torch.float32).nbytes for n, p in packed.items() if ".layers.0." in n)
    assert sum(b.nbytes for b in buffers.values()) == one_layer
    assert len(model.model.layers) > 1 and all(p._forward_cache is None for p in packed.values())  # nothing held
    with kernels.use_backend("reference"):  # the Linears' path gradients take, for equal logits in all modes
        with torch.inference_mode():  # inference tensors get their own buffer (they cannot be written outside it)
            logits = model(x).logits
        with torch.no_grad():
            assert torch.equal(model(x).logits, logits)
        with torch.enable_grad():  # gradients: a fresh tensor per forward, never the shared buffer
            out = model(x).logits
        out.sum().backward()
    assert torch.equal(out.detach(), logits)


def test_only_routed_experts_are_filled_and_other_signatures_read_all() -> None:
    from optimum_bc.calibration.experts import install
    from optimum_bc.layers.experts import routed_experts
    from optimum_bc.layers.qlinear import QuantLinear

    g = torch.Generator().manual_seed(8)
    experts, out_features, in_features = 4, 8, 16

    def layer() -> QuantLinear:
        codes = torch.randint(0, 16, (out_features, in_features), generator=g)
        scales = torch.rand(out_features, 1, generator=g) + 0.1
        return QuantLinear.from_quantized(codes, scales, torch.full((out_features, 1), 8), None, 4, -1)

    class OddExperts(torch.nn.Module):
        """Experts with a non-standard call: ``forward(x, plan)`` applies every expert in ``plan``."""

        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(experts, out_features, in_features), requires_grad=False)

        def forward(self, x: torch.Tensor, plan: list[int]) -> torch.Tensor:
            return sum(x @ self.w[e].T for e in plan)

    module = OddExperts()
    packed = install(module, "w", [layer() for _ in range(experts)], transposed=False, hooked_bias=False)
    x = torch.randn(3, in_features, generator=g)
    reference = _stacked_reference(packed, torch.float32)
    with torch.no_grad():
        assert torch.equal(module(x, [0, 2, 3]), sum(x @ reference[e].T for e in (0, 2, 3)))
    assert routed_experts((x, [0], None), {}, experts) is None  # not a standard call: every expert was filled
    assert torch.equal(packed._scratch, reference)
    index, weights = torch.tensor([[1, 1], [3, experts]]), torch.ones(2, 2)  # ``experts``: a dropped slot
    assert routed_experts((x[:2], index, weights), {}, experts).tolist() == [1, 3]
    packed._scratch.zero_()
    packed.begin_forward(torch.tensor([1, 3]))
    with torch.no_grad():
        weight = module.w
    packed.end_forward()
    assert torch.equal(weight[[1, 3]], reference[[1, 3]])
    assert not weight[[0, 2]].any()  # unrouted experts are not dequantized
    packed.begin_forward(torch.tensor([2]))  # a single routed expert (decode with top-1 routing)
    with torch.no_grad():
        assert torch.equal(module.w[2], reference[2])
    packed.end_forward()


def _moe_families() -> list[str]:
    from .tiny_families import causal_lm_families

    return causal_lm_families()


@pytest.mark.slow  # builds every causal-LM family (about 125) to find the ones with fused experts
@pytest.mark.parametrize("family", _moe_families())
def test_every_moe_family_routed_equals_full_dequantization(family: str) -> None:
    """Every family whose fused expert weights get packed: routed dequantization gives the logits of the full one,
    under its default experts implementation and eager."""
    from optimum_bc.calibration.experts import fused_expert_params

    try:
        model = tiny_model(family)
        x = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            model(x)
    except Exception as exc:  # noqa: BLE001 - families that do not build are the family sweep's business
        pytest.skip(f"{family} does not build as a tiny model: {type(exc).__name__}")
    if not fused_expert_params(model):
        pytest.skip(f"{family} has no fused expert weights")
    quantize_model(model, _cfg("rtn"))
    if not packed_expert_modules(model):  # 3-D parameters that are not expert weights (convolutions, RWKV mixes)
        pytest.skip(f"{family} has no packed expert weights")
    implementations = [model.config._experts_implementation, "eager"]
    for implementation in dict.fromkeys(implementations):
        if implementation != implementations[0]:
            model.set_experts_implementation(implementation)
        with torch.no_grad():
            routed = model(x).logits
            with parametrize.cached():
                assert torch.equal(model(x).logits, routed), implementation
