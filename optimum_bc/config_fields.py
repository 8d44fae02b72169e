"""Checks and GPTQConfig-compatible names of ``BCQuantizationConfig`` fields, kept apart from the config class.

``BCQuantizationConfig`` accepts the names a ``transformers.GPTQConfig`` user already writes where they mean the same
thing: ``model_seqlen`` (an alias of ``seq_len``), ``block_name_to_quantize``, ``modules_in_block_to_quantize`` and
``backend``. ``format`` was the number format's old name: it is still read (old ``config.json`` files, and with a
``DeprecationWarning`` from new code), and a GPTQConfig checkpoint-format value is refused with the way to get that
layout.
"""

import math
import os
import warnings
from typing import Any

from .algorithms import available_algorithms, get_algorithm
from .algorithms.compensation import BC_GRANULARITIES, BC_TARGET_CHOICES
from .formats.formats import MX_BLOCK_SIZE, MX_ELEMENTS


#: Kernel paths a model may pin (the packed layers choose among them: optimum_bc.layers.kernel_paths).
BACKENDS = ("auto", "fast", "reference")


#: GPTQConfig's ``format`` values: they name a checkpoint layout, which optimum-bc chooses when saving.
CHECKPOINT_FORMATS = ("gptq", "gptq_v2", "compressed-tensors")
#: ``config_version`` from which the number format is written as ``weight_format`` (before: ``format``).
WEIGHT_FORMAT_VERSION = 3


def check(ok: bool, field: str, value: object, allowed: str, fix: str) -> None:
    """Raise the config's ValueError naming the field, the value, what is allowed and how to fix it."""
    if not ok:
        raise ValueError(f"BCQuantizationConfig: {field}={value!r} is invalid; allowed: {allowed}. Fix: {fix}")


def is_real(value: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, float | int) and not isinstance(value, bool) and math.isfinite(value)


def pop_seq_len(kwargs: dict[str, Any], seq_len: int | None) -> int | None:
    """``seq_len``, or GPTQConfig's ``model_seqlen`` (the same thing: tokens per calibration window)."""
    alias = kwargs.pop("model_seqlen", None)
    if alias is None:
        return seq_len
    check(
        seq_len is None or seq_len == alias,
        "model_seqlen",
        alias,
        f"the same value as seq_len={seq_len!r} (model_seqlen is GPTQConfig's name for seq_len)",
        "pass only one of seq_len and model_seqlen",
    )
    return alias


def pop_weight_format(kwargs: dict[str, Any], weight_format: str | None, config_version: int) -> str | None:
    """``weight_format``, or the old key ``format`` (silently for configs written before the rename)."""
    if "format" not in kwargs:
        return weight_format
    old = kwargs.pop("format")
    if isinstance(old, str) and old.lower() in CHECKPOINT_FORMATS:
        raise ValueError(
            f"BCQuantizationConfig: format={old!r} names a checkpoint layout (GPTQConfig's meaning), which optimum-bc "
            "chooses when saving, not in the config. Fix: drop format; save with "
            f"model.save_pretrained(folder, save_format={'gptq' if 'gptq' in old.lower() else old.lower()!r}) or "
            "`optimum-bc quantize --save-format ...`; the number format is weight_format (e.g. 'int', 'mxfp4')"
        )
    check(
        weight_format is None or weight_format == old,
        "format",
        old,
        f"the same value as weight_format={weight_format!r} (format is the old name of weight_format)",
        "pass only weight_format",
    )
    if config_version >= WEIGHT_FORMAT_VERSION:
        warnings.warn(
            "BCQuantizationConfig(format=...) is deprecated: the number format is now weight_format=... (format "
            "meant a checkpoint layout in GPTQConfig)",
            DeprecationWarning,
            stacklevel=3,
        )
    return old


def check_backend(value: object) -> None:
    """``backend``: None (the process default, ``optimum_bc.kernels.set_backend``) or one of the kernel backends."""
    check(
        value is None or value in BACKENDS,
        "backend",
        value,
        f"None (the process default of optimum_bc.kernels.set_backend) or one of {BACKENDS} (GPTQConfig's "
        "exllama/marlin/triton backends are other libraries' kernels)",
        'backend="auto" (packed kernels where they fit) or backend="reference" (exact dequantize-once path)',
    )


def check_block_name(value: object) -> None:
    """``block_name_to_quantize``: the dotted path of the one ModuleList of decoder blocks to quantize."""
    names = value if isinstance(value, list | tuple) else [value]
    check(
        value is None
        or (len(names) == 1 and isinstance(names[0], str) and bool(names[0].strip()) and " " not in names[0]),
        "block_name_to_quantize",
        value,
        "None (discovered from the model) or the dotted path of one ModuleList of decoder blocks (a str, or a list "
        "holding one)",
        'block_name_to_quantize="model.layers"',
    )


def block_path(value: str | list[str] | tuple[str, ...] | None) -> str | None:
    """The blocks' dotted path named by ``block_name_to_quantize`` (None: discover it)."""
    if value is None:
        return None
    return value if isinstance(value, str) else value[0]


def check_modules_in_block(value: object) -> None:
    """``modules_in_block_to_quantize``: stages of layer names relative to a block, each name once."""
    ok = value is None or (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(
            isinstance(group, list | tuple) and group and all(isinstance(n, str) and n for n in group)
            for group in value
        )
    )
    flat = [n for group in value for n in group] if ok and value is not None else []
    check(
        ok and len(flat) == len(set(flat)),
        "modules_in_block_to_quantize",
        value,
        "None (every quantizable layer, grouped as observed) or a non-empty list of non-empty lists of layer names "
        "relative to a block, each name once",
        'modules_in_block_to_quantize=[["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], '
        '["self_attn.o_proj"], ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]',
    )


def check_mx(config: Any) -> None:
    """An MX format fixes bits, group size and symmetry; it needs an algorithm that asks the format to round."""
    element = MX_ELEMENTS[config.format]
    check(
        config.bits == element.bits and type(config.bits) is int,
        "bits",
        config.bits,
        f"{element.bits} with format={config.format!r} (its element width); other MX formats: "
        + ", ".join(f"{n}={e.bits}" for n, e in MX_ELEMENTS.items()),
        "leave bits unset, or pick the MX format with the bit width you want",
    )
    check(
        config.group_size == MX_BLOCK_SIZE,
        "group_size",
        config.group_size,
        f"{MX_BLOCK_SIZE} with format={config.format!r} (the MX block size: 32 input columns share one scale)",
        "leave group_size unset (or 32), or use weight_format='int' for other group sizes",
    )
    check(
        config.sym is True,
        "sym",
        config.sym,
        f"True with format={config.format!r} (MX elements are symmetric and have no zero point)",
        "leave sym unset",
    )
    check(
        not config.desc_act,
        "desc_act",
        config.desc_act,
        f"False with format={config.format!r} (an MX block is 32 consecutive input columns; act-order would "
        "scatter them)",
        "desc_act=False",
    )
    if config.method in available_algorithms():
        check(
            get_algorithm(config.method).supports_mx,
            "method",
            config.method,
            f"{[m for m in available_algorithms() if get_algorithm(m).supports_mx]} with format={config.format!r}",
            "one of those methods, or weight_format='int'",
        )


def check_common(config: Any) -> None:
    """Checks shared by every format."""
    check(
        type(config.group_size) is int and (config.group_size == -1 or config.group_size > 0),
        "group_size",
        config.group_size,
        "-1 (per output channel) or a positive int",
        "group_size=128",
    )
    for flag in ("sym", "desc_act", "comq_update_scale", "true_sequential", "bias_compensation", "bc_layer"):
        value = getattr(config, flag)
        check(isinstance(value, bool), flag, value, "True or False", f"{flag}=True")
    check(
        config.method in available_algorithms(), "method", config.method, str(available_algorithms()), 'method="gptq"'
    )
    check(
        is_real(config.damp_percent) and 0 < config.damp_percent < 1,
        "damp_percent",
        config.damp_percent,
        "a float in (0, 1)",
        "damp_percent=0.01",
    )
    check(
        type(config.comq_sweeps) is int and 1 <= config.comq_sweeps <= 100,
        "comq_sweeps",
        config.comq_sweeps,
        "an int in [1, 100]",
        "comq_sweeps=1",
    )
    check(
        config.erq_lambda is None or (is_real(config.erq_lambda) and config.erq_lambda > 0),
        "erq_lambda",
        config.erq_lambda,
        "None or a finite float > 0 (relative to the mean input Gram diagonal)",
        "erq_lambda=0.01",
    )
    check(
        is_real(config.erq_chunk) and 0 < config.erq_chunk <= 1,
        "erq_chunk",
        config.erq_chunk,
        "a float in (0, 1]",
        "erq_chunk=0.5",
    )
    check(
        config.bc_target in BC_TARGET_CHOICES,
        "bc_target",
        config.bc_target,
        str(BC_TARGET_CHOICES),
        'bc_target="auto"',
    )
    check(
        config.bc_layer is False or config.bias_compensation,
        "bc_layer",
        config.bc_layer,
        "True only together with bias_compensation=True",
        "set bias_compensation=True or bc_layer=False",
    )
    check(
        config.bc_granularity in BC_GRANULARITIES,
        "bc_granularity",
        config.bc_granularity,
        str(BC_GRANULARITIES),
        'bc_granularity="channel"',
    )
    check(
        config.bc_granularity == "channel" or config.bias_compensation,
        "bc_granularity",
        config.bc_granularity,
        '"position" only together with bias_compensation=True',
        "set bias_compensation=True",
    )
    for field, low in (("num_samples", 1), ("seq_len", 2), ("batch_size", 1)):
        value = getattr(config, field)
        check(type(value) is int and value >= low, field, value, f"an int >= {low}", f"{field}={max(low, 8)}")
    check(
        type(config.bc_sink_tokens) is int and 0 <= config.bc_sink_tokens <= 64,
        "bc_sink_tokens",
        config.bc_sink_tokens,
        "an int in [0, 64]",
        "bc_sink_tokens=1 (or 0 for one mean over all tokens)",
    )
    check(
        config.bc_sink_tokens < config.seq_len,
        "bc_sink_tokens",
        config.bc_sink_tokens,
        f"fewer than seq_len={config.seq_len} calibration tokens per window",
        "lower bc_sink_tokens or raise seq_len",
    )
    check(type(config.seed) is int and 0 <= config.seed < 2**63, "seed", config.seed, "an int in [0, 2**63)", "seed=0")
    check(
        not isinstance(config.tokenizer, str | bytes | os.PathLike),
        "tokenizer",
        config.tokenizer,
        "None (the model's own) or a loaded tokenizer",
        f"tokenizer=AutoTokenizer.from_pretrained({config.tokenizer!r})",
    )
    check(
        config.offload_activations is None or isinstance(config.offload_activations, bool),
        "offload_activations",
        config.offload_activations,
        "None (decide from free GPU memory), True or False",
        "offload_activations=None",
    )
    check(
        config.modules_to_not_convert is None
        or (
            isinstance(config.modules_to_not_convert, list | tuple)
            and all(isinstance(m, str) for m in config.modules_to_not_convert)
        ),
        "modules_to_not_convert",
        config.modules_to_not_convert,
        "None or a list of module names",
        'modules_to_not_convert=["lm_head"]',
    )
    check_block_name(config.block_name_to_quantize)
    check_modules_in_block(config.modules_in_block_to_quantize)
    check_backend(config.backend)
    check_dataset(config)
    from .formats.activations import check_activation_fields

    check_activation_fields(config)
    check_act_attention(config)


def check_act_attention(config: Any) -> None:
    """``act_attention`` is a bool and needs activation bits (the attention MatMuls use ``act_bits``)."""
    value = getattr(config, "act_attention", False)
    check(isinstance(value, bool), "act_attention", value, "True or False", "act_attention=False")
    check(
        not value or config.act_bits is not None,
        "act_attention",
        value,
        "True only with act_bits set (the attention MatMul inputs take act_bits)",
        "act_bits=8 with act_attention=True, or act_attention=False",
    )


def check_dataset(config: Any) -> None:
    """The dataset's type and shape (a name or path is resolved when calibration data is built)."""
    if config.dataset is None:
        return
    if isinstance(config.dataset, str | os.PathLike):
        check(
            bool(os.fspath(config.dataset).strip()),
            "dataset",
            config.dataset,
            "a name, a path, a list of strings, pre-tokenized ids or a datasets.Dataset",
            'dataset="wiki-vital"',
        )
        return
    from .data.calibration_data import describe_dataset

    try:
        describe_dataset(config.dataset)
    except ValueError as err:
        raise ValueError(
            f"BCQuantizationConfig: dataset={type(config.dataset).__name__!r} is invalid: {err}. Fix: pass one of "
            "those"
        ) from None
