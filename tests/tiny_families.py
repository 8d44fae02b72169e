"""Tiny random causal LMs for every entry of transformers' causal-LM auto mapping, built from config classes alone.

The shrinking is generic: every config class gets the same small sizes for the attributes it has (few layers, a small
hidden size, few heads and experts); nothing here is written per family.
"""

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


VOCAB = 128
SEQ_LEN = 16

#: Small sizes, applied to whichever of these attributes a config class has (through its attribute_map too).
_SIZES: dict[str, int] = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "n_inner": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "sliding_window": 8,
    "rotary_dim": 8,
    "partial_rotary_factor": 0.5,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "first_k_dense_replace": 1,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def causal_lm_families() -> list[str]:
    """Every ``model_type`` in transformers' causal-LM auto mapping."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _settable(config: PretrainedConfig, key: str) -> bool:
    """Whether ``config`` has ``key`` set (directly or through its attribute_map) and it is not a derived property."""
    if getattr(config, key, None) is None:
        return False
    prop = getattr(type(config), config.attribute_map.get(key, key), None)
    return not (isinstance(prop, property) and prop.fset is None)


def tiny_config(model_type: str) -> PretrainedConfig:
    """The family's default config with the small sizes of :data:`_SIZES` wherever the class has the attribute."""
    default = AutoConfig.for_model(model_type)
    if hasattr(default, "get_text_config"):
        text = default.get_text_config()
        if text is not default and type(default).__name__ != type(text).__name__:
            default = text
    kwargs = {k: v for k, v in _SIZES.items() if _settable(default, k)}
    if "layer_types" in default.to_dict():
        kwargs["layer_types"] = None
    config = type(default)(**kwargs)
    for key, value in kwargs.items():
        if key != "layer_types" and getattr(config, key, value) != value:
            setattr(config, key, value)
    return config


#: Families whose config ignores the generic shrinking (nested sub-configs) are refused above this size.
MAX_PARAMETERS = 3_000_000


class TooLarge(ValueError):
    """The generic shrinking left the model too large for a CPU test."""


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of ``model_type`` in float32, eval mode (sized on the meta device first)."""
    config = tiny_config(model_type)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    count = sum(p.numel() for p in skeleton.parameters())
    if count > MAX_PARAMETERS:
        raise TooLarge(f"{count} parameters after generic shrinking (nested sub-configs keep their full size)")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (1, SEQ_LEN), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))  # the float model itself must run
    return model


#: Families outside the scope of a decoder-only quantizer, by kind (the reason goes into the table).
ENCODER_DECODER_OR_ENCODER = "encoder or encoder-decoder stack (decoder-only causal LMs are in scope)"


def family_kind(model: torch.nn.Module) -> str | None:
    """Why ``model`` is out of scope (encoder stacks, encoder-decoder decoders), or None for a decoder-only LM."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        return ENCODER_DECODER_OR_ENCODER
    if any("crossattention" in name.lower().replace("_", "") for name, _ in model.named_modules()):
        return ENCODER_DECODER_OR_ENCODER
    return None
