"""PEFT LoRA on BC-quantized models: adapters train on top of the frozen packed weights.

PEFT only wraps layer types it knows (``nn.Linear``, bitsandbytes, GPTQModel, ...). :class:`BCLoraLinear` is the LoRA
layer for our :class:`~optimum_bc.qlinear.QuantLinear`, registered through PEFT's custom-module mechanism
(``LoraConfig._register_custom_module``), which lives on the LoRA config, so use the helpers here::

    from peft import LoraConfig
    from optimum_bc.peft import get_peft_model, load_adapter

    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ...  # transformers.Trainer(model=peft_model, ...).train()
    peft_model.save_pretrained("adapter")
    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained("bc-folder"), "adapter")

The packed weights (``qweight``, ``qzeros``, ``scales``, ``g_idx``) are buffers and never change. With
``train_bias=True`` the bias-compensation biases of the adapted layers train too and are saved with the adapter
(PEFT's ``bias="lora_only"``); loading such an adapter writes them into the base model. Merging an adapter into the
packed weights is not supported (it would need re-quantization).
"""

from typing import Any

import torch

from .qlinear import QuantLinear


try:
    import peft as _peft
    from peft import LoraConfig, PeftConfig, PeftModel
    from peft import get_peft_model as _peft_get_peft_model
    from peft.tuners.lora import Linear as _LoraLinear
except ImportError as err:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("optimum_bc.peft needs PEFT: pip install 'optimum-bc[train]'") from err


#: PEFT saves the biases of ``bias="lora_only"`` (``<layer>.base_layer.bias``) with the adapter from this version on.
TRAIN_BIAS_MIN_PEFT = "0.21.0"


class BCLoraLinear(_LoraLinear):
    """LoRA adapter around a :class:`QuantLinear`: ``y = QuantLinear(x) + B(A(dropout(x))) * scaling``.

    It reuses PEFT's ``lora.Linear`` (forward, adapter bookkeeping, mixed-adapter batches) and only changes what
    touches the base weight: the feature sizes come from the QuantLinear, and merging is refused.
    """

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, **kwargs: Any) -> None:
        config = kwargs.get("config")
        if kwargs.get("use_dora") or getattr(config, "use_dora", False):
            raise ValueError("BCLoraLinear: DoRA needs the dense base weight; set use_dora=False")
        if kwargs.get("fan_in_fan_out") or getattr(config, "fan_in_fan_out", False):
            raise ValueError("BCLoraLinear: fan_in_fan_out=True is for Conv1D layers; set fan_in_fan_out=False")
        super().__init__(base_layer, adapter_name, **kwargs)

    def _get_in_out_features(self, module: torch.nn.Module) -> tuple[int, int]:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return base.in_features, base.out_features

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "BCLoraLinear: merging a LoRA adapter into bit-packed BC weights would need re-quantization; keep the "
            "adapter separate (PeftModel), or merge into the float base model and quantize that again"
        )

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``B @ A * scaling`` (the dense update a merge would add)."""
        weight_a = self.lora_A[adapter].weight
        weight_b = self.lora_B[adapter].weight
        return (weight_b @ weight_a) * self.scaling[adapter]


def register_lora(config: LoraConfig) -> LoraConfig:
    """Make ``config`` wrap every :class:`QuantLinear` it targets with :class:`BCLoraLinear`; returns ``config``."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"register_lora expects a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: BCLoraLinear})
    return config


def _all_linear_targets(model: torch.nn.Module) -> list[str]:
    """Leaf names of every QuantLinear / nn.Linear except the output embedding (PEFT's "all-linear" misses ours)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, QuantLinear | torch.nn.Linear) and module is not output
    }
    return sorted(names)


def get_peft_model(
    model: torch.nn.Module, peft_config: LoraConfig, *, train_bias: bool = False, **kwargs: Any
) -> PeftModel:
    """``peft.get_peft_model`` for a BC-quantized model (LoRA only).

    Args:
        model: a model quantized by optimum-bc (fresh or reloaded with ``from_pretrained``).
        peft_config: a ``LoraConfig``; ``target_modules="all-linear"`` covers every quantized Linear.
        train_bias: also train the bias-compensation biases of the adapted layers (saved with the adapter).
        kwargs: passed to ``peft.get_peft_model`` (e.g. ``adapter_name``).
    """
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("optimum_bc.peft.get_peft_model: the model has no QuantLinear; quantize it with optimum-bc")
    if train_bias:
        from packaging.version import Version

        if Version(_peft.__version__) < Version(TRAIN_BIAS_MIN_PEFT):
            raise ValueError(
                f"train_bias=True needs peft>={TRAIN_BIAS_MIN_PEFT} (older versions do not save the trained biases "
                f"with the adapter); installed: {_peft.__version__}. Fix: pip install -U peft"
            )
        if peft_config.bias not in ("none", "lora_only"):
            raise ValueError(f"train_bias=True trains the adapted layers' biases; got bias={peft_config.bias!r}")
        peft_config.bias = "lora_only"
    if peft_config.target_modules == "all-linear":
        peft_config.target_modules = set(_all_linear_targets(model))
    return _peft_get_peft_model(model, register_lora(peft_config), **kwargs)


def load_adapter(
    model: torch.nn.Module,
    adapter_path: str,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """``PeftModel.from_pretrained`` for a BC-quantized base (the saved LoRA config does not carry our layer)."""
    config = PeftConfig.from_pretrained(adapter_path, **{k: kwargs[k] for k in ("revision", "token") if k in kwargs})
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{adapter_path!r} holds a {type(config).__name__}; optimum_bc.peft supports LoRA only")
    return PeftModel.from_pretrained(
        model,
        adapter_path,
        adapter_name=adapter_name,
        is_trainable=is_trainable,
        config=register_lora(config),
        **kwargs,
    )


def trainable_summary(model: torch.nn.Module) -> dict[str, int]:
    """Counts of trainable parameters: LoRA weights, biases, anything else (should be 0)."""
    counts = {"lora": 0, "bias": 0, "other": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = "lora" if "lora_" in name else ("bias" if name.endswith(".bias") else "other")
            counts[key] += param.numel()
    return counts
