"""Old import paths of the modules that moved in 0.2 (``optimum_bc.qlinear`` -> ``optimum_bc.layers.qlinear``, ...).

No file sits at an old path: a finder on ``sys.meta_path`` (installed by ``import optimum_bc``) answers them, so git
sees each move as a pure rename. Importing an old path warns once and gives the new module itself (the same object:
monkeypatching and private names keep working).
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType


REMOVED_IN = "0.3"

#: Old module -> new module.
MOVED = {
    "optimum_bc.architectures": "optimum_bc.calibration.architectures",
    "optimum_bc.atomic": "optimum_bc.export.atomic",
    "optimum_bc.block_bias": "optimum_bc.calibration.block_bias",
    "optimum_bc.block_inputs": "optimum_bc.calibration.block_inputs",
    "optimum_bc.compensation": "optimum_bc.algorithms.compensation",
    "optimum_bc.dense": "optimum_bc.integrations.dense",
    "optimum_bc.dequant": "optimum_bc.layers.dequant",
    "optimum_bc.discovery": "optimum_bc.calibration.discovery",
    "optimum_bc.evaluation": "optimum_bc.data.evaluation",
    "optimum_bc.hub": "optimum_bc.integrations.hub",
    "optimum_bc.kernels": "optimum_bc.layers.kernels",
    "optimum_bc.lm_eval_adapter": "optimum_bc.integrations.lm_eval",
    "optimum_bc.mxlinear": "optimum_bc.layers.mxlinear",
    "optimum_bc.offload": "optimum_bc.calibration.offload",
    "optimum_bc.packaged": "optimum_bc.data.packaged",
    "optimum_bc.packed_base": "optimum_bc.layers.packed_base",
    "optimum_bc.packing": "optimum_bc.formats.packing",
    "optimum_bc.peft": "optimum_bc.integrations.peft",
    "optimum_bc.plotting": "optimum_bc.calibration.plotting",
    "optimum_bc.positions": "optimum_bc.layers.positions",
    "optimum_bc.primitives": "optimum_bc.formats.primitives",
    "optimum_bc.qlinear": "optimum_bc.layers.qlinear",
    "optimum_bc.quantizer": "optimum_bc.integrations.quantizer",
    "optimum_bc.report": "optimum_bc.calibration.report",
    "optimum_bc.text_stream": "optimum_bc.data.text_stream",
    "optimum_bc.validation": "optimum_bc.layers.validation",
}


def moved_message(old: str, new: str) -> str:
    """The deprecation text for a moved module or name."""
    return f"{old} moved to {new}; the old path will be removed in {REMOVED_IN}"


class _OldPath(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths in :data:`MOVED`; loading one warns and puts the new module in its place."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        new = MOVED[module.__name__]
        # stacklevel 2 is the importing line: warnings skips importlib's own frames.
        warnings.warn(moved_message(module.__name__, new), DeprecationWarning, stacklevel=2)
        sys.modules[module.__name__] = importlib.import_module(new)  # the import system returns this object


def install_old_paths() -> None:
    """Answer the old import paths (idempotent). First on ``sys.meta_path``: it answers only the names in
    :data:`MOVED`, and an editable install's finder would otherwise map them to files of another checkout."""
    if not any(isinstance(finder, _OldPath) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldPath())
