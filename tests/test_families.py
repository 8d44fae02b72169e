"""Every causal-LM family of transformers through generic discovery, plus the family-specific pieces BC depends on.

The sweep builds each ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` as a tiny random model from its
config class, quantizes it (RTN and GPTQ, BC on), checks finite logits, saves, reloads in a fresh model, compares
logits and generates. The table (family, result, reason) is printed at the end and written by
``python tests/tiny_families.py`` to docs/families.md.
"""

import tempfile

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.modeling_outputs import CausalLMOutput

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc.calibration.architectures import get_blocks, resolve_spec
from optimum_bc.calibration.block_inputs import capture_block_inputs, collate
from optimum_bc.calibration.discovery import candidate_layers, find_output_bias, observe_block

from .conftest import VOCAB, tiny_llama, tiny_opt
from .tiny_families import (
    EXPECTED_FAILURES,
    SEQ_LEN,
    FamilyResult,
    causal_lm_families,
    check_family,
    format_table,
    pass_rate,
)


#: The hand-written table the four original families used before discovery (blocks path, groups, layer-BC target).
_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
FORMER_TABLE = {
    "llama": ("model.layers", _LLAMA_GROUPS, "mlp.down_proj"),
    "mistral": ("model.layers", _LLAMA_GROUPS, "mlp.down_proj"),
    "qwen2": ("model.layers", _LLAMA_GROUPS, "mlp.down_proj"),
    "opt": (
        "model.decoder.layers",
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        "fc2",
    ),
    "opt-post-ln": (
        "model.decoder.layers",
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        "final_layer_norm",
    ),
}


def _small(cls: type, config_cls: type) -> nn.Module:
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return cls(config).eval()


_BUILDERS = {
    "llama": tiny_llama,
    "mistral": lambda: _small(MistralForCausalLM, MistralConfig),
    "qwen2": lambda: _small(Qwen2ForCausalLM, Qwen2Config),
    "opt": tiny_opt,
    "opt-post-ln": lambda: tiny_opt(pre_ln=False),
}


def _ids(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FORMER_TABLE))
def test_discovery_reproduces_the_former_table(family: str) -> None:
    blocks_path, groups, target = FORMER_TABLE[family]
    model = _BUILDERS[family]()
    spec = resolve_spec(model)
    assert spec.blocks == blocks_path
    blocks = get_blocks(model, spec)
    batch = capture_block_inputs(model, blocks, collate([{"input_ids": r[None]} for r in _ids()], 2))[0]
    for block in blocks:
        layout = observe_block(block, candidate_layers(block, model.config), batch.hidden, batch.kwargs)
        assert tuple(layout.groups) == groups
        assert not layout.left_out
        assert find_output_bias(block, layout.order, batch.hidden, batch.kwargs) == target


_RESULTS: dict[str, FamilyResult] = {}


@pytest.mark.slow  # about 130 families built, quantized twice, saved and reloaded: over the 5-minute budget on 2 cores
@pytest.mark.parametrize("family", causal_lm_families())
def test_family(family: str) -> None:
    result = check_family(family)
    _RESULTS[family] = result
    if result.status == "out of scope" or result.status == "not built":
        pytest.skip(f"{family}: {result.status}: {result.reason}")
    if family in EXPECTED_FAILURES:
        assert result.status == "fail", f"{family} now passes: remove it from EXPECTED_FAILURES"
        pytest.xfail(f"{family}: {result.reason}")
    assert result.status == "pass", f"{family}: {result.reason}"


@pytest.mark.slow
def test_family_table() -> None:
    if len(_RESULTS) < len(causal_lm_families()):
        pytest.skip("the family sweep did not run in full in this session")
    print("\n" + format_table(_RESULTS))
    passed, in_scope = pass_rate(_RESULTS)
    assert passed >= 0.9 * in_scope, f"{passed}/{in_scope} decoder-only families pass, below 90 %"


class _NoBlocksConfig(PretrainedConfig):
    model_type = "optimum_bc_test_no_blocks"

    def __init__(self, vocab_size: int = VOCAB, hidden_size: int = 32, **kwargs: object) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


class _NoBlocksModel(PreTrainedModel):
    """A causal LM with no repeated decoder blocks: one embedding and one Linear."""

    config_class = _NoBlocksConfig

    def __init__(self, config: _NoBlocksConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> CausalLMOutput:
        return CausalLMOutput(logits=self.proj(self.embed(input_ids)))


def test_architecture_without_blocks_fails_before_weights_load(tmp_path) -> None:
    AutoConfig.register(_NoBlocksConfig.model_type, _NoBlocksConfig, exist_ok=True)
    AutoModelForCausalLM.register(_NoBlocksConfig, _NoBlocksModel, exist_ok=True)
    _NoBlocksModel(_NoBlocksConfig()).save_pretrained(tmp_path)
    config = BCQuantizationConfig(bits=4, method="rtn", bias_compensation=False)
    with pytest.raises(ValueError, match="no repeated decoder blocks found.*register_architecture") as info:
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    assert any(entry.name == "_process_model_before_weight_loading" for entry in info.traceback)


def test_bc_layer_refused_where_no_exact_place_exists() -> None:
    from .tiny_families import tiny_model

    model = tiny_model("gemma2")  # post-feedforward RMSNorm after the MLP: no bias adds to the block output
    config = BCQuantizationConfig(bits=4, group_size=-1, method="rtn", bc_layer=True, dataset=list(_ids()))
    config.num_samples, config.seq_len = 2, SEQ_LEN
    with pytest.raises(ValueError, match="bc_layer=True: no module of block model.layers.0"):
        quantize_model(model, config)


def _cfg(**kwargs: object) -> BCQuantizationConfig:
    return BCQuantizationConfig(
        bits=3, group_size=-1, method="rtn", dataset=list(_ids(4)), num_samples=4, seq_len=SEQ_LEN, **kwargs
    )


def test_bc_layer_gives_the_sink_tokens_their_own_block_bias() -> None:
    sinks = {}
    for bc_layer in (False, True):
        model = tiny_llama()
        report = quantize_model(model, _cfg(bc_layer=bc_layer, bc_sink_tokens=1))
        sinks[bc_layer] = model.model.layers[0].mlp.down_proj.sink_bias.clone()
    # The layer-level pass adds the first token's own residual mean on top of the per-layer sink bias.
    assert not torch.equal(sinks[True], sinks[False])
    assert all(b.mse_after <= b.mse_before for b in report.blocks)


def test_bc_layer_bias_on_a_float_layer_survives_reload(tmp_path) -> None:
    model = tiny_llama()
    skip = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "lm_head"]
    config = _cfg(bc_layer=True, modules_to_not_convert=skip)
    quantize_model(model, config)
    assert model.model.layers[0].mlp.down_proj.bias is not None
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.randint(0, VOCAB, (1, 12))
    assert torch.equal(reloaded(x).logits, model(x).logits)


def test_gpt2_conv1d_layers_are_quantized_and_reload() -> None:
    from .tiny_families import tiny_model

    model = tiny_model("gpt2")
    quantize_model(model, _cfg())
    block = model.transformer.h[0]
    assert all(hasattr(block.get_submodule(n), "qweight") for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc"))
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        reloaded = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager")
        x = torch.randint(3, VOCAB, (1, 12))
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_cli_refuses_an_architecture_without_blocks_before_loading(tmp_path, capsys, word_tokenizer) -> None:
    from optimum_bc.cli import main

    AutoConfig.register(_NoBlocksConfig.model_type, _NoBlocksConfig, exist_ok=True)
    AutoModelForCausalLM.register(_NoBlocksConfig, _NoBlocksModel, exist_ok=True)
    _NoBlocksModel(_NoBlocksConfig()).save_pretrained(tmp_path / "m")
    word_tokenizer.save_pretrained(tmp_path / "m")  # a complete folder: only the architecture is wrong
    code = main(["quantize", str(tmp_path / "m"), "--output", str(tmp_path / "q"), "--method", "rtn", "--quiet"])
    assert code == 2
    assert "no repeated decoder blocks found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("family", "target"),
    [
        ("gpt_neox", "mlp.dense_4h_to_h"),  # parallel attention + MLP: both add to the output, the MLP runs last
        ("phi", "mlp.fc2"),  # parallel attention + MLP on one shared LayerNorm
        ("falcon", "mlp.dense_4h_to_h"),
        ("qwen3", "mlp.down_proj"),  # q/k norms do not change where the block bias goes
        ("olmo2", None),  # post-norms (norm after each residual branch): no exact place
        ("gemma2", None),  # sandwich norms
        ("gpt2", "mlp.c_proj"),  # Conv1D
    ],
)
def test_layer_bias_target_found_by_perturbation(family: str, target: str | None) -> None:
    from .tiny_families import tiny_model

    model = tiny_model(family)
    blocks = get_blocks(model, resolve_spec(model))
    batch = capture_block_inputs(model, blocks, collate([{"input_ids": r[None]} for r in _ids()], 2))[0]
    layout = observe_block(blocks[0], candidate_layers(blocks[0], model.config), batch.hidden, batch.kwargs)
    assert find_output_bias(blocks[0], layout.order, batch.hidden, batch.kwargs) == target


def test_sliding_window_blocks_get_their_own_masks() -> None:
    from .tiny_families import tiny_model

    model = tiny_model("gemma2")  # layers alternate sliding-window (8 tokens) and full attention
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    blocks = get_blocks(model, resolve_spec(model))
    batch = capture_block_inputs(model, blocks, collate([{"input_ids": r[None]} for r in _ids()], 2))[0]
    sliding, full = batch.for_block(0).kwargs["attention_mask"], batch.for_block(1).kwargs["attention_mask"]
    # The full-attention block sees every earlier token; the sliding one only the last 8: calibration replays each.
    assert not torch.equal(sliding, full)
    visible = (full == 0).sum(-1) if full.dtype != torch.bool else full.sum(-1)
    assert int(visible[..., -1].max()) == SEQ_LEN


def test_moe_attention_and_fused_experts_quantized_router_float() -> None:
    from torch.nn.utils import parametrize

    from .tiny_families import tiny_model

    model = tiny_model("qwen3_moe")
    quantize_model(model, _cfg())
    block = model.model.layers[0]
    assert hasattr(block.self_attn.q_proj, "qweight")
    assert parametrize.is_parametrized(block.mlp.experts, "gate_up_proj")  # packed per expert
    assert block.mlp.experts.gate_up_proj.dim() == 3  # read back as the dequantized stacked weight
    assert not hasattr(block.mlp.gate, "qweight")  # the router stays in float
