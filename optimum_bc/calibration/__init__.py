"""Calibration and compensation: model discovery, the block-by-block calibration loop, BC biases, the report.

Floor above ``layers``: it builds packed layers (``skeleton``) and fills them block by block (``calibrator``).
``optimum_bc.calibration`` was a module before 0.2 (now ``calibration.calibrator``); its names stay importable here.
"""

from .calibrator import FLOAT_BIASES_ATTR, BlockCalibrator, set_progress_bars
from .streams import ACTIVATION_SHARE, activation_bytes, activation_store, free_memory


__all__ = [
    "ACTIVATION_SHARE",
    "FLOAT_BIASES_ATTR",
    "BlockCalibrator",
    "activation_bytes",
    "activation_store",
    "free_memory",
    "set_progress_bars",
]
