"""Checks and GPTQConfig-compatible names of ``BCQuantizationConfig`` fields, kept apart from the config class.

``BCQuantizationConfig`` accepts the names a ``transformers.GPTQConfig`` user already writes where they mean the same
thing: ``model_seqlen`` (an alias of ``seq_len``), ``block_name_to_quantize``, ``modules_in_block_to_quantize`` and
``backend``. ``format`` was the number format's old name: it is still read (old ``config.json`` files, and with a
``DeprecationWarning`` from new code), and a GPTQConfig checkpoint-format value is refused with the way to get that
layout.
"""

import math
import warnings
from typing import Any


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
