"""Command-line options generated from ``BCQuantizationConfig``, and the loading / verbosity options of the CLI.

Every ``__init__`` parameter of the config becomes a flag (``--group-size`` for ``group_size``) with its type, its
allowed values (:func:`optimum_bc.config.field_choices`) and its help text (the class docstring's ``Args:``), so a
new config field appears in the CLI without touching this module. Unset flags stay ``None`` and the config's own
defaults apply.
"""

import argparse
import inspect
import json
import logging
import re
import typing
from typing import Any

import torch


#: Config parameters that have no flag: objects (tokenizer) or bookkeeping (config_version).
NO_FLAG = ("self", "tokenizer", "config_version", "kwargs")
#: Where the CLI's default differs from the config's: the CLI always calibrates on something that needs no network.
CLI_DEFAULTS = {"dataset": "wiki-vital"}
#: Extra spellings: the CLI's old --format, and GPTQConfig's model_seqlen.
ALIASES = {"weight_format": ("--format",), "seq_len": ("--model-seqlen",)}
#: Fields whose bad values the config refuses itself, with a longer message than argparse's (close names, the fix).
CONFIG_CHECKS_CHOICE = ("weight_format",)
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def flag(name: str) -> str:
    """The command-line spelling of a config field."""
    return "--" + name.replace("_", "-")


def docstring_args(cls: type) -> dict[str, str]:
    """``{name: help}`` from the ``Args:`` section of a Google-style class docstring (whitespace collapsed)."""
    doc = inspect.getdoc(cls) or ""
    section = doc.partition("\nArgs:\n")[2]
    helps: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            name = match.group(1)
            helps[name] = match.group(2)
        elif line.startswith("        ") and name:
            helps[name] += " " + line.strip()
        elif line.strip() and not line.startswith(" "):
            break
    return {k: re.sub(r"``([^`]*)``", r"\1", v).replace("%", "%%") for k, v in helps.items()}


def config_fields(cls: type | None = None) -> dict[str, inspect.Parameter]:
    """The config's ``__init__`` parameters that get a flag."""
    if cls is None:
        from ..config import BCQuantizationConfig

        cls = BCQuantizationConfig
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items() if n not in NO_FLAG and p.kind is p.POSITIONAL_OR_KEYWORD}


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg}): {text!r}") from None


def _kind(annotation: Any) -> tuple[str, type]:
    """``("bool" | "list" | "json" | "scalar", element type)`` of a parameter annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    first = args[0]
    if bool in args:
        return "bool", bool
    if typing.get_origin(first) is list:
        inner = typing.get_args(first)[0] if typing.get_args(first) else str
        return ("json", str) if typing.get_origin(inner) is list else ("list", inner)
    return "scalar", first if first in (int, float, str) else str


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, in the signature's order, under a "quantization" group."""
    from ..config import BCQuantizationConfig, field_choices
    from ..formats import canonical_format

    group = parser.add_argument_group("quantization (BCQuantizationConfig fields; unset = the config's default)")
    helps = docstring_args(BCQuantizationConfig)
    hints = typing.get_type_hints(BCQuantizationConfig.__init__)
    choices = field_choices()
    for name, param in config_fields().items():
        kind, element = _kind(hints.get(name, Any))
        text = helps.get(name, name.replace("_", " "))
        default = CLI_DEFAULTS.get(name, param.default)
        if default is not None and "default" not in text.lower():
            text += f" (default: {default})"
        options: dict[str, Any] = {"dest": name, "default": None, "help": text}
        if kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif kind == "list":
            options.update(nargs="+", type=element, metavar=name.upper())
        elif kind == "json":
            options.update(type=_json_value, metavar="JSON")
        else:
            options["type"] = canonical_format if name == "weight_format" else element
        if name in choices:
            options["metavar"] = "{" + ",".join(map(str, choices[name])) + "}"
            if name not in CONFIG_CHECKS_CHOICE:
                options["choices"] = list(choices[name])
        group.add_argument(flag(name), *ALIASES.get(name, ()), **options)
    group.add_argument(
        "--no-bc", dest="bias_compensation", action="store_false", help="same as --no-bias-compensation"
    )


def config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line (and the CLI's own defaults)."""
    given = {name: getattr(args, name) for name in config_fields() if getattr(args, name, None) is not None}
    return {**CLI_DEFAULTS, **given}


def add_loading_options(parser: argparse.ArgumentParser, dtype_default: str) -> None:
    """``--device`` / ``--device-map`` (exclusive), ``--dtype`` and ``--max-memory`` of ``from_pretrained``."""
    group = parser.add_argument_group("loading")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--device", help="put the whole model on one device: cpu, cuda, cuda:1, mps ... (default cpu)")
    where.add_argument(
        "--device-map",
        help=f"accelerate device map: {', '.join(DEVICE_MAPS)}, a device (cpu, cuda:0), or a JSON object "
        'of module name -> device, e.g. \'{"": "cuda:0"}\'',
    )
    group.add_argument(
        "--dtype", choices=list(DTYPES), default=dtype_default, help=f"weights dtype (default {dtype_default})"
    )
    group.add_argument(
        "--max-memory",
        help='memory per device for --device-map, as JSON (\'{"0": "20GiB", "cpu": "60GiB"}\') or 0=20GiB,cpu=60GiB',
    )


def _device(option: str, value: str) -> str:
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise UsageError(f"{option} {value!r}: {str(err).splitlines()[0]}; use e.g. cpu, cuda or cuda:0") from None
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (backend is not None and backend.is_available()):
        raise UsageError(f"{option} {value!r}: no {device.type} device is available here; use --device cpu")
    count = backend.device_count() if device.type != "cpu" and hasattr(backend, "device_count") else 0
    if device.index is not None and device.type != "cpu" and device.index >= count:
        raise UsageError(f"{option} {value!r}: only {count} {device.type} device(s) here; use {device.type}:0")
    return value


def _max_memory(value: str) -> dict[int | str, str]:
    text = value.strip()
    try:
        raw = json.loads(text) if text.startswith("{") else dict(part.split("=", 1) for part in text.split(","))
    except (json.JSONDecodeError, ValueError):
        raise UsageError(
            f"--max-memory {value!r}: expected JSON or DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=60GiB"
        ) from None
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"--max-memory {value!r}: expected a mapping of device to size, e.g. 0=20GiB,cpu=60GiB")
    return {int(k) if str(k).strip().isdigit() else str(k).strip(): str(v).strip() for k, v in raw.items()}


def loading_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``from_pretrained`` keywords from the loading options; every value is checked here (UsageError)."""
    kwargs: dict[str, Any] = {"dtype": DTYPES[args.dtype]}
    if args.device:
        kwargs["device_map"] = {"": _device("--device", args.device)}
    elif args.device_map:
        text = args.device_map.strip()
        if text.startswith("{"):
            try:
                device_map = json.loads(text)
            except json.JSONDecodeError as err:
                raise UsageError(f'--device-map: not valid JSON ({err.msg}); e.g. \'{{"": "cuda:0"}}\'') from None
            for device in {str(d) for d in device_map.values() if not str(d).isdigit()} - {"disk"}:
                _device("--device-map", device)
            kwargs["device_map"] = device_map
        elif text in DEVICE_MAPS:
            kwargs["device_map"] = text
        else:
            kwargs["device_map"] = {"": _device("--device-map", text)}
    if args.max_memory:
        if "device_map" not in kwargs or isinstance(kwargs["device_map"], dict):
            raise UsageError("--max-memory only applies with --device-map auto / balanced / sequential; add one")
        kwargs["max_memory"] = _max_memory(args.max_memory)
    return kwargs


def set_verbosity(quiet: bool, verbose: bool) -> None:
    """-q: warnings and errors only, no progress bars; default: our progress and info; -v: debug logs as well."""
    from transformers.utils import logging as hf_logging

    from ..calibration.calibrator import set_progress_bars

    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("optimum_bc").setLevel(level)
    hf_logging.set_verbosity(hf_logging.DEBUG if verbose else (hf_logging.ERROR if quiet else hf_logging.WARNING))
    set_progress_bars(not quiet)
    if quiet:
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()
