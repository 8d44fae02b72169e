"""Checks of a pre-quantized BC checkpoint against its config: a damaged or mismatched checkpoint never loads.

Two passes, each called with one line from the quantizer:

* :func:`check_checkpoint_files` before the weights load: every packed tensor the config implies is present in the
  safetensors files, with the right dtype and shape (read from the file headers, no tensor data). A missing tensor
  would otherwise stay uninitialised memory (NaN logits); a shape mismatch would only get transformers' generic
  "ignore_mismatched_sizes" advice.
* :func:`check_loaded_values` after they load: scales finite (and, for MX, no reserved NaN exponent), ``g_idx``
  inside ``[0, groups)``, biases finite.

Every error names the tensor and the likely cause (config.json edited, file truncated or cast by another tool).
"""

import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .packed_base import packed_layers


#: safetensors dtype names of the integer / fp16 buffers; float parameters (bias, ...) may be any float dtype.
_SAFETENSORS_DTYPES = {torch.int32: "I32", torch.uint8: "U8", torch.float16: "F16"}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_FLOAT_TENSORS = ("bias", "sink_bias", "position_bias", "input_scale", "input_zero")
_E8M0_NAN = 0xFF


class CheckpointError(ValueError):
    """A BC checkpoint does not match its config.json or holds invalid values."""


def _settings(config: Any) -> str:
    return f"format={config.format!r}, bits={config.bits}, group_size={config.group_size}"


def _read_headers(files: Iterable[str]) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """``{key: (dtype, shape)}`` of every tensor in the safetensors ``files``; None if any is not safetensors."""
    from safetensors import safe_open

    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        if not os.fspath(file).endswith(".safetensors"):
            return None
        try:
            with safe_open(os.fspath(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    part = f.get_slice(key)
                    headers[key] = (part.get_dtype(), tuple(part.get_shape()))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(
                f"cannot read the safetensors file {os.fspath(file)!r} ({type(err).__name__}: {err}); it is "
                "truncated or damaged. Fix: save or download the checkpoint again."
            ) from err
    return headers


def _find(headers: dict[str, Any], name: str) -> str | None:
    """The checkpoint key of model tensor ``name`` (exact, or with the base-model prefix added / removed)."""
    if name in headers:
        return name
    for key in headers:
        if key.endswith("." + name) or name.endswith("." + key):
            return key
    return None


def _missing_hint(headers: dict[str, Any], layer: str, expected: set[str], config: Any) -> str:
    present = sorted(k.rsplit(".", 1)[-1] for k in headers if k.rsplit(".", 1)[0].endswith(layer))
    if "weight" in present:
        return (
            "the checkpoint holds a float weight for this layer: it was kept in float when saved "
            "(modules_to_not_convert in config.json differs) or the checkpoint is not BC-quantized"
        )
    if present and not set(present) <= expected:
        return (
            f"the layer's tensors in the checkpoint are {present}, not those of {_settings(config)}: config.json's "
            "quantization_config was edited or belongs to another checkpoint"
        )
    return "the file is incomplete (a save or download was interrupted) or was written by another tool"


def _check_no_extra(headers: dict[str, Any], layer: str, expected: set[str], config: Any) -> None:
    """A tensor of ``layer`` in the checkpoint that the config does not produce: the config no longer fits."""
    found = [key for key in (_find(headers, f"{layer}.{short}") for short in sorted(expected)) if key]
    if not found:
        return
    prefix = found[0].rsplit(".", 1)[0] + "."
    extra = sorted(k[len(prefix) :] for k in headers if k.startswith(prefix) and "." not in k[len(prefix) :])
    extra = [short for short in extra if short not in expected]
    if extra:
        cause = (
            f"bc_sink_tokens={config.bc_sink_tokens} / bc_granularity={config.bc_granularity!r} in config.json drop "
            "a saved bias table"
            if set(extra) <= {"sink_bias", "position_bias"}
            else f"config.json's quantization_config ({_settings(config)}) was edited or belongs to another checkpoint"
        )
        raise CheckpointError(
            f"checkpoint tensors {[prefix + short for short in extra]} are not used by the layer {layer!r}: "
            f"{cause}. Fix: restore config.json from the saved checkpoint."
        )


def check_checkpoint_files(model: nn.Module, checkpoint_files: Sequence[str], config: Any) -> None:
    """Before loading: presence, dtype and shape of every packed tensor, from the safetensors headers.

    ``model`` holds the (meta-device) packed skeletons built from ``config``. Raises :class:`CheckpointError`.
    """
    headers = _read_headers(checkpoint_files) if checkpoint_files else None
    if headers is None:
        return  # not safetensors (or no files known): the value checks after loading still run
    fix = "Fix: restore config.json from the saved checkpoint, or quantize and save again."
    for layer, module in packed_layers(model).items():
        tensors = dict(module.named_buffers(recurse=False)) | dict(module.named_parameters(recurse=False))
        tensors = {k: v for k, v in tensors.items() if v is not None}
        if not any(_find(headers, f"{layer}.{short}") for short in tensors):
            # None of the layer's tensors under its module name: a family whose checkpoint keys transformers renames
            # on save and load (a conversion mapping); the value checks after loading still run.
            continue
        _check_no_extra(headers, layer, set(tensors), config)
        for short, tensor in tensors.items():
            name = f"{layer}.{short}"
            key = _find(headers, name)
            if key is None:
                if short == "sink_bias":
                    hint = (
                        f"config.json asks for bc_sink_tokens={config.bc_sink_tokens} but the checkpoint has no "
                        "sink_bias (a config_version 1 checkpoint has none: set bc_sink_tokens=0 there)"
                    )
                else:
                    hint = _missing_hint(headers, layer, set(tensors), config)
                raise CheckpointError(f"checkpoint tensor {name!r} is missing: {hint}. {fix}")
            dtype, shape = headers[key]
            allowed = _FLOAT_DTYPES if short in _FLOAT_TENSORS else (_SAFETENSORS_DTYPES.get(tensor.dtype),)
            if dtype not in allowed:
                raise CheckpointError(
                    f"checkpoint tensor {key!r} has dtype {dtype}, expected {' or '.join(map(str, allowed))}: the file "
                    "was rewritten by a tool that cast its tensors (packed codes must stay integers). Fix: save "
                    "the quantized model again with save_pretrained."
                )
            if shape != tuple(tensor.shape):
                cause = {
                    "qweight": f"bits or format in config.json ({_settings(config)}) do not match the weights",
                    "position_bias": f"seq_len={config.seq_len} in config.json does not match the saved table",
                    "sink_bias": f"bc_sink_tokens={config.bc_sink_tokens} in config.json does not match the weights",
                }.get(short, f"group_size or bits in config.json ({_settings(config)}) do not match the weights")
                raise CheckpointError(
                    f"checkpoint tensor {key!r} has shape {list(shape)}, the config expects "
                    f"{list(tensor.shape)}: {cause}. {fix}"
                )


def _bad_count(mask: torch.Tensor) -> int:
    return int(mask.sum().item())


def check_loaded_values(model: nn.Module, config: Any) -> None:
    """After loading: finite scales and biases, valid MX scale codes, ``g_idx`` inside ``[0, groups)``.

    Tensors still on the meta device (offloaded to disk by accelerate) are skipped. Raises :class:`CheckpointError`.
    """
    damaged = "the checkpoint is damaged or was edited. Fix: quantize and save the model again."
    for layer, module in packed_layers(model).items():
        scales = module.scales
        if scales.device.type != "meta":
            if scales.dtype == torch.uint8:
                bad = _bad_count(scales == _E8M0_NAN)
                what = "reserved NaN exponent codes (0xFF)"
            else:
                bad = _bad_count(~torch.isfinite(scales))
                what = "NaN or infinite values"
            if bad:
                raise CheckpointError(f"{layer}.scales holds {bad} {what}: {damaged}")
        g_idx = getattr(module, "g_idx", None)
        if g_idx is not None and g_idx.device.type != "meta" and g_idx.numel():
            groups = scales.shape[1]
            low, high = int(g_idx.min().item()), int(g_idx.max().item())
            if low < 0 or high >= groups:
                raise CheckpointError(
                    f"{layer}.g_idx holds group indices in [{low}, {high}], outside [0, {groups - 1}] for "
                    f"{groups} groups ({_settings(config)}): {damaged}"
                )
        for short in _FLOAT_TENSORS:
            tensor = getattr(module, short, None)
            if tensor is not None and tensor.device.type != "meta":
                bad = _bad_count(~torch.isfinite(tensor))
                if bad:
                    raise CheckpointError(f"{layer}.{short} holds {bad} NaN or infinite values: {damaged}")


# --------------------------------------------------------------------------------------------------- before quantizing

#: largest finite float16: a scale above it (weights of a huge range) would be stored as inf.
_FP16_MAX = 65504.0
#: below this scale a float16 subnormal's absolute step (2^-24) is over 1/16 of it.
_COARSE_SCALE = 2.0**-20


def check_quantizable(model: nn.Module, names: Sequence[str], config: Any) -> None:
    """Before calibration: something to quantize, nothing packed yet, and weights the int grid can store.

    Weights still on the meta device (before loading) are not inspected.
    """
    packed = packed_layers(model)
    if packed:
        name, module = next(iter(packed.items()))
        raise ValueError(
            f"the model is already quantized ({name!r} is a {type(module).__name__}); quantizing it again would "
            "only fail after the work. Fix: load the float model."
        )
    if not names:
        raise ValueError(
            f"modules_to_not_convert={config.modules_to_not_convert!r} leaves no Linear layer to quantize (a name "
            "there excludes every module under it). Fix: list only the modules to keep in float, e.g. ['lm_head']."
        )
    if config.format != "int":
        return
    levels = 2**config.bits - 1
    for name in names:
        weight = model.get_submodule(name).weight
        if weight.is_meta:
            continue
        w = weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise ValueError(
                f"layer {name!r} has {_bad_count(~torch.isfinite(w))} NaN or infinite weights; they cannot be "
                "quantized. Fix: repair the checkpoint, or add the layer to modules_to_not_convert."
            )
        ranges = w.amax(dim=1).clamp(min=0) - w.amin(dim=1).clamp(max=0)
        widest = float(ranges.max())
        narrow = ranges[ranges > 0]
        if narrow.numel() and float(narrow.min()) / levels < _COARSE_SCALE:
            warnings.warn(
                f"layer {name!r} has rows of weights spanning only {float(narrow.min()):.3g}: their {config.bits}-bit "
                f"scale is below 2^-20, where float16 scales (subnormal there) round by more than 6 %, so their "
                "quantization error grows. Consider adding the layer to modules_to_not_convert.",
                stacklevel=2,
            )
        if widest / levels > _FP16_MAX:
            raise ValueError(
                f"layer {name!r} has weights spanning {widest:.3g} in one row: its {config.bits}-bit scale would "
                f"exceed float16's {_FP16_MAX:g} and be stored as inf. Fix: repair the checkpoint, or add the "
                "layer to modules_to_not_convert."
            )


def check_calibration(model: nn.Module, samples: Sequence[dict[str, torch.Tensor]], config: Any) -> None:
    """Before calibration: token ids inside the model's vocabulary and windows inside its context length."""
    if not samples:
        return
    vocab = getattr(model.config, "vocab_size", None)
    longest = max(int(s["input_ids"].shape[-1]) for s in samples)
    highest = max(int(s["input_ids"].max()) for s in samples)
    if vocab is not None and highest >= vocab:
        raise ValueError(
            f"dataset: calibration token id {highest} is outside the model's vocabulary of {vocab} ids: the "
            "tokenizer does not belong to this model, or the pre-tokenized ids are wrong. Fix: tokenize with the "
            "model's own tokenizer (tokenizer=AutoTokenizer.from_pretrained(model_id))."
        )
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None or longest <= limit:
        return
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in (None, "default"):
        warnings.warn(
            f"seq_len={config.seq_len}: calibration windows of {longest} tokens exceed max_position_embeddings="
            f"{limit}; the model extrapolates with rope_type={rope_type!r}",
            stacklevel=2,
        )
        return
    raise ValueError(
        f"BCQuantizationConfig: seq_len={config.seq_len} gives calibration windows of {longest} tokens, beyond the "
        f"model's max_position_embeddings={limit}: positions past it are not trained (OPT fails, LLaMA calibrates "
        f"on garbage). Fix: seq_len={limit} or less."
    )
