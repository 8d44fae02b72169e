"""``BCHfQuantizer``: the only module that touches ``transformers.quantizers``.

Registered as ``quant_method="bc"`` on ``import optimum_bc``. Calibrating path (float checkpoint + our config): the
calibration data is built before the weights load (so bad data fails fast), and the model is quantized after they
load. Pre-quantized path (a saved BC checkpoint): the target Linears are swapped for packed ``QuantLinear``
skeletons before loading, so the checkpoint's ``qweight/qzeros/scales/g_idx/bias`` load by name.
"""

import json
from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .. import api
from ..api import build_calibration, check_layers, resolve_modules_to_not_convert
from ..calibration import attention_observers, experts
from ..calibration.architectures import block_layers, get_blocks, resolve_spec, set_module, target_linears
from ..calibration.bc_budget import calibration_activation_bytes
from ..calibration.calibrator import FLOAT_BIASES_ATTR
from ..calibration.discovery import layer_features
from ..calibration.memory import (
    block_calibration_bytes,
    forward_shape,
    measures_float_residuals,
    reserve_calibration_memory,
)
from ..calibration.offload import check_device_map
from ..calibration.report import QuantizationReport
from ..calibration.skeleton import skeleton_layer
from ..config import QUANT_METHOD, BCQuantizationConfig
from ..layers import kernels, validation
from ..layers.packed_base import PackedLinearBase, packed_layers
from ..layers.positions import attach_position_hooks
from ..vision import build_image_calibration, is_vision_model
from ..vision.calibrate import prepare_vision_config
from . import conversions
from .metadata import PROVENANCE_METADATA_KEY, REPORT_METADATA_KEY
from .save_hooks import attach


#: safetensors metadata key holding the JSON QuantizationReport, so the report travels with the weights.


class BCHfQuantizer(HfQuantizer):
    """Quantizes with RTN/GPTQ + bias compensation inside ``from_pretrained``, and reloads packed checkpoints."""

    requires_calibration = False

    def __init__(self, quantization_config: BCQuantizationConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.dtype: torch.dtype | None = None
        self._calibration: list | None = None
        self._checkpoint_files: list[str] = []
        # Calibrating one block offloaded (float copy streamed, shared), the activations, the largest block's weights.
        self._block_needs: tuple[int, int, int, int] | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        config = self.quantization_config
        check_device_map(kwargs.get("device_map"))
        if not self.pre_quantized and config.needs_calibration and config.dataset is None:
            build_calibration(config)  # raises the "dataset=None" error before anything is loaded

    def adjust_max_memory(self, max_memory: dict) -> dict:
        """Refuse, before loading, a ``max_memory`` whose execution device cannot hold one block while calibrated;
        lower that device's budget for the placement by calibration's working memory, so that the modules placed
        there and the block being calibrated fit ``max_memory`` together."""
        if self.pre_quantized or self._block_needs is None:
            return max_memory
        return reserve_calibration_memory(max_memory, *self._block_needs)

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        self.dtype = dtype if isinstance(dtype, torch.dtype) else None
        return dtype

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        config = self.quantization_config
        spec = resolve_spec(
            model, config
        )  # from the meta-device skeleton: an unusable architecture fails before loading
        if config.modules_to_not_convert is None:
            config.modules_to_not_convert = resolve_modules_to_not_convert(model, config)
        check_layers(model, spec, config, list(config.modules_to_not_convert))
        attention_observers.check(model, config)
        if self.pre_quantized:
            self._checkpoint_files = [str(f) for f in kwargs.get("checkpoint_files") or []]
            self._swap_in_skeletons(model)
            validation.check_checkpoint_files(model, self._checkpoint_files, config)
        else:
            # This hook runs under transformers' meta-device init context: build the token tensors on the CPU.
            with torch.device("cpu"):
                self._calibration = _build_model_calibration(model, config)
            if not is_vision_model(model):
                validation.check_calibration(model, self._calibration, config)
            self._block_needs = _block_needs(model, spec, config, self._calibration)
        return model

    def _swap_in_skeletons(self, model: Any) -> None:
        config = self.quantization_config
        spec = resolve_spec(model, config)
        for name in target_linears(model, spec, list(config.modules_to_not_convert)):
            linear = model.get_submodule(name)
            dtype = self.dtype or linear.weight.dtype
            positions = config.seq_len if config.bc_granularity == "position" else None
            skeleton = skeleton_layer(linear, config, dtype, positions)
            # Some families' ``_init_weights`` read ``<parent>.c_proj.weight`` (GPT-2 style); a placeholder marked as
            # initialized answers them during loading (removed after) without entering the state dict.
            placeholder = torch.empty(0, device="meta")
            placeholder._is_hf_initialized = True
            object.__setattr__(skeleton, "weight", placeholder)
            set_module(model, name, skeleton)
        # Fused mixture-of-experts weights packed per expert (recorded in the config at quantization).
        experts.swap_in_skeletons(model, config, self.dtype)
        attention_observers.attach_skeletons(model, config)  # act_attention: the attention scales' buffers
        # Float modules that layer-level BC gave a bias: create the slot so the checkpoint's bias loads into it.
        for name in getattr(model.config, FLOAT_BIASES_ATTR, None) or []:
            module = model.get_submodule(name)
            if getattr(module, "bias", None) is None:
                weight = module.weight
                module.bias = torch.nn.Parameter(
                    torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                )

    def update_weight_conversions(self, weight_conversions: list, model: Any) -> list:
        """Load packed tensors under the model's own names: no checkpoint converter fuses or splits them."""
        return conversions.drop_packed_converters(super().update_weight_conversions(weight_conversions, model), model)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if not self.pre_quantized:
            api.quantize_model(model, self.quantization_config, calibration=self._calibration)
            self._calibration = None
        else:
            for module in model.modules():
                if isinstance(module, PackedLinearBase) and "weight" in module.__dict__:
                    del module.__dict__["weight"]
            validation.check_loaded_values(model, self.quantization_config)
            attention_observers.enable(model, self.quantization_config)
            blocks = get_blocks(model, resolve_spec(model, self.quantization_config))
            if is_vision_model(model):
                attach_position_hooks(blocks, numbered=True)
            else:
                attach_position_hooks(blocks, model)
        if self.quantization_config.backend is not None:
            kernels.set_model_backend(model, self.quantization_config.backend)
        _prepare_for_hub(model, self._checkpoint_files if self.pre_quantized else None)
        return model

    def get_state_dict_and_metadata(self, model: Any) -> tuple[None, dict[str, str]]:
        """Keep the default state dict; store the quantization report and provenance in the safetensors metadata."""
        metadata = {}
        report = getattr(model, "quantization_report", None)
        if report is not None:
            metadata[REPORT_METADATA_KEY] = json.dumps(report.to_dict())
        provenance = getattr(model, "quantization_provenance", None)
        if provenance is not None:
            metadata[PROVENANCE_METADATA_KEY] = json.dumps(provenance.to_dict())
        return None, metadata

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        """Packed buffers, biases and the report save with ``save_pretrained`` and reload pre-quantized."""
        return True

    @property
    def is_compileable(self) -> bool:
        """``torch.compile`` traces the packed layers' forward (every kernel path is stock ATen ops); transformers
        reads this before compiling ``generate``'s forward."""
        return True

    @property
    def is_trainable(self) -> bool:
        """PEFT adapters (stock ``peft``, see ``optimum_bc.integrations.peft``) train on top of the frozen packed weights."""
        return True

    def _dequantize(self, model: Any, dtype: torch.dtype | None = None) -> Any:
        """``model.dequantize(dtype)``: every packed layer becomes a dense Linear with its bias, in place.

        The dense weight is the packed layer's reference dequantization, so logits equal the packed model's (reference
        path). Layers with a ``sink_bias`` / ``position_bias`` become :class:`~optimum_bc.integrations.dense.BCDenseLinear`, which
        keeps them; a saved model holding such layers needs optimum-bc to reload
        (:func:`optimum_bc.integrations.dense.restore_position_biases`), one without them is a plain float checkpoint. The config's
        bias flags (LLaMA ``attention_bias`` / ``mlp_bias``) are set so stock loaders build the biases. ``dtype``
        (default: the model's) is applied to the whole model. Transformers then drops ``quantization_config``.
        """
        from ..calibration.architectures import bias_flags
        from .dense import check_in_memory, dense_linear

        experts.dequantize_experts(model)  # first: the per-expert packed layers are not model Linears
        attention_observers.remove(model)  # act_attention: float attention again, like the dense Linears
        packed = list(packed_layers(model).items())
        if isinstance(dtype, str):  # transformers passes config.dtype, which a loaded config may hold as a string
            dtype = getattr(torch, dtype, dtype)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dequantize(dtype=...) needs a floating torch.dtype, got {dtype!r}")
        target = dtype if dtype is not None else model.dtype
        for _, layer in packed:  # refuse before replacing anything
            check_in_memory(layer)
        for name, layer in packed:  # one at a time, so the peak is one dense layer above the packed model
            set_module(model, name, dense_linear(layer, target))
        tensors = list(model.parameters()) + list(model.buffers())
        if any(t.is_floating_point() and t.dtype != target for t in tensors):
            model.to(target)
        names = [name.removesuffix(".base_layer") for name, _ in packed]
        for flag, value in bias_flags(model.config, resolve_spec(model).blocks, names).items():
            setattr(model.config, flag, value)
        model.config.dtype = target
        for bound in ("save_pretrained", "push_to_hub"):  # the BC card writers bound by save_hooks.attach
            model.__dict__.pop(bound, None)
        return model


def _block_needs(model: Any, spec: Any, config: BCQuantizationConfig, calibration: list) -> tuple[int, int, int, int]:
    """What calibrating one block offloaded needs (``reserve_calibration_memory``'s arguments): the largest block's
    estimate with its float copy streamed and shared, the calibration activations, the largest block's weights."""
    skip = list(config.modules_to_not_convert)
    blocks = get_blocks(model, spec)
    streamed, shared, weights, outputs = 0, 0, 0, 0
    # One calibration batch's forward activations (text models; an image model's are not counted).
    batch = forward_shape(model.config, calibration, config.batch_size)
    floats = measures_float_residuals(config, -(-len(calibration) // max(1, config.batch_size)))
    for i, block in enumerate(blocks):
        groups = [[rel] for rel in block_layers(block, f"{spec.blocks}.{i}.", spec, model.config, skip)]
        outputs = max(outputs, sum(layer_features(block.get_submodule(g[0]))[1] for g in groups))
        options = {"bits": config.bits, "group_size": config.group_size, "float_residuals": floats, **batch}
        streamed = max(streamed, block_calibration_bytes(block, groups, config.bias_compensation, **options))
        shared = max(
            shared, block_calibration_bytes(block, groups, config.bias_compensation, **options, shared_float_copy=True)
        )
        weights = max(weights, sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()]))
    tokens = sum(int(s["input_ids"].numel()) for s in calibration if isinstance(s, dict) and "input_ids" in s)
    hidden = getattr(model.config.get_text_config(), "hidden_size", None)
    dtype = next(blocks[0].parameters()).dtype
    activations = calibration_activation_bytes(config, tokens, hidden, outputs, dtype) if hidden else 0
    return streamed, shared, activations, weights


def _build_model_calibration(model: Any, config: BCQuantizationConfig) -> list:
    """Token windows for a causal LM; ``pixel_values`` of the calibration images for an image model."""
    name_or_path = getattr(model.config, "_name_or_path", None)
    if not is_vision_model(model):
        return build_calibration(config, name_or_path=name_or_path)
    prepare_vision_config(config)
    if not config.needs_calibration:
        return []
    if config.dataset is None:
        raise ValueError(
            "BCQuantizationConfig: dataset=None but this image model's settings need calibration images. Fix: pass "
            "dataset= a folder of images, a list of PIL images or a datasets.Dataset with an image column."
        )
    return build_image_calibration(
        config.dataset, num_samples=config.num_samples, seed=config.seed, name_or_path=name_or_path
    )


def _prepare_for_hub(model: Any, checkpoint_files: list[str] | None = None) -> None:
    """The one place that gives a BC model its provenance and card-writing ``save_pretrained`` / ``push_to_hub``.

    After calibration (``checkpoint_files`` None) the provenance is collected now; after a pre-quantized reload the
    report and provenance are read back from the checkpoint's safetensors metadata.
    """
    conversions.set_save_conversions(model)
    attach(model, checkpoint_files)


def register() -> None:
    """Register the config and quantizer under ``"bc"`` (idempotent, so re-imports are safe)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BCQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(BCHfQuantizer)


def quantize_model(
    model: Any, config: BCQuantizationConfig, calibration: list | None = None, tokenizer: Any = None
) -> QuantizationReport:
    """Quantize an already loaded float model in place (see :func:`optimum_bc.api.quantize_model`).

    Unlike the bare engine it also marks the model as BC-quantized for transformers, so ``save_pretrained`` writes
    ``quantization_config`` and ``from_pretrained`` (after ``import optimum_bc``) reloads the packed layers.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            f"the model already carries a {type(model.hf_quantizer).__name__} (it was loaded quantized). Fix: load "
            "the float model (for a GGUF file, clear `model.hf_quantizer` and `model.config.quantization_config`)."
        )
    report = api.quantize_model(model, config, calibration=calibration, tokenizer=tokenizer)
    if config.backend is not None:
        kernels.set_model_backend(model, config.backend)
    model.hf_quantizer = BCHfQuantizer(config, pre_quantized=False)
    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    _prepare_for_hub(model)
    return report


def load_report(directory: str) -> QuantizationReport:
    """The QuantizationReport stored in a saved BC checkpoint folder."""
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors file in {directory!r}; is it a folder written by save_pretrained?")
    with safe_open(str(files[0]), "pt") as f:
        metadata = f.metadata() or {}
    if REPORT_METADATA_KEY not in metadata:
        raise ValueError(
            f"{directory!r} holds no optimum-bc quantization report; it is written when a model quantized by "
            "optimum-bc in this process is saved with save_pretrained."
        )
    return QuantizationReport.from_dict(json.loads(metadata[REPORT_METADATA_KEY]))
