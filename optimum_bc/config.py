"""``BCQuantizationConfig``: the settings a user passes to ``from_pretrained(quantization_config=...)``.

Every value is validated when the config is built, before any model is loaded, and every error names the field,
the value, what is allowed and how to fix it. ``to_dict()`` is what lands in ``config.json``: JSON types only, never
the tokenizer nor raw calibration text (the dataset is stored as a short description).
"""

import difflib
import inspect
import os
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .algorithms import available_algorithms
from .algorithms.compensation import BC_GRANULARITIES, BC_TARGET_CHOICES
from .config_fields import (
    WEIGHT_FORMAT_VERSION,
    block_path,
    check_common,
    check_mx,
    pop_seq_len,
    pop_weight_format,
)
from .config_fields import check as _check
from .formats.formats import FORMATS, INT_FORMAT, MX_BLOCK_SIZE, MX_ELEMENTS, canonical_format, is_mx


CONFIG_VERSION = WEIGHT_FORMAT_VERSION
# Sequence-start tokens that get their own compensation bias (config_version 1 checkpoints predate it: 0).
DEFAULT_SINK_TOKENS = 1
SUPPORTED_BITS = (2, 3, 4, 6, 8)
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 128
DEFAULT_SEQ_LEN = 2048
QUANT_METHOD = "bc"


def field_choices() -> dict[str, tuple]:
    """The allowed values of the fields that have a fixed set (the CLI offers them as choices)."""
    from .config_fields import BACKENDS

    return {
        "bits": SUPPORTED_BITS,
        "method": tuple(available_algorithms()),
        "weight_format": tuple(FORMATS),
        "bc_target": BC_TARGET_CHOICES,
        "bc_granularity": BC_GRANULARITIES,
        "backend": BACKENDS,
    }


def _refuse_unknown(keys: list[str]) -> None:
    """Unknown keys are typos: this version wrote every key of configs up to its CONFIG_VERSION (a newer version's
    configs carry a higher config_version, refused above with "upgrade optimum-bc")."""
    known = sorted(set(inspect.signature(BCQuantizationConfig.__init__).parameters) - {"self", "kwargs"})
    key = keys[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(known)}"
    raise ValueError(
        f"BCQuantizationConfig: unknown key {key!r}"
        + (f" (and {', '.join(map(repr, keys[1:]))})" if keys[1:] else "")
        + f"; {hint} Fix: correct the name (keys written by a newer optimum-bc come with a higher config_version)."
    )


class BCQuantizationConfig(QuantizationConfigMixin):
    """Weight-only quantization (RTN, GPTQ, COMQ or ERQ) followed by bias compensation.

    Args:
        bits: bits per weight, one of 2, 3, 4, 6, 8 (default 4). With an MX format it follows from the format (4, 6 or
            8) and may only be set to that value.
        group_size: columns sharing one scale/zero per output row; -1 for one grid per output channel (default 128).
            With an MX format it is the MX block size, 32, and may only be set to 32.
        sym: symmetric grid (zero point fixed at the middle) instead of asymmetric min-max (default False). MX
            formats are symmetric (sign-magnitude or two's complement, no zero point): only True or unset.
        weight_format: number format of the weights: ``"int"`` (the integer grid above, default) or a block-scaled
            OCP MX format, one of
            ``"mxint8"``, ``"mxint4"``, ``"mxfp8_e4m3"``, ``"mxfp8_e5m2"``, ``"mxfp6_e3m2"``, ``"mxfp6_e2m3"``,
            ``"mxfp4"`` (32 consecutive input columns share one power-of-two E8M0 scale; see
            ``optimum_bc.formats``). Case-insensitive; ``"mxfp4_e2m1"`` and the names without underscore are aliases.
            The old key ``format`` is still read (deprecated; GPTQConfig's ``format`` names a checkpoint layout,
            chosen here when saving: ``save_pretrained(folder, save_format="gptq")``).
        method: weight quantizer, ``"rtn"``, ``"gptq"``, ``"comq"`` or ``"erq"`` (see ``optimum_bc.algorithms``).
        desc_act: GPTQ act-order: quantize columns by decreasing Hessian diagonal (groups follow that order).
        damp_percent: GPTQ dampening, as a fraction of the mean Hessian diagonal; escalated x10 on failure.
        comq_sweeps: COMQ: passes over all coordinates (the reference code does 1).
        comq_update_scale: COMQ: after each sweep also set every scale to its error minimiser for the current codes
            (the paper's claim; the reference code keeps the min-max scales: default False).
        erq_lambda: ERQ: ridge λ of Aqer and Wqer, as a fraction of the mean diagonal of the input Gram matrix (the
            reference's absolute λ = 2000 depends on its token count and activation scale, so it does not transfer).
            None (default): 0.01 for text models, 1.0 for image models, calibrated on far fewer tokens (a few
            thousand from 16-32 images: a weaker ridge fits their noise; see docs/vision.md).
        erq_chunk: ERQ Wqer: fraction of the remaining columns quantized per step before the ridge correction of the
            rest (the reference halves the remainder: 0.5).
        true_sequential: quantize the Linears of a block group by group (q/k/v, o, up/gate, down), each group
            observed after the previous one was quantized; else the whole block at once.
        bias_compensation: add to every quantized Linear the bias that cancels its mean output error.
        bc_target: ``"auto"`` (default: one quantized stream per candidate (no bias, the float target with the sink
            bias, the sequential target with and without it) runs through the whole model and the one whose
            next-token distribution ends closest to the float model's on the calibration windows wins; with GPTQ,
            COMQ and ERQ each candidate is its own quantized model (``optimum_bc.calibration.model_race``: about one
            calibration per candidate), with RTN or offloaded blocks they share the quantized weights; with
            ``bc_layer`` each block chooses on held-out batches; see ``optimum_bc.algorithms.bc_select``),
            ``"sequential"`` (target = the float model's output, the quantized layer fed
            by the quantized prefix, so BC also cancels the mean error carried in from earlier blocks) or
            ``"float"`` (both layers see the float model's inputs, as the reference code does).
        bc_layer: also compensate each whole decoder block's output (folded into its last bias).
        bc_granularity: ``"channel"`` (one bias per output channel, folded into the layer bias, free at inference) or
            ``"position"`` (the reference code's per-(position, channel) table: evaluation-only, stored as an extra
            ``position_bias`` buffer, refuses inputs longer than ``seq_len``).
        bc_sink_tokens: with the channel granularity, the first N tokens of every sequence (the attention sink, whose
            activations are outliers in LLaMA-family models) get their own compensation bias, stored as a small
            ``sink_bias`` buffer ``[N, out]``, and are left out of the per-channel mean. 0 = one mean over all tokens
            (the paper's per-channel BC). Works with KV-cache generation and left padding (positions come from the
            model's ``position_ids``). Default 1; see README for the measurements behind it.
        dataset: calibration data: a name (``"wikitext2"``, ``"c4"``, ``"ptb"``, ``"wiki-vital"``), a local text file
            or folder, a list of strings, or pre-tokenized ids. Not needed for RTN without compensation.
        num_samples: calibration windows.
        seq_len: tokens per calibration window (default 2048; GPTQConfig's ``model_seqlen`` is accepted as an
            alias).
        seed: seed of the window sampling.
        batch_size: windows per forward pass during calibration.
        offload_activations: keep the calibration activations (the block inputs and outputs of both streams) on the
            CPU between uses and bring one batch at a time to the GPU, for a GPU too small to hold them. ``None``
            (default): decided when calibration starts, from the GPU's free memory (see ``optimum_bc.calibration``).
            No effect when the blocks run on the CPU.
        tokenizer: tokenizer for text datasets (never serialized); defaults to the model's own.
        modules_to_not_convert: module names kept in float; default: ``lm_head`` and tied embeddings.
        block_name_to_quantize: dotted path of the ModuleList of decoder blocks to quantize (GPTQConfig's name),
            e.g. ``"model.layers"``; default: discovered from the model.
        modules_in_block_to_quantize: GPTQConfig's list of lists of layer names relative to a block, e.g.
            ``[["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]``: only those
            layers are quantized (the others stay in float), one inner list per sequential stage, in that order.
            Default: every quantizable layer, staged as observed (see ``true_sequential``).
        backend: matmul path of this model's packed layers: ``"auto"``, ``"fast"`` or ``"reference"`` (see
            ``optimum_bc.kernels``); default None follows the process default (``optimum_bc.kernels.set_backend``).
        act_bits: activation quantization: bits (4, 6 or 8) of the inputs of the quantized Linears, fake-quantized
            (``optimum_bc.activations``); None (default) keeps activations in float (weight-only).
        act_granularity: ``"tensor"`` (one scale per layer input) or ``"token"`` (one per token, dynamic only).
        act_scale: ``"minmax"``, ``"percentile"`` or ``"mse"`` (static scales fitted on the calibration inputs of the
            quantized stream, stored as ``input_scale`` / ``input_zero``; default ``"mse"``) or ``"dynamic"``.
        act_sym: symmetric activation grid (zero point 0) instead of asymmetric min-max (default False).
        act_attention: also fake-quantize the inputs of attention's two batched MatMuls (query and key for QKᵀ,
            softmax probabilities and value for PV) with ``act_bits``: per-tensor scales per attention module, fitted
            with ``act_scale`` on the quantized calibration stream (or dynamic), the probabilities on an unsigned
            grid (``optimum_bc.layers.attention_quant``). Needs ``act_bits`` and a model whose attention goes through
            transformers' ``AttentionInterface`` with ``attn_implementation`` ``"sdpa"`` or ``"eager"``
            (default False).
        config_version: layout version of this config, for forward compatibility.
    """

    def __init__(
        self,
        bits: int | None = None,
        group_size: int | None = None,
        sym: bool | None = None,
        method: str = "gptq",
        weight_format: str | None = None,
        desc_act: bool = False,
        damp_percent: float = 0.01,
        comq_sweeps: int = 1,
        comq_update_scale: bool = False,
        erq_lambda: float | None = None,
        erq_chunk: float = 0.5,
        true_sequential: bool = True,
        bias_compensation: bool = True,
        bc_target: str = "auto",
        bc_layer: bool = False,
        bc_granularity: str = "channel",
        bc_sink_tokens: int | None = None,
        dataset: Any = None,
        num_samples: int = 128,
        seq_len: int | None = None,
        seed: int = 0,
        batch_size: int = 1,
        offload_activations: bool | None = None,
        tokenizer: Any = None,
        modules_to_not_convert: list[str] | None = None,
        block_name_to_quantize: str | list[str] | None = None,
        modules_in_block_to_quantize: list[list[str]] | None = None,
        backend: str | None = None,
        act_bits: int | None = None,
        act_granularity: str = "tensor",
        act_scale: str = "mse",
        act_sym: bool = False,
        act_attention: bool = False,
        config_version: int = CONFIG_VERSION,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        _check(
            type(config_version) is int and 1 <= config_version <= CONFIG_VERSION,
            "config_version",
            config_version,
            f"an int in 1..{CONFIG_VERSION}",
            "upgrade optimum-bc to read a checkpoint written by a newer version, else leave it unset",
        )
        seq_len = pop_seq_len(kwargs, seq_len)
        weight_format = pop_weight_format(kwargs, weight_format, config_version)
        if kwargs:
            _refuse_unknown(sorted(kwargs))
        self.quant_method = QUANT_METHOD
        self.weight_format = canonical_format(INT_FORMAT if weight_format is None else weight_format)
        mx = isinstance(self.format, str) and self.format in MX_ELEMENTS
        # Unset values take the format's own: an MX format fixes the bits, the block size and symmetry.
        self.bits = bits if bits is not None else (MX_ELEMENTS[self.format].bits if mx else DEFAULT_BITS)
        self.group_size = group_size if group_size is not None else (MX_BLOCK_SIZE if mx else DEFAULT_GROUP_SIZE)
        self.sym = sym if sym is not None else mx
        self.method = method
        self.desc_act = desc_act
        self.damp_percent = damp_percent
        self.comq_sweeps = comq_sweeps
        self.comq_update_scale = comq_update_scale
        self.erq_lambda = erq_lambda
        self.erq_chunk = erq_chunk
        self.true_sequential = true_sequential
        self.bias_compensation = bias_compensation
        self.bc_target = bc_target
        self.bc_layer = bc_layer
        self.bc_granularity = bc_granularity
        if bc_sink_tokens is None:
            bc_sink_tokens = DEFAULT_SINK_TOKENS if config_version >= 2 else 0
        self.bc_sink_tokens = bc_sink_tokens
        self.dataset = dataset
        self.num_samples = num_samples
        self.seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
        self.seed = seed
        self.batch_size = batch_size
        self.offload_activations = offload_activations
        self.tokenizer = tokenizer
        self.modules_to_not_convert = modules_to_not_convert
        self.block_name_to_quantize = block_name_to_quantize
        self.modules_in_block_to_quantize = modules_in_block_to_quantize
        self.backend = backend
        self.act_bits = act_bits
        self.act_granularity = act_granularity
        self.act_scale = act_scale
        self.act_sym = act_sym
        self.act_attention = act_attention
        self.config_version = config_version
        self.post_init()

    @property
    def format(self) -> str:
        """The number format (``weight_format``), under the name the engine and older code read."""
        return self.weight_format

    @property
    def blocks_path(self) -> str | None:
        """The decoder blocks' dotted path named by ``block_name_to_quantize`` (None: discovered)."""
        return block_path(self.block_name_to_quantize)

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the given fields and validate the result; on a bad value the config is left unchanged.

        As ``QuantizationConfigMixin.update``, returns the kwargs that are not fields of this config.
        ``model_seqlen`` and ``format`` are read as ``seq_len`` and ``weight_format``.
        """
        fields = set(self.__dict__) - {"quant_method", "config_version"}
        kwargs = dict(kwargs)
        if "model_seqlen" in kwargs:
            kwargs["seq_len"] = pop_seq_len(kwargs, kwargs.pop("seq_len", None))
        if "format" in kwargs:
            kwargs["weight_format"] = pop_weight_format(kwargs, kwargs.pop("weight_format", None), CONFIG_VERSION)
        used = {k: v for k, v in kwargs.items() if k in fields}
        fmt = canonical_format(used["weight_format"]) if "weight_format" in used else self.format
        if isinstance(fmt, str) and fmt in FORMATS and fmt != self.format:
            # As in __init__, the fields a format fixes that this update leaves unset take the new format's own.
            mx = fmt in MX_ELEMENTS
            own = {"bits": MX_ELEMENTS[fmt].bits if mx else DEFAULT_BITS, "sym": mx}
            own["group_size"] = MX_BLOCK_SIZE if mx else DEFAULT_GROUP_SIZE
            used = own | used
        saved = dict(self.__dict__)
        try:
            for key, value in used.items():
                setattr(self, key, canonical_format(value) if key == "weight_format" else value)
            self.post_init()
        except ValueError:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        return {k: v for k, v in kwargs.items() if k not in used}

    def post_init(self) -> None:
        """Validate every field; raise ValueError naming the field, the value, what is allowed and the fix."""
        _check(
            self.format in FORMATS,
            "weight_format",
            self.format,
            str(list(FORMATS)),
            'weight_format="int" (integer grid) or e.g. weight_format="mxfp4"',
        )
        if is_mx(self.format):
            check_mx(self)
        else:
            _check(
                self.bits in SUPPORTED_BITS and type(self.bits) is int,
                "bits",
                self.bits,
                str(SUPPORTED_BITS),
                "bits=4",
            )
        check_common(self)

    @property
    def layer_sink_tokens(self) -> int:
        """Rows of each quantized layer's ``sink_bias`` (0 when it has none)."""
        active = self.bias_compensation and self.bc_granularity == "channel"
        return self.bc_sink_tokens if active else 0

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing with this config runs the model on calibration data."""
        from .algorithms import get_algorithm

        static_acts = self.act_bits is not None and self.act_scale != "dynamic"
        return self.bias_compensation or get_algorithm(self.method).needs_inputs or static_acts

    @property
    def needs_float_stream(self) -> bool:
        """Whether calibration also runs the float model's activations beside the quantized ones (BC's target, and
        algorithms such as ERQ that use the float inputs)."""
        from .algorithms import get_algorithm

        return self.bias_compensation or get_algorithm(self.method).needs_float_inputs

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict for ``config.json`` (dataset described, tokenizer dropped)."""
        from .data.calibration_data import describe_dataset

        out = {k: v for k, v in self.__dict__.items() if k not in ("tokenizer", "dataset")}
        # A name, or the description of a reloaded checkpoint, is kept as is; a local path is reduced to its basename.
        if self.dataset is None or (isinstance(self.dataset, str) and not os.path.exists(self.dataset)):
            out["dataset"] = self.dataset
        else:
            out["dataset"] = describe_dataset(self.dataset)
        if out["modules_to_not_convert"] is not None:
            out["modules_to_not_convert"] = list(out["modules_to_not_convert"])
        return out

    def __iter__(self):  # noqa: ANN204 - mirrors the mixin
        yield from self.to_dict().items()

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the values that differ from the defaults (plus ``quant_method``)."""
        defaults = BCQuantizationConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "quant_method" or defaults.get(k) != v}
