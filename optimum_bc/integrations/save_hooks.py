"""``save_pretrained`` / ``push_to_hub`` of a BC model: an atomic folder swap, the card and plot, optional export.

transformers' quantizer API has no hook after ``save_pretrained`` has written its files (``get_state_dict_and_metadata``
runs before, on the state dict) and none in ``push_to_hub``, whose upload replaces README.md with the target
repository's card or a stub. So :func:`attach` binds these two methods to each BC model (``MethodType``, so a
``deepcopy`` rebinds them to the copy); everything else goes through the quantizer's hooks.
"""

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..calibration.report import QuantizationReport
from ..distributed import rank
from .card_folder import _plot, write_model_card
from .hub_push import push_folder
from .metadata import (
    PLOT_FILENAME,
    PROVENANCE_METADATA_KEY,
    REPORT_METADATA_KEY,
    parse_metadata,
    read_checkpoint_metadata,
)
from .provenance import Provenance, collect_provenance


logger = logging.getLogger(__name__)


def attach(model: Any, checkpoint_files: Sequence[str | os.PathLike[str]] | None = None) -> None:
    """Give a BC model its provenance and the card-writing ``save_pretrained`` / ``push_to_hub``.

    Called by the quantizer after calibration (``checkpoint_files`` None: the provenance is collected now) and after
    a pre-quantized reload (the report and provenance are read back from the checkpoint's metadata).
    """
    if checkpoint_files:
        metadata = read_checkpoint_metadata(checkpoint_files)
        where = os.fspath(checkpoint_files[0])
        if getattr(model, "quantization_report", None) is None:
            model.quantization_report = parse_metadata(
                metadata, REPORT_METADATA_KEY, QuantizationReport.from_dict, where
            )
        provenance = parse_metadata(metadata, PROVENANCE_METADATA_KEY, Provenance.from_dict, where)
        model.quantization_provenance = provenance or Provenance()
    elif getattr(model, "quantization_provenance", None) is None:
        model.quantization_provenance = collect_provenance(getattr(model, "name_or_path", None))
    # Bound to the instance (MethodType, so deepcopy rebinds them to the copy).
    model.save_pretrained = types.MethodType(_save_pretrained_with_card, model)
    model.push_to_hub = types.MethodType(_push_to_hub_with_card, model)


_PUSH_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "revision", "tags")


#: files of a previous save that belong to the old weights: never carried into a new save (a stale
#: model.safetensors beside new shards would be what from_pretrained loads).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".index.json")


_REWRITTEN = ("config.json", "generation_config.json", "adapter_config.json", PLOT_FILENAME)


def _carry_over(old: Path, new: Path) -> None:
    """Copy the files a save does not rewrite (tokenizer, README.md, ...) from the folder being replaced.

    ``model.save_pretrained(d); tokenizer.save_pretrained(d)`` in either order must keep both, as transformers' own
    in-place save does; the old weights, index and config are left behind.
    """
    if not old.is_dir():
        return
    for path in sorted(old.rglob("*")):
        rel = path.relative_to(old)
        if rel.parts[0].startswith(".") or path.name.endswith(_WEIGHT_SUFFIXES) or rel.as_posix() in _REWRITTEN:
            continue
        if path.is_dir():
            (new / rel).mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            (new / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, new / rel)  # a copy, not a hard link: files rewritten here must not change the old


def canonical_safetensors_headers(folder: str | os.PathLike[str]) -> None:
    """Rewrite the JSON header of every ``.safetensors`` file in ``folder`` with sorted keys, in place.

    safetensors writes its header from a hash map, so the key order (the metadata's above all) changes from one
    process to the next; sorted, two saves of the same tensors and metadata are byte-identical. The header keeps
    its length (padded with spaces, as safetensors pads it), so the tensor data does not move.
    """
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "r+b") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            if len(text) > size:
                raise ValueError(f"cannot canonicalize the header of {path}: it would grow from {size} bytes")
            f.seek(8)
            f.write(text + b" " * (size - len(text)))


@contextlib.contextmanager
def _without_timings(model: Any, enabled: bool) -> Iterator[None]:
    """While saving with ``reproducible=True``: the report's timings and the quantization time are left out, so the
    saved files depend only on the weights and settings (byte-identical across runs with the same seed and threads).
    """
    report = getattr(model, "quantization_report", None)
    provenance = getattr(model, "quantization_provenance", None)
    if not enabled:
        yield
        return
    if report is not None:
        model.quantization_report = report.without_timings()
    if provenance is not None:
        model.quantization_provenance = dataclasses.replace(provenance, quantized_at=None)
    try:
        yield
    finally:
        model.quantization_report, model.quantization_provenance = report, provenance


def _export_kwargs(
    model: Any, save_format: str, drop_sink_bias: bool, args: tuple, kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """``write_export`` keywords for a stock-layout ``save_format`` (None: the native layout), checked before writing."""
    if save_format == "native":
        return None
    from ..export import check_exportable

    known = ("is_main_process", "token", "max_shard_size")
    unsupported = sorted(k for k in kwargs if k not in known) + (["args"] if args else [])
    if unsupported:
        raise ValueError(
            f"save_pretrained(save_format={save_format!r}) takes only {list(known)}, not {unsupported}. Fix: "
            "drop them, or use save_format='native'."
        )
    check_exportable(model, save_format, drop_sink_bias=drop_sink_bias)
    shard = {"max_shard_size": kwargs["max_shard_size"]} if "max_shard_size" in kwargs else {}
    return {"drop_sink_bias": drop_sink_bias, **shard}


def _save_pretrained_with_card(self: Any, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` that also writes README.md + layer_errors.png; ``push_to_hub=True`` uploads our card.

    ``write_card=False`` / ``write_plot=False`` leave out README.md / layer_errors.png (each on by default).

    ``save_format="compressed-tensors"`` / ``"gptq"`` writes that layout instead (:mod:`optimum_bc.export`; then only
    ``max_shard_size``, ``is_main_process``, ``token`` and ``drop_sink_bias`` are accepted).

    The folder is written beside ``save_directory`` and swapped in (:func:`optimum_bc.export.atomic.atomic_folder`): a crash
    at any moment leaves the previous checkpoint or the new one, and no stale weights of another layout.
    ``reproducible=True`` leaves the recorded timings out, so two runs with the same seed and thread count save
    byte-identical files.
    """
    from ..export.atomic import atomic_folder

    push = kwargs.pop("push_to_hub", False)
    reproducible = kwargs.pop("reproducible", False)
    save_format = kwargs.pop("save_format", "native")
    drop_sink_bias = kwargs.pop("drop_sink_bias", False)
    write_card = kwargs.pop("write_card", True)
    write_plot = kwargs.pop("write_plot", True)
    hub_kwargs = {k: kwargs.pop(k) for k in _PUSH_KWARGS if k in kwargs}
    export_kwargs = _export_kwargs(self, save_format, drop_sink_bias, args, kwargs)
    is_main = kwargs.get("is_main_process", args[0] if args else True)
    if not is_main and export_kwargs is not None:  # an export is written by the main process alone
        return None
    if not is_main or getattr(self, "_hf_peft_config_loaded", False):  # an adapter-only save is not our model
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if rank() != 0:  # data-parallel ranks hold the same model: rank 0 alone writes it, as transformers does
        logger.info("optimum-bc: rank %d leaves saving %s to rank 0", rank(), os.fspath(save_directory))
        return None
    with atomic_folder(save_directory, overwrite=True) as tmp, _without_timings(self, reproducible):
        _carry_over(Path(save_directory), tmp)
        if export_kwargs is None:
            result = type(self).save_pretrained(self, tmp, *args, **kwargs)
        else:
            from ..export import write_export

            result = write_export(self, tmp, save_format, **export_kwargs)
        if reproducible:
            canonical_safetensors_headers(tmp)
        if write_card:
            name = Path(save_directory).absolute().name
            tags = getattr(self, "model_tags", None) or ()
            write_model_card(tmp, tags=tags, model_ref=name, render_plot=write_plot)
        elif write_plot:
            _plot(getattr(self, "quantization_report", None), tmp / PLOT_FILENAME)
    if push:
        repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
        tags = [*(getattr(self, "model_tags", None) or ()), *(hub_kwargs.pop("tags", None) or ())]
        push_folder(save_directory, repo_id, token=kwargs.get("token"), tags=tags, **hub_kwargs)
    return result


def _push_to_hub_with_card(
    self: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | str | None = None,
    **kwargs: Any,
) -> Any:
    """``push_to_hub`` whose upload carries our card (transformers' would replace it with the repo's or a stub)."""
    if getattr(self, "_hf_peft_config_loaded", False):
        return type(self).push_to_hub(
            self,
            repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            max_shard_size=max_shard_size,
            tags=tags,
            **kwargs,
        )
    if rank() != 0:  # data-parallel ranks hold the same model: rank 0 alone uploads it
        return None
    extra = [tags] if isinstance(tags, str) else list(tags or ())
    with tempfile.TemporaryDirectory(prefix="optimum-bc-upload-") as tmp:
        type(self).save_pretrained(self, tmp, max_shard_size=max_shard_size, **kwargs)
        return push_folder(
            tmp,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            commit_description=commit_description,
            create_pr=create_pr,
            token=token,
            tags=[*(getattr(self, "model_tags", None) or ()), *extra],
        )
