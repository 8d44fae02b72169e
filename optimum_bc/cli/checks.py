"""Checks the CLI runs before any weight is read: the MODEL folder, the datasets, and the settings against the
model's config alone (a meta-device skeleton), so a bad combination exits 2 in seconds instead of after loading."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .args import UsageError, flag


@contextmanager
def usage_errors(option: str | None = None) -> Iterator[None]:
    """ValueErrors raised inside are argument errors (exit 2), optionally prefixed with the option at fault."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as err:
        message = str(err)
        for field in ("dataset", "seq_len"):  # the library names its argument: say the CLI's
            if message.startswith(f"{field}="):
                message = f"{flag(field)} " + message.removeprefix(f"{field}=")
        raise UsageError(f"{option}: {message}" if option else message) from err


def check_model_arg(model_id: str, gguf_file: str | None = None) -> None:
    """A MODEL that names a local folder must be one transformers can load; checked before any work."""
    from ..integrations.provenance import hub_id_of

    path = os.path.expanduser(model_id)
    if not os.path.exists(path):
        if hub_id_of(model_id) is None:  # not a Hub id either: a mistyped path
            raise UsageError(f"MODEL {model_id!r}: no such folder (and not a Hub id like org/name); check the path")
        return
    if not os.path.isdir(path):
        raise UsageError(f"MODEL {model_id!r} is a file; pass the folder that holds it (and --gguf-file for GGUF)")
    if gguf_file:
        if not os.path.isfile(os.path.join(path, gguf_file)):
            raise UsageError(f"--gguf-file {gguf_file!r} is not in {model_id!r}; pass a file name inside MODEL")
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"MODEL {model_id!r} holds no config.json; pass a folder written by save_pretrained")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, f)) for f in tokenizer_files):
        raise UsageError(
            f"MODEL {model_id!r} holds no tokenizer (tokenizer.json / tokenizer_config.json); save the tokenizer "
            "beside the model: tokenizer.save_pretrained(folder)"
        )


def check_dataset_arg(option: str, value: str) -> None:
    """A dataset name or path given on the command line resolves, before any model is loaded."""
    from pathlib import Path

    from ..data.calibration_data import DOC_SEPARATOR, _resolve_str, _text_files
    from ..data.text_stream import TextSource

    try:
        kind, resolved = _resolve_str(value)
        if kind == "path":
            TextSource(_text_files(Path(resolved)), DOC_SEPARATOR)  # opens each file: non-UTF-8 text fails here
    except ValueError as err:
        raise UsageError(f"{option} {value!r}: {err}") from None


def check_seq_len(model_config: Any, seq_len: int, option: str = "--seq-len") -> None:
    """Windows longer than the model's position table would fail (or silently degrade) after loading."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise UsageError(
            f"{option} {seq_len} exceeds the model's max_position_embeddings={limit}; pass {option} {limit} or less"
        )


def check_model_settings(model_id: str, config: Any, save_format: str = "native", drop_sink_bias: bool = False) -> Any:
    """Everything about ``config`` that the model's config.json decides, on a meta-device skeleton (no weights).

    The decoder blocks are found (``block_name_to_quantize`` / discovery), the layers the settings convert are
    listed and checked against the number format and the save format's grouping, and ``seq_len`` against the
    position table. Returns the model's ``PretrainedConfig``. ValueErrors become UsageErrors (exit 2).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..api import check_layers, resolve_modules_to_not_convert
    from ..calibration.architectures import resolve_spec

    model_config = AutoConfig.from_pretrained(model_id)
    with usage_errors():
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config)
        spec = resolve_spec(skeleton, config)
        skip = list(config.modules_to_not_convert or resolve_modules_to_not_convert(skeleton, config))
        check_layers(skeleton, spec, config, skip)
        if save_format != "native":
            from ..export import check_float_model_exportable

            check_float_model_exportable(skeleton, config, save_format, drop_sink_bias)
    if config.needs_calibration:
        check_seq_len(model_config, config.seq_len)
    return model_config
