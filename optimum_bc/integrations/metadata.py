"""What a saved BC folder holds besides the weights: the safetensors metadata keys (report, provenance), the card
and plot file names, and reading the metadata back without ever failing a load over it.
"""

import json
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar


T = TypeVar("T")


#: safetensors metadata key holding the JSON :class:`~optimum_bc.calibration.report.QuantizationReport`.
REPORT_METADATA_KEY = "optimum_bc.quantization_report"
#: safetensors metadata key holding the JSON :class:`~optimum_bc.integrations.provenance.Provenance`.
PROVENANCE_METADATA_KEY = "optimum_bc.provenance"
#: the per-layer error plot, saved beside the weights and linked from the card.
PLOT_FILENAME = "layer_errors.png"
CARD_FILENAME = "README.md"


def read_checkpoint_metadata(files: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
    """safetensors metadata of the first ``.safetensors`` file among ``files`` (empty if none)."""
    from safetensors import safe_open

    for file in files:
        if os.fspath(file).endswith(".safetensors") and os.path.isfile(file):
            with safe_open(os.fspath(file), "pt") as f:
                return dict(f.metadata() or {})
    return {}


def folder_metadata(directory: str | os.PathLike[str]) -> dict[str, str]:
    # The model's own weights first (a folder may also hold e.g. adapter_model.safetensors).
    files = sorted(Path(directory).glob("*.safetensors"), key=lambda p: (not p.name.startswith("model"), p.name))
    return read_checkpoint_metadata(files)


def parse_metadata(metadata: dict[str, str], key: str, parse: Callable[[dict[str, Any]], T], where: str) -> T | None:
    """``parse(json.loads(metadata[key]))``, or None with a warning when it is missing or damaged.

    The report and provenance are cosmetic (card, ``report`` command): a damaged one must never make the weights
    unloadable.
    """
    raw = metadata.get(key)
    if not raw:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return parse(data)
    except Exception as err:  # noqa: BLE001 - any damage is reported the same way
        warnings.warn(
            f"optimum-bc: the {key!r} metadata of {where} cannot be parsed ({type(err).__name__}: {err}); it is "
            "ignored (the weights are unaffected). Save the model again to rewrite it.",
            stacklevel=2,
        )
        return None
