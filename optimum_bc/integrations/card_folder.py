"""The card of a saved folder: read its config.json and metadata, draw the per-layer plot, write README.md."""

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..calibration.report import QuantizationReport
from .hub_card import _kept_cards, build_model_card, is_generated_card
from .metadata import (
    CARD_FILENAME,
    PLOT_FILENAME,
    PROVENANCE_METADATA_KEY,
    REPORT_METADATA_KEY,
    folder_metadata,
    parse_metadata,
)
from .provenance import Provenance


logger = logging.getLogger(__name__)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def card_for_folder(
    directory: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    tags: Iterable[str] = (),
    kept_cards: Sequence[str] = (),
    has_plot: bool | None = None,
    model_ref: str | None = None,
) -> Any:
    """Build the card of a folder written by ``save_pretrained`` from its config.json and safetensors metadata.

    ``has_plot`` None: link the plot when the report has per-layer MSEs. ``model_ref``: the folder name the loading
    snippet shows (default: the folder's own name; a folder written before being swapped in passes its final name).
    """
    folder = Path(directory)
    config = _read_bc_config(folder)
    report, provenance = _folder_report_and_provenance(folder)
    has_tokenizer = any((folder / f).is_file() for f in _TOKENIZER_FILES)
    return build_model_card(
        config["quantization_config"],
        report,
        provenance,
        repo_id=repo_id,
        model_ref=model_ref or folder.resolve().name,
        tokenizer_ref=None if has_tokenizer or provenance is None else provenance.base_model,
        tags=tags,
        architectures=config.get("architectures"),
        has_plot=_has_mse(report) if has_plot is None else has_plot,
        kept_cards=kept_cards,
        exported=config.get(_EXPORTED_KEY),
    )


def _folder_report_and_provenance(folder: Path) -> tuple[QuantizationReport | None, Provenance | None]:
    metadata = folder_metadata(folder)
    return (
        parse_metadata(metadata, REPORT_METADATA_KEY, QuantizationReport.from_dict, os.fspath(folder)),
        parse_metadata(metadata, PROVENANCE_METADATA_KEY, Provenance.from_dict, os.fspath(folder)),
    )


def _has_mse(report: QuantizationReport | None) -> bool:
    return report is not None and any(r.mse_before is not None for r in report.layers)


#: key _read_bc_config adds for a folder written by optimum_bc.export (its quantization_config "optimum_bc" entry).
_EXPORTED_KEY = "_optimum_bc_export"


def _read_bc_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{os.fspath(folder)!r} has no config.json; pass a folder written by save_pretrained")
    config = json.loads(path.read_text(encoding="utf-8"))
    qc = config.get("quantization_config") or {}
    exported = qc.get("optimum_bc") if isinstance(qc.get("optimum_bc"), dict) else None
    if exported is not None and isinstance(exported.get("bc_config"), dict):  # an optimum_bc.export folder
        info = {**exported, "format": qc.get("quant_method")}
        return {**config, "quantization_config": exported["bc_config"], _EXPORTED_KEY: info}
    if qc.get("quant_method") != "bc":
        raise ValueError(
            f"{os.fspath(folder)!r} is not an optimum-bc checkpoint (config.json quantization_config.quant_method is "
            f"{qc.get('quant_method')!r}, expected 'bc'); quantize it first with `optimum-bc quantize`"
        )
    return config


def _plot(report: QuantizationReport | None, path: Path) -> bool:
    """Render the per-layer plot; False (and a warning) when there is nothing to plot or no matplotlib."""
    if not _has_mse(report):
        return False
    from ..calibration.plotting import plot_layer_errors

    try:
        import matplotlib
    except ImportError as err:
        logger.warning("optimum-bc: per-layer plot skipped, the card will not show it (%s)", err)
        return False
    # plot_layer_errors switches matplotlib to Agg; a save_pretrained in a notebook must not change its backend.
    try:
        previous = matplotlib.get_backend(auto_select=False)
    except TypeError:  # matplotlib < 3.10
        previous = matplotlib.rcParams._get_backend_or_none()
    try:
        plot_layer_errors(report, os.fspath(path))
    finally:
        if previous is not None and matplotlib.rcParams._get_backend_or_none() != previous:
            matplotlib.use(previous)
    return True


def _previous_cards(text: str | None) -> list[str]:
    """Cards to keep from an existing README.md: those an untouched generated card kept, or the whole foreign one.

    The base model's card is not among them: it comes back from the provenance.
    """
    if text is None:
        return []
    return _kept_cards(text, "earlier") if is_generated_card(text) else [text]


def write_model_card(
    directory: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    tags: Iterable[str] = (),
    render_plot: bool = True,
    model_ref: str | None = None,
) -> Path:
    """Write README.md (and layer_errors.png) into a saved BC folder; returns the README path.

    A README.md that optimum-bc did not write (or that someone edited) is not lost: it is kept as a section.
    ``render_plot=False`` links an existing layer_errors.png instead of drawing it again.
    """
    folder = Path(directory)
    path = folder / CARD_FILENAME
    old = path.read_text(encoding="utf-8") if path.is_file() else None
    if render_plot:
        report, _ = _folder_report_and_provenance(folder)
        has_plot = _plot(report, folder / PLOT_FILENAME)
    else:
        has_plot = (folder / PLOT_FILENAME).is_file()
    card = card_for_folder(
        folder, repo_id=repo_id, tags=tags, kept_cards=_previous_cards(old), has_plot=has_plot, model_ref=model_ref
    )
    path.write_text(card.content, encoding="utf-8")
    return path
