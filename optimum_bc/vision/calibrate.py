"""Calibration driver for encoder-only vision transformers (ViT, DeiT, DINOv2): the same ``BlockCalibrator`` as the
causal LMs, fed with the inputs of the first encoder block recorded from ``pixel_values``.

Differences from the text path, all decided here:

* every token is valid (no padding); the blocks publish ``arange(tokens)`` as token positions, so
  ``bc_sink_tokens`` (default 1) gives the first tokens their own compensation bias: token 0 is the CLS token, whose
  features differ from the patch tokens' (add the register tokens of DINOv2-with-registers: ``1 + registers``);
* ``bc_granularity="position"`` (the reference's per-(token, channel) table) works because every image gives the
  same number of tokens: the blocks publish ``arange(tokens)`` as positions
  (:func:`optimum_bc.layers.positions.attach_position_hooks` with ``numbered=True``);
* only the Linears inside the encoder blocks are quantized; the patch embedding (a Conv2d), the final norm and any
  classifier head stay in float, as do the attention's batched MatMuls (their inputs are not quantized);
* hierarchical models (Swin) are refused before calibration: their stages take the token grid's size, which
  changes from stage to stage.
"""

import inspect
import logging

import torch
from torch import nn

from ..calibration.architectures import first_param_device, get_blocks, resolve_spec, target_linears
from ..calibration.block_inputs import _Batch, _StopForward
from ..calibration.calibrator import BlockCalibrator
from ..calibration.report import QuantizationReport
from ..config import BCQuantizationConfig
from ..layers.positions import attach_position_hooks
from ..layers.validation import check_quantizable
from .data import build_image_calibration


logger = logging.getLogger(__name__)


def is_vision_model(model: nn.Module) -> bool:
    """A model whose main input is ``pixel_values`` (transformers' image models)."""
    return getattr(model, "main_input_name", None) == "pixel_values"


#: ``erq_lambda=None``'s ridge for image models: their calibration has a few thousand tokens (257 per DINOv2-S image),
#: on which Aqer's regression with the text models' 0.01 fits the noise (DINOv2-S W4A4, 16 images, BC on: 3.4 dB
#: SQNR on held-out photos against 16 dB on the calibration images; 0.1: 5.2 dB, 0.3: 5.3 dB, 1.0: 5.8 dB). The
#: reference's λ = 2000 on 32 DeiT images' tokens is 0.02 to 9 times this model's layers' mean input power.
VISION_ERQ_LAMBDA = 1.0


def prepare_vision_config(config: BCQuantizationConfig) -> None:
    """Settings that differ for image models (see the module docstring); refuse what cannot work, before loading."""
    if config.erq_lambda is None:
        config.erq_lambda = VISION_ERQ_LAMBDA
    if config.bc_layer:
        raise ValueError(
            "bc_layer=True is not available for image models: their blocks end with a layer scale or norm, so the "
            "block bias has no exact place. Fix: bc_layer=False (per-layer BC stays on)."
        )


def check_encoder_blocks(model: nn.Module, path: str, blocks: nn.ModuleList) -> None:
    """Refuse block lists whose blocks need more than the hidden states (e.g. Swin's stages take the token grid's
    size, which changes from stage to stage): their inputs cannot be replayed block by block."""
    signature = inspect.signature(blocks[0].forward)
    required = [
        name
        for name, p in list(signature.parameters.items())[1:]
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if required:
        raise ValueError(
            f"model_type {model.config.model_type!r}: its blocks ({path}, {type(blocks[0]).__name__}) also need "
            f"{required}, which change between blocks (hierarchical models such as Swin), so they cannot be "
            "calibrated block by block yet. Fix: use a plain ViT, DeiT or DINOv2 model."
        )


def collate_images(samples: list[dict[str, torch.Tensor]], batch_size: int) -> list[torch.Tensor]:
    """``pixel_values`` batches of ``batch_size`` images (every image has the processor's size)."""
    shapes = {tuple(s["pixel_values"].shape[1:]) for s in samples}
    if len(shapes) > 1:
        raise ValueError(
            f"calibration images have different processed sizes {sorted(shapes)}. Fix: use an image processor that "
            "resizes and crops to one size"
        )
    pixels = [s["pixel_values"] for s in samples]
    return [torch.cat(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]


@torch.no_grad()
def capture_encoder_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]) -> list[_Batch]:
    """The first encoder block's hidden states and keyword arguments for each ``pixel_values`` batch."""
    records: list[_Batch] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        named = dict(kwargs)
        valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        records.append(_Batch(hidden.detach(), named, valid, None))
        raise _StopForward

    device = first_param_device(model)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for pixels in batches:
            try:
                model(pixel_values=pixels.to(device=device, dtype=model.dtype))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return records


@torch.no_grad()
def quantize_vision_model(
    model: nn.Module,
    config: BCQuantizationConfig,
    calibration: list | None = None,
    processor: object = None,
) -> QuantizationReport:
    """Quantize an image model's encoder blocks in place (see :func:`optimum_bc.api.quantize_model`).

    ``calibration``: pre-built ``{"pixel_values": ...}`` samples (:func:`build_image_calibration`); else built from
    ``config.dataset`` with ``processor`` (default: the model folder's, else DINOv2's).
    """
    from transformers.quantizers.base import get_keys_to_not_convert

    prepare_vision_config(config)
    spec = resolve_spec(model)
    if config.modules_to_not_convert is None:
        config.modules_to_not_convert = sorted(set(get_keys_to_not_convert(model)))
    skip = list(config.modules_to_not_convert)
    check_quantizable(model, target_linears(model, spec, skip), config)
    if calibration is None and config.needs_calibration:
        if config.dataset is None:
            raise ValueError(
                f"BCQuantizationConfig: dataset=None but method={config.method!r} with bias_compensation="
                f"{config.bias_compensation} and act_scale={config.act_scale!r} needs calibration images. Fix: pass "
                "dataset= a folder of images, a list of PIL images or a datasets.Dataset with an image column."
            )
        calibration = build_image_calibration(
            config.dataset, processor, config.num_samples, config.seed, getattr(model, "name_or_path", None)
        )
    was_training = model.training
    model.eval()
    blocks = get_blocks(model, spec)
    check_encoder_blocks(model, spec.blocks, blocks)
    attach_position_hooks(blocks, numbered=True)
    batches = collate_images(calibration or [], config.batch_size)
    inputs = capture_encoder_inputs(model, blocks, batches) if batches else []
    if config.bc_granularity == "position" and inputs:
        config.seq_len = int(inputs[0].hidden.shape[1])  # the table has one row per token of every image
    report = BlockCalibrator(model, spec, config, skip).run(inputs)
    model.train(was_training)
    model.quantization_report = report
    return report
