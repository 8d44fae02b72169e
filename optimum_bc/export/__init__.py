"""Export a BC-quantized model as a checkpoint that stock loaders read: compressed-tensors (or GPTQ).

``export_model(model, directory, format)`` checks everything first (the format, every packed layer, the target
folder), then writes into a temporary folder beside the target and renames it in at the end, so a failure never
leaves a half-written folder and never loses what was saved before.

Bias compensation is carried along: the checkpoint names the stock class whose bias flags give every compensated
Linear a bias (:mod:`optimum_bc.export.families`). What no stock class can hold is dropped with a warning
(:class:`ExportWarning`) that names the layers and the cost (biases without a slot). ``sink_bias`` (the extra bias
of the first tokens, ``bc_sink_tokens > 0``) is refused unless ``drop_sink_bias=True``: a model calibrated with it is
worse without it than without compensation, and ``bc_sink_tokens=0`` is the export-friendly setting.
``position_bias`` is refused.
Layers in ``modules_to_not_convert`` stay dense (compressed-tensors ``ignore``).
"""

import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration.architectures import resolve_spec
from ..calibration.experts import packed_expert_modules
from ..config import BCQuantizationConfig
from ..formats.formats import is_mx
from ..layers.packed_base import PackedLinearBase, packed_layers
from . import compressed_tensors as ct
from . import gptq
from .families import FamilyPlan, plan_family


NATIVE = "native"
COMPRESSED_TENSORS = ct.FORMAT_NAME
GPTQ = "gptq"
#: formats ``save_pretrained(save_format=...)``, ``optimum-bc quantize --save-format`` and ``export`` accept.
SAVE_FORMATS = (NATIVE, COMPRESSED_TENSORS, GPTQ)
#: config.json ``quantization_config`` key that records the BC settings and the original model_type.
PROVENANCE_KEY = "optimum_bc"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
#: shard size of exports (as transformers' default); a larger tensor gets a shard of its own.
DEFAULT_MAX_SHARD_SIZE = "50GB"


class ExportWarning(UserWarning):
    """Part of the bias compensation could not be carried into the exported checkpoint."""


def check_save_format(save_format: str) -> str:
    """``save_format`` if it is one of :data:`SAVE_FORMATS`, else a ValueError naming them."""
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save_format={save_format!r} is not supported; choose one of {list(SAVE_FORMATS)}")
    return save_format


def _bc_config(model: nn.Module) -> BCQuantizationConfig:
    config = getattr(model.config, "quantization_config", None)
    if not isinstance(config, BCQuantizationConfig):
        raise ValueError(
            "the model is not BC-quantized (model.config.quantization_config is "
            f"{type(config).__name__}); quantize it with optimum_bc.quantize_model or "
            "from_pretrained(..., quantization_config=BCQuantizationConfig(...)) first"
        )
    return config


@dataclasses.dataclass(frozen=True)
class _Format:
    """The calls a format provides: a config check, a per-layer check, per-layer tensors, a quantization_config."""

    check: Callable[[BCQuantizationConfig], None]
    check_layer: Callable[[str, Any, BCQuantizationConfig], None]
    tensors: Callable[[Any, BCQuantizationConfig], dict[str, torch.Tensor]]
    quantization_config: Callable[[BCQuantizationConfig, list[str]], dict[str, Any]]


def _get_format(save_format: str) -> _Format:
    check_save_format(save_format)
    if save_format == COMPRESSED_TENSORS:
        return _Format(
            ct.check_ct_exportable,
            ct.check_ct_layer,
            ct.ct_layer_tensors,
            ct.ct_quantization_config,
        )
    if save_format == GPTQ:
        return _gptq_format()
    raise ValueError(f"save_format={save_format!r} is written by save_pretrained itself, not by export_model")


def _gptq_format() -> _Format:
    from ..layers.qlinear import QuantLinear

    def check_layer(name: str, layer: Any, config: BCQuantizationConfig) -> None:
        if not isinstance(layer, QuantLinear):
            raise ValueError(f"{name} is a {type(layer).__name__}; the GPTQ layout holds integer layers only")

    return _Format(
        gptq.check_gptq_exportable,
        check_layer,
        # check_exportable has already refused sink biases unless the caller asked to drop them.
        lambda layer, config: gptq.gptq_layer_tensors(
            layer, gptq.gptq_quantization_config(config).get("checkpoint_format"), drop_sink_bias=True
        ),
        lambda config, ignore: gptq.gptq_quantization_config(config),
    )


def _sink_problem(config: BCQuantizationConfig, save_format: str) -> str:
    return (
        f"bc_sink_tokens={config.bc_sink_tokens}: the extra bias of the first token(s) (sink_bias) has no place in "
        f"any stock class, so a {save_format} export would drop it, and a model calibrated with it is worse without "
        "it than with no bias compensation at all (measured: README, 'Deploy'). Fix: quantize with "
        "bc_sink_tokens=0, which exports losslessly, or pass drop_sink_bias=True (CLI: --drop-sink-bias) to export "
        "without it anyway."
    )


def check_config_exportable(config: BCQuantizationConfig, save_format: str, drop_sink_bias: bool = False) -> _Format:
    """The checks that need only the settings (run before loading or quantizing anything); returns the format.

    A config with first-token biases (``bc_sink_tokens > 0`` with compensation) is refused unless
    ``drop_sink_bias``: dropping them changes the model, see :func:`_sink_problem`.
    """
    fmt = _get_format(save_format)
    if config.bias_compensation and config.layer_sink_tokens and not drop_sink_bias:
        raise ValueError(_sink_problem(config, save_format))
    if config.bc_granularity == "position":
        raise ValueError(
            f"bc_granularity='position' cannot be exported as {save_format}: its per-position bias table has no "
            "place in any stock class. Fix: quantize with bc_granularity='channel' (bc_sink_tokens=0 carries all "
            "of the compensation)."
        )
    if getattr(config, "act_bits", None) is not None:
        raise ValueError(
            f"act_bits={config.act_bits}: activation quantization (input_scale / input_zero) cannot be exported as "
            f"{save_format}, whose classes are weight-only; the exported model would run with float activations. "
            "Fix: save with save_pretrained (the BC format keeps it), or quantize with act_bits=None."
        )
    fmt.check(config)
    return fmt


def check_float_model_exportable(
    model: nn.Module, config: BCQuantizationConfig, save_format: str, drop_sink_bias: bool = False
) -> None:
    """Before quantizing ``model`` for ``save_format``: refuse Linears whose width the format cannot group.

    compressed-tensors dequantizes whole groups only, so a group size must divide every quantized input width
    (SmolLM2's 576 is not a multiple of 128, for instance). Raises ValueError naming the first such layer.
    """
    from ..api import resolve_modules_to_not_convert
    from ..calibration.architectures import target_linears

    check_config_exportable(config, save_format, drop_sink_bias)
    if save_format != COMPRESSED_TENSORS or config.group_size == -1 or is_mx(config.format):
        return
    skip = config.modules_to_not_convert or resolve_modules_to_not_convert(model, config)
    for name in target_linears(model, resolve_spec(model), list(skip)):
        in_features = model.get_submodule(name).in_features
        if in_features % config.group_size:
            raise ValueError(ct.group_size_problem(name, in_features, config.group_size))


def check_exportable(
    model: nn.Module, save_format: str, drop_sink_bias: bool = False
) -> tuple[BCQuantizationConfig, _Format]:
    """Every check of an export that needs no writing: raises ValueError naming the problem and the fix."""
    config = _bc_config(model)
    fmt = check_config_exportable(config, save_format, drop_sink_bias)
    experts = list(packed_expert_modules(model))
    if experts:
        raise ValueError(
            f"{experts[0]} (and {len(experts) - 1} more) are packed mixture-of-experts weights; the {save_format} "
            "export writes per-Linear tensors and has no layout for them yet. Fix: save with save_pretrained (the "
            "optimum-bc format reloads them), or quantize without the experts "
            "(modules_to_not_convert=[...experts module names])."
        )
    if any(hasattr(m, "base_layer") for m in model.modules()):
        raise ValueError(
            "the model carries PEFT adapters, which stock loaders would not apply from this checkpoint. Fix: export "
            "the model without adapters (save the adapter separately with peft's save_pretrained)."
        )
    layers = packed_layers(model)
    if not layers:
        raise ValueError("the model holds no packed layer; nothing to export")
    for name, layer in layers.items():
        if layer.sink_bias is not None and not drop_sink_bias:
            raise ValueError(f"{name}: " + _sink_problem(config, save_format))
        if layer.position_bias is not None:
            raise ValueError(
                f"{name} holds a position_bias, which {save_format} cannot hold. Fix: bc_granularity='channel'."
            )
        fmt.check_layer(name, layer, config)
    return config, fmt


def _check_target(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not overwrite:
        raise ValueError(
            f"{os.fspath(directory)!r} already exists; pick a new folder or pass overwrite=True (CLI: --overwrite)"
        )
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{os.fspath(directory)!r} exists and is not a folder; pick a folder path")


def _warn_losses(layers: dict[str, PackedLinearBase], plan: FamilyPlan, save_format: str) -> int:
    """Warn about every bias the checkpoint cannot hold; returns the number of layers whose sink_bias is dropped."""
    if plan.dropped:
        worst = max(plan.dropped.items(), key=lambda kv: kv[1])
        listing = ", ".join(f"{n} ({c:.3g})" for n, c in plan.dropped.items())
        warnings.warn(
            f"{len(plan.dropped)} compensation biases have no place in the stock {plan.model_type} class and are "
            f"dropped from the {save_format} export; cost (bias norm / output norm on a unit-Gaussian probe): "
            f"{listing}; worst {worst[0]} ({worst[1]:.3g}). Why: {plan.reason}. Fix: keep save_format='native' "
            "to keep them, or quantize with bias_compensation=False for an export that matches the model exactly.",
            ExportWarning,
            stacklevel=3,
        )
    sinks = [n for n, layer in layers.items() if layer.sink_bias is not None]
    if sinks:
        tokens = layers[sinks[0]].sink_bias.shape[0]
        warnings.warn(
            f"sink_bias (extra bias of the first {tokens} token(s)) of {len(sinks)} layers cannot be expressed in "
            f"any stock class and is dropped from the {save_format} export as asked (drop_sink_bias=True); the "
            "first tokens get the per-channel bias only, which measured worse than no compensation (README, "
            "'Deploy'). Fix: quantize with bc_sink_tokens=0 for an export that carries all of the compensation.",
            ExportWarning,
            stacklevel=3,
        )
    return len(sinks)


def _state_dict(
    model: nn.Module,
    layers: dict[str, PackedLinearBase],
    plan: FamilyPlan,
    fmt: _Format,
    config: BCQuantizationConfig,
) -> dict[str, torch.Tensor]:
    """The exported tensors: the format's tensors for packed layers, the rest as is, a bias for every stock slot."""
    packed_prefixes = tuple(name + "." for name in layers)
    out = {k: v for k, v in model.state_dict().items() if not k.startswith(packed_prefixes)}
    for name, layer in layers.items():
        for key, tensor in fmt.tensors(layer, config).items():
            if key == "bias" and name not in plan.biased:
                continue
            out[f"{name}.{key}"] = tensor
    modules = dict(model.named_modules())
    for name in plan.biased:
        if f"{name}.bias" not in out and name in modules:
            module = modules[name]
            out[f"{name}.bias"] = torch.zeros(module.out_features, dtype=module.weight.dtype)
    output, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if output is not None and output.weight is embed.weight:  # tied: the loader ties them back
        out.pop(next(f"{n}.weight" for n, m in modules.items() if m is output), None)
    offloaded = [k for k, v in out.items() if v.is_meta]
    if offloaded:
        raise ValueError(
            f"{len(offloaded)} tensors (e.g. {offloaded[0]}) are offloaded to the meta device, so they cannot be "
            "written. Fix: load the model without disk offload (device_map=None or a map without 'disk') to export."
        )
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def _metadata(model: nn.Module) -> dict[str, str]:
    metadata = {"format": "pt"}
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "get_state_dict_and_metadata"):
        metadata.update(quantizer.get_state_dict_and_metadata(model)[1])
    return metadata


def export_model(
    model: nn.Module,
    directory: str | os.PathLike[str],
    format: str,
    overwrite: bool = False,
    extra_files: Sequence[str | os.PathLike[str]] = (),
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    drop_sink_bias: bool = False,
) -> Path:
    """Write ``model`` (BC-quantized) to ``directory`` in ``format`` ("compressed-tensors" or "gptq").

    Everything is checked first; the files are written into a folder beside the target that is swapped in whole
    (:func:`optimum_bc.export.atomic.atomic_folder`), so a failure never leaves a half-written folder.

    Args:
        model: a model quantized by optimum-bc (in memory or reloaded).
        directory: the target folder; it must not exist unless ``overwrite``.
        format: one of :data:`SAVE_FORMATS` other than "native" (that one is ``save_pretrained``).
        overwrite: replace an existing folder (only once the new one is complete).
        extra_files: files copied in as they are (tokenizer files of the source folder, for instance).
        max_shard_size: largest safetensors file (bytes or e.g. "5GB"); more shards get an index, as transformers'.
        drop_sink_bias: export a model with first-token biases (``bc_sink_tokens > 0``) without them (refused
            otherwise); warns with the number of layers.

    Returns:
        The folder written. Warns (:class:`ExportWarning`) about every bias the format cannot hold.
    """
    from .atomic import atomic_folder

    target = Path(directory)
    check_exportable(model, format, drop_sink_bias)
    _check_target(target, overwrite)
    with atomic_folder(target, overwrite=overwrite) as tmp:
        write_export(model, tmp, format, extra_files, max_shard_size, drop_sink_bias)
    return target


def write_export(
    model: nn.Module,
    folder: str | os.PathLike[str],
    format: str,
    extra_files: Sequence[str | os.PathLike[str]] = (),
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    drop_sink_bias: bool = False,
) -> Path:
    """Write the export of ``model`` into the existing, empty ``folder`` (see :func:`export_model`)."""
    folder = Path(folder)
    config, fmt = check_exportable(model, format, drop_sink_bias)
    layers = packed_layers(model)
    model_config = model.config.to_dict()
    model_config.pop("quantization_config", None)
    plan = plan_family(model_config, layers, resolve_spec(model).blocks)
    sinks = _warn_losses(layers, plan, format)
    tensors = _state_dict(model, layers, plan, fmt, config)
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    quantization = fmt.quantization_config(config, dense)
    quantization[PROVENANCE_KEY] = {
        "source_model_type": model.config.model_type,
        "bc_config": config.to_dict(),
        "dropped_biases": sorted(plan.dropped),
        "dropped_sink_bias_layers": sinks,
    }
    dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")  # what dtype="auto" loads
    exported = {**plan.config, "dtype": dtype, "quantization_config": quantization}
    _write_files(folder, tensors, exported, _metadata(model), model, extra_files, max_shard_size)
    return folder


def _write_files(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    metadata: dict[str, str],
    model: nn.Module,
    extra_files: Sequence[str | os.PathLike[str]],
    max_shard_size: int | str,
) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():  # every shard keeps the report / provenance
        save_file({n: tensors[n] for n in names}, folder / filename, metadata=metadata)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    for file in extra_files:
        shutil.copy2(file, folder / Path(file).name)
