"""``BCQuantizationConfig``: the settings a user passes to ``from_pretrained(quantization_config=...)``.

Every value is validated when the config is built, before any model is loaded, and every error names the field,
the value, what is allowed and how to fix it. ``to_dict()`` is what lands in ``config.json``: JSON types only, never
the tokenizer nor raw calibration text (the dataset is stored as a short description).
"""

import logging
import os
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .algorithms import available_algorithms
from .compensation import BC_GRANULARITIES, BC_TARGETS


logger = logging.getLogger(__name__)

CONFIG_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)
QUANT_METHOD = "bc"


def _check(ok: bool, field: str, value: object, allowed: str, fix: str) -> None:
    if not ok:
        raise ValueError(f"BCQuantizationConfig: {field}={value!r} is invalid; allowed: {allowed}. Fix: {fix}")


class BCQuantizationConfig(QuantizationConfigMixin):
    """Weight-only quantization (RTN, GPTQ, COMQ or ERQ) followed by bias compensation.

    Args:
        bits: bits per weight, one of 2, 3, 4, 8.
        group_size: columns sharing one scale/zero per output row; -1 for one grid per output channel.
        sym: symmetric grid (zero point fixed at the middle) instead of asymmetric min-max.
        method: weight quantizer, ``"rtn"``, ``"gptq"``, ``"comq"`` or ``"erq"`` (see ``optimum_bc.algorithms``).
        desc_act: GPTQ act-order: quantize columns by decreasing Hessian diagonal (groups follow that order).
        damp_percent: GPTQ dampening, as a fraction of the mean Hessian diagonal; escalated x10 on failure.
        comq_sweeps: COMQ: passes over all coordinates (the reference code does 1).
        comq_update_scale: COMQ: after each sweep also set every scale to its error minimiser for the current codes
            (the paper's claim; the reference code keeps the min-max scales: default False).
        erq_lambda: ERQ: ridge λ of Aqer and Wqer, as a fraction of the mean diagonal of the input Gram matrix (the
            reference's absolute λ = 2000 depends on its token count and activation scale, so it does not transfer).
        erq_chunk: ERQ Wqer: fraction of the remaining columns quantized per step before the ridge correction of the
            rest (the reference halves the remainder: 0.5).
        true_sequential: quantize the Linears of a block group by group (q/k/v, o, up/gate, down), each group
            observed after the previous one was quantized; else the whole block at once.
        bias_compensation: add to every quantized Linear the bias that cancels its mean output error.
        bc_target: ``"sequential"`` (default: target = the float model's output, the quantized layer fed by the
            quantized prefix, so BC also cancels the mean error carried in from earlier blocks) or ``"float"`` (both
            layers see the float model's inputs, as the reference code does; measured worse, see README).
        bc_layer: also compensate each whole decoder block's output (folded into its last bias).
        bc_granularity: ``"channel"`` (one bias per output channel, folded into the layer bias, free at inference) or
            ``"position"`` (the reference code's per-(position, channel) table: evaluation-only, stored as an extra
            ``position_bias`` buffer, refuses inputs longer than ``seq_len``).
        dataset: calibration data: a name (``"wikitext2"``, ``"c4"``, ``"ptb"``, ``"wiki-vital"``), a local text file
            or folder, a list of strings, or pre-tokenized ids. Not needed for RTN without compensation.
        num_samples: calibration windows.
        seq_len: tokens per calibration window.
        seed: seed of the window sampling.
        batch_size: windows per forward pass during calibration.
        tokenizer: tokenizer for text datasets (never serialized); defaults to the model's own.
        modules_to_not_convert: module names kept in float; default: ``lm_head`` and tied embeddings.
        config_version: layout version of this config, for forward compatibility.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = False,
        method: str = "gptq",
        desc_act: bool = False,
        damp_percent: float = 0.01,
        comq_sweeps: int = 1,
        comq_update_scale: bool = False,
        erq_lambda: float = 0.01,
        erq_chunk: float = 0.5,
        true_sequential: bool = True,
        bias_compensation: bool = True,
        bc_target: str = "sequential",
        bc_layer: bool = False,
        bc_granularity: str = "channel",
        dataset: Any = None,
        num_samples: int = 128,
        seq_len: int = 2048,
        seed: int = 0,
        batch_size: int = 1,
        tokenizer: Any = None,
        modules_to_not_convert: list[str] | None = None,
        config_version: int = CONFIG_VERSION,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
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
        self.dataset = dataset
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.seed = seed
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        self.modules_to_not_convert = modules_to_not_convert
        self.config_version = config_version
        if kwargs:
            logger.warning(
                "BCQuantizationConfig: ignoring unknown keys %s (written by a newer version?)", sorted(kwargs)
            )
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise ValueError naming the field, the value, what is allowed and the fix."""
        _check(
            self.bits in SUPPORTED_BITS and type(self.bits) is int, "bits", self.bits, str(SUPPORTED_BITS), "bits=4"
        )
        _check(
            type(self.group_size) is int and (self.group_size == -1 or self.group_size > 0),
            "group_size",
            self.group_size,
            "-1 (per output channel) or a positive int",
            "group_size=128",
        )
        for flag in ("sym", "desc_act", "comq_update_scale", "true_sequential", "bias_compensation", "bc_layer"):
            value = getattr(self, flag)
            _check(isinstance(value, bool), flag, value, "True or False", f"{flag}=True")
        _check(
            self.method in available_algorithms(), "method", self.method, str(available_algorithms()), 'method="gptq"'
        )
        _check(
            isinstance(self.damp_percent, float | int) and 0 < self.damp_percent < 1,
            "damp_percent",
            self.damp_percent,
            "a float in (0, 1)",
            "damp_percent=0.01",
        )
        _check(
            type(self.comq_sweeps) is int and 1 <= self.comq_sweeps <= 100,
            "comq_sweeps",
            self.comq_sweeps,
            "an int in [1, 100]",
            "comq_sweeps=1",
        )
        _check(
            isinstance(self.erq_lambda, float | int) and not isinstance(self.erq_lambda, bool) and self.erq_lambda > 0,
            "erq_lambda",
            self.erq_lambda,
            "a float > 0 (relative to the mean input Gram diagonal)",
            "erq_lambda=0.01",
        )
        _check(
            isinstance(self.erq_chunk, float | int)
            and not isinstance(self.erq_chunk, bool)
            and 0 < self.erq_chunk <= 1,
            "erq_chunk",
            self.erq_chunk,
            "a float in (0, 1]",
            "erq_chunk=0.5",
        )
        _check(self.bc_target in BC_TARGETS, "bc_target", self.bc_target, str(BC_TARGETS), 'bc_target="float"')
        _check(
            self.bc_layer is False or self.bias_compensation,
            "bc_layer",
            self.bc_layer,
            "True only together with bias_compensation=True",
            "set bias_compensation=True or bc_layer=False",
        )
        _check(
            self.bc_granularity in BC_GRANULARITIES,
            "bc_granularity",
            self.bc_granularity,
            str(BC_GRANULARITIES),
            'bc_granularity="channel"',
        )
        _check(
            self.bc_granularity == "channel" or self.bias_compensation,
            "bc_granularity",
            self.bc_granularity,
            '"position" only together with bias_compensation=True',
            "set bias_compensation=True",
        )
        for field, low in (("num_samples", 1), ("seq_len", 2), ("batch_size", 1)):
            value = getattr(self, field)
            _check(type(value) is int and value >= low, field, value, f"an int >= {low}", f"{field}={max(low, 8)}")
        _check(type(self.seed) is int, "seed", self.seed, "an int", "seed=0")
        _check(
            self.modules_to_not_convert is None
            or (
                isinstance(self.modules_to_not_convert, list | tuple)
                and all(isinstance(m, str) for m in self.modules_to_not_convert)
            ),
            "modules_to_not_convert",
            self.modules_to_not_convert,
            "None or a list of module names",
            'modules_to_not_convert=["lm_head"]',
        )
        _check(
            type(self.config_version) is int and 1 <= self.config_version <= CONFIG_VERSION,
            "config_version",
            self.config_version,
            f"1..{CONFIG_VERSION}",
            "upgrade optimum-bc to read this checkpoint",
        )
        if self.dataset is not None and not isinstance(self.dataset, str | list | tuple):
            _check(
                hasattr(self.dataset, "column_names") or hasattr(self.dataset, "shape"),
                "dataset",
                type(self.dataset).__name__,
                "a name, a path, a list of strings, pre-tokenized ids or a datasets.Dataset",
                'dataset="wikitext2"',
            )

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing with this config runs the model on calibration data."""
        from .algorithms import get_algorithm

        return self.bias_compensation or get_algorithm(self.method).needs_inputs

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict for ``config.json`` (dataset described, tokenizer dropped)."""
        from .data import describe_dataset

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
