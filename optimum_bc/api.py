"""``quantize_model``: the engine behind the transformers quantizer, the CLI and the tests.

It works on any loaded causal-LM ``PreTrainedModel`` (see :mod:`optimum_bc.calibration.discovery`), without going through
``from_pretrained``.
"""

import logging
from typing import Any

import torch
from torch import nn

from . import distributed
from .calibration import attention_observers
from .calibration.architectures import ArchitectureSpec, first_param_device, get_blocks, resolve_spec, target_linears
from .calibration.block_inputs import capture_block_inputs, collate
from .calibration.calibrator import BlockCalibrator
from .calibration.discovery import layer_features
from .calibration.offload import OffloadedCalibration, is_dispatched
from .calibration.report import QuantizationReport
from .calibration.streams import activation_bytes, activation_store, activation_streams
from .config import BCQuantizationConfig
from .formats.formats import check_mx_shapes, is_mx
from .layers import validation
from .layers.positions import attach_position_hooks


logger = logging.getLogger(__name__)


def resolve_modules_to_not_convert(model: nn.Module, config: BCQuantizationConfig) -> list[str]:
    """The user's list plus the defaults: the output embedding (``lm_head``) and tied embeddings."""
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = set(config.modules_to_not_convert or [])
    skip.update(get_keys_to_not_convert(model))
    return sorted(skip)


def check_architecture(name_or_path: str, **kwargs: Any) -> ArchitectureSpec:
    """Discover the decoder blocks of a checkpoint from its config alone (a meta-device skeleton, no weights read).

    An architecture that cannot be handled fails here with the discovery error, before any weight is loaded.
    ``kwargs`` go to ``AutoConfig.from_pretrained`` (``trust_remote_code``, ``revision`` ...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=kwargs.get("trust_remote_code", False))
    return resolve_spec(skeleton)


def check_layers(model: nn.Module, spec: ArchitectureSpec, config: BCQuantizationConfig, skip: list[str]) -> None:
    """Refuse, before any calibration, Linears the config's format cannot hold, naming the first such layer.

    MX formats need ``in_features`` divisible by the block size 32, and finite weights (a NaN/Inf would make its
    whole block NaN, MX spec §6.3). Weights still on the meta device (before loading) are not inspected.
    """
    validation.check_quantizable(model, target_linears(model, spec, skip), config)
    if not is_mx(config.format):
        return
    names = target_linears(model, spec, skip)
    check_mx_shapes({n: layer_features(model.get_submodule(n))[0] for n in names}, config.format)
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        if weight is not None and not weight.is_meta and not bool(torch.isfinite(weight).all()):
            raise ValueError(
                f"layer {name!r} has NaN or infinite weights; format={config.format!r} would turn its blocks into "
                "NaN. Fix: repair the checkpoint, or add the layer to modules_to_not_convert."
            )


def build_calibration(config: BCQuantizationConfig, tokenizer: Any = None, name_or_path: str | None = None) -> list:
    """Tokenized calibration samples for ``config`` (empty when the config needs none)."""
    if not config.needs_calibration:
        return []
    if config.dataset is None:
        raise ValueError(
            f"BCQuantizationConfig: dataset=None but method={config.method!r} with "
            f"bias_compensation={config.bias_compensation} needs calibration data. Fix: pass dataset="
            '"wikitext2" (Hub), "wiki-vital" (offline), a text file, a list of strings or token ids; for image '
            "models a folder of images, a list of PIL images or a datasets.Dataset with an image column."
        )
    from .data.calibration_data import build_calibration_set

    tokenizer = tokenizer if tokenizer is not None else config.tokenizer
    if tokenizer is None and _is_text(config.dataset):
        if name_or_path is None:
            raise ValueError("BCQuantizationConfig: text calibration data needs a tokenizer. Fix: pass tokenizer=...")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"BCQuantizationConfig: no tokenizer given and none could be loaded from {name_or_path!r} ({err}). "
                "Fix: pass tokenizer=AutoTokenizer.from_pretrained(...) in the config."
            ) from err
    return build_calibration_set(
        config.dataset, tokenizer, num_samples=config.num_samples, seq_len=config.seq_len, seed=config.seed
    )


def _module_names(model: nn.Module, module: nn.Module | None) -> list[str]:
    """The names under which ``module`` appears in ``model`` (none for None)."""
    return [name for name, m in model.named_modules(remove_duplicate=False) if module is not None and m is module]


def _is_text(dataset: Any) -> bool:
    if isinstance(dataset, str):
        return True
    if isinstance(dataset, list | tuple) and dataset and isinstance(dataset[0], str):
        return True
    return hasattr(dataset, "column_names")


def _activation_store(
    model: nn.Module,
    config: BCQuantizationConfig,
    blocks: nn.ModuleList,
    batches: list[dict],
    placement: OffloadedCalibration | None,
) -> torch.device | None:
    """Where calibration activations are kept (None: with the blocks), from ``config.offload_activations``."""
    device = placement.execution_device if placement is not None else first_param_device(blocks[0])
    streams = activation_streams(config)
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    dtype = model.get_input_embeddings().weight.dtype
    needed = activation_bytes(tokens, model.config.hidden_size, dtype, streams)
    return activation_store(config.offload_activations, device, needed)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    config: BCQuantizationConfig,
    calibration: list | None = None,
    tokenizer: Any = None,
) -> QuantizationReport:
    """Quantize ``model`` in place block by block (with bias compensation if configured) and pack its Linears.

    Args:
        model: a transformers causal LM, or an image model (ViT, DeiT, DINOv2: :mod:`optimum_bc.vision`), with float
            weights (its blocks and layers are discovered).
        config: the quantization settings.
        calibration: pre-built samples (``build_calibration_set`` output); built from ``config.dataset`` if None.
        tokenizer: tokenizer for text datasets, if not given in the config.

    Returns:
        The report, also attached as ``model.quantization_report``.
    """
    from .vision import is_vision_model, quantize_vision_model

    attention_observers.enable(model, config)  # act_attention: checked and switched before any mask is built
    if is_vision_model(model):
        report = quantize_vision_model(model, config, calibration)
        attention_observers.record(model)
        return report
    spec = resolve_spec(model, config)
    if config.modules_to_not_convert is None:
        config.modules_to_not_convert = resolve_modules_to_not_convert(model, config)
    skip = list(config.modules_to_not_convert)
    check_layers(model, spec, config, skip)
    if calibration is None:
        calibration = build_calibration(config, tokenizer, getattr(model, "name_or_path", None))
    validation.check_calibration(model, calibration, config)
    # Under torchrun / accelerate launch: all ranks check they agree, then each keeps its share of the windows.
    # Anything that splits the windows further (a held-out split) must do it before this line, or on the global
    # indices of distributed.shard_range, so that all ranks agree on it.
    calibration = distributed.prepare(config.to_dict(), calibration, config.batch_size)
    was_training = model.training
    model.eval()
    batches = collate(calibration, config.batch_size)
    blocks = get_blocks(model, spec)
    attach_position_hooks(blocks, model)
    placement = OffloadedCalibration(model) if is_dispatched(model) else None
    # Only the modules before the first block run during input capture: the blocks and the LM head stay offloaded.
    outside = (spec.blocks, *_module_names(model, model.get_output_embeddings()))
    if placement is not None:
        placement.onload(model, skip=outside, copy=False)  # offloaded again right after the capture
    store = _activation_store(model, config, blocks, batches, placement)
    inputs = capture_block_inputs(model, blocks, batches, store) if batches else []
    if placement is not None:
        placement.offload(model, skip=outside, write=False)
    report = BlockCalibrator(model, spec, config, skip, placement, store).run(inputs)
    if placement is not None:
        model.tie_weights()
        placement.dispatch()
    model.train(was_training)
    model.quantization_report = report
    attention_observers.record(model)
    logger.info("optimum-bc: quantized %d layers in %.1f s", len(report.layers), report.total_seconds)
    return report
