"""Model cards and Hub uploads for BC-quantized models: the public names, gathered from the modules that do the work.

Everything the card says comes from the saved folder: ``config.json`` (quantization and calibration settings), the
QuantizationReport and the :class:`Provenance` stored in the safetensors metadata (base model, its card, package
versions, evaluation results). So a card can be rebuilt from any folder written by ``save_pretrained``, which is what
``optimum-bc push`` does, and ``model.save_pretrained`` / ``model.push_to_hub`` of a BC model write the same card.

* :mod:`.metadata`: metadata keys and file names of a saved folder, reading them back.
* :mod:`.provenance`: :class:`Provenance`, :func:`record_evaluation`.
* :mod:`.hub_card`: the card's metadata and text (:func:`build_model_card`).
* :mod:`.card_folder`: the card and plot of a saved folder (:func:`write_model_card`).
* :mod:`.hub_push`: one-commit upload (:func:`push_folder`).
* :mod:`.save_hooks`: the BC model's ``save_pretrained`` / ``push_to_hub``.

``optimum_bc.hub`` (before 0.2) is an alias of this module.
"""

from .card_folder import card_for_folder, write_model_card
from .hub_card import build_model_card, is_generated_card
from .hub_push import PushError, commit_operations, push_folder
from .metadata import (
    CARD_FILENAME,
    PLOT_FILENAME,
    PROVENANCE_METADATA_KEY,
    REPORT_METADATA_KEY,
    parse_metadata,
    read_checkpoint_metadata,
)
from .provenance import Provenance, collect_provenance, hub_id_of, load_provenance, package_versions, record_evaluation
from .save_hooks import attach, canonical_safetensors_headers


__all__ = [
    "CARD_FILENAME",
    "PLOT_FILENAME",
    "PROVENANCE_METADATA_KEY",
    "REPORT_METADATA_KEY",
    "Provenance",
    "PushError",
    "attach",
    "build_model_card",
    "canonical_safetensors_headers",
    "card_for_folder",
    "collect_provenance",
    "commit_operations",
    "hub_id_of",
    "is_generated_card",
    "load_provenance",
    "package_versions",
    "parse_metadata",
    "push_folder",
    "read_checkpoint_metadata",
    "record_evaluation",
    "write_model_card",
]
