"""PEFT on BC-quantized models: thin conveniences around stock PEFT, which needs nothing from us.

The packed layers (``QuantLinear``, ``MXLinear``) are ``nn.Linear`` subclasses without a dense ``weight``, so plain
PEFT handles them: ``target_modules="all-linear"`` selects them and PEFT's default dispatcher wraps each in
``peft.tuners.lora.Linear``, whose forward is ``base(x) + B(A(x)) * scaling``. The packed buffers (``qweight``,
``qzeros``, ``scales``, ``g_idx``) never receive gradients; the BC biases are frozen unless ``bias="lora_only"``::

    from peft import LoraConfig, PeftModel, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    ...  # transformers.Trainer(model=peft_model, ...).train()
    peft_model.save_pretrained("adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("bc-folder"), "adapter")

``model.load_adapter`` / ``model.add_adapter`` (transformers' PEFT integration) take the same route. This module adds:

* :func:`get_peft_model`: ``train_bias=True`` (also tune the BC biases, saved with the adapter) and early errors for
  LoRA variants that need the dense base weight (DoRA, PiSSA/OLoRA/CorDA/LoftQ initializations);
* :func:`merge_and_unload`: dequantizes the base layers first, since an adapter cannot be merged into bit-packed
  weights (PEFT's own ``merge_and_unload`` fails on ``base_layer.weight`` being ``None``);
* :func:`checkpoint_positions`: the ``context_fn`` that activation checkpointing needs for ``sink_bias`` layers.
"""

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ..layers.packed_base import PackedLinearBase
from ..layers.positions import current_positions, token_positions


try:
    import peft as _peft
    from peft import LoraConfig, PeftModel
    from peft import get_peft_model as _peft_get_peft_model
except ImportError as err:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("optimum_bc.integrations.peft needs PEFT: pip install 'optimum-bc[train]'") from err


#: PEFT saves the biases of ``bias="lora_only"`` (``<layer>.base_layer.bias``) with the adapter from this version on.
TRAIN_BIAS_MIN_PEFT = "0.21.0"

#: ``init_lora_weights`` schemes that decompose the dense base weight, which packed layers do not store.
_DENSE_WEIGHT_INITS = ("pissa", "olora", "corda", "loftq")


def _has_packed_layers(model: torch.nn.Module) -> bool:
    return any(isinstance(m, PackedLinearBase) for m in model.modules())


def get_peft_model(
    model: torch.nn.Module, peft_config: LoraConfig, *, train_bias: bool = False, **kwargs: Any
) -> PeftModel:
    """``peft.get_peft_model`` with BC checks first (LoRA only).

    Args:
        model: a model quantized by optimum-bc (fresh or reloaded with ``from_pretrained``).
        peft_config: a ``LoraConfig``; ``target_modules="all-linear"`` covers every packed Linear.
        train_bias: also train the bias-compensation biases of the adapted layers (saved with the adapter).
        kwargs: passed to ``peft.get_peft_model`` (e.g. ``adapter_name``).
    """
    if not isinstance(peft_config, LoraConfig):
        raise ValueError(
            f"optimum_bc.integrations.peft.get_peft_model supports LoraConfig, got {type(peft_config).__name__}"
        )
    if not _has_packed_layers(model):
        raise ValueError(
            "optimum_bc.integrations.peft.get_peft_model: the model has no QuantLinear/MXLinear; quantize it with optimum-bc "
            "(or use peft.get_peft_model for a float model)"
        )
    init = peft_config.init_lora_weights
    option = "use_dora=True" if peft_config.use_dora else None
    if isinstance(init, str) and init.startswith(_DENSE_WEIGHT_INITS):
        option = f"init_lora_weights={init!r}"
    if option is not None:
        raise ValueError(
            f"LoraConfig({option}) needs the dense base weight, which packed BC layers do not store. Fix: drop "
            "that option, or call model.dequantize() first and use peft.get_peft_model on the float model"
        )
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
    return _peft_get_peft_model(model, peft_config, **kwargs)


def load_adapter(model: torch.nn.Module, adapter_path: str, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained(model, adapter_path, **kwargs)``; kept for scripts written before it worked as is."""
    return PeftModel.from_pretrained(model, adapter_path, **kwargs)


def merge_and_unload(peft_model: PeftModel, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Merge the LoRA adapters exactly into a dequantized copy of the base weights and return the float model.

    PEFT's own ``merge_and_unload`` adds ``B @ A`` to ``base_layer.weight``, which packed layers do not have (it
    fails with "'NoneType' object has no attribute 'data'"). This first replaces every packed base layer by its
    dense equivalent (``model.dequantize(dtype)``, see :meth:`optimum_bc.integrations.quantizer.BCHfQuantizer._dequantize`), so
    the merged model computes what the adapted quantized model computed, in float. Works in place on ``peft_model``.
    """
    base = peft_model.get_base_model()
    if getattr(base, "hf_quantizer", None) is not None:
        base.dequantize(dtype=dtype)
    return peft_model.merge_and_unload()


def checkpoint_positions() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    """``context_fn`` for non-reentrant activation checkpointing of models with ``sink_bias`` / ``position_bias``.

    Transformers checkpoints a decoder block's ``forward`` inside its ``__call__``, so the backward replay of the
    block runs without the forward pre-hook that publishes the block's token positions, and the position-dependent
    biases fail. This returns, for each checkpointed call, a no-op context for the forward and one that publishes
    the positions the forward saw for the replay::

        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_positions}
        )
    """
    positions = current_positions()
    return nullcontext(), (nullcontext() if positions is None else token_positions(positions))


def trainable_summary(model: torch.nn.Module) -> dict[str, int]:
    """Counts of trainable parameters: LoRA weights, biases, anything else (should be 0)."""
    counts = {"lora": 0, "bias": 0, "other": 0}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = "lora" if "lora_" in name else ("bias" if name.endswith(".bias") else "other")
            counts[key] += param.numel()
    return counts
