"""Old import paths of modules that moved in 0.2: each old module aliases the new one and warns."""

import importlib
import sys
import warnings


REMOVED_IN = "0.3"


def moved_message(old: str, new: str) -> str:
    """The deprecation text for a moved module or name."""
    return f"{old} moved to {new}; the old path will be removed in {REMOVED_IN}"


def alias_module(old: str, new: str) -> None:
    """Make the module ``old`` the same object as ``new`` (so monkeypatching and private names keep working).

    ``stacklevel=3`` points at the importing line: ``warnings.warn`` skips importlib's own frames.
    """
    warnings.warn(moved_message(old, new), DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
