"""optimum-bc: post-training quantization (RTN / GPTQ) with bias compensation for transformers.

``import optimum_bc`` registers ``quant_method="bc"`` with transformers; it must run before ``from_pretrained`` of a
BC checkpoint (transformers otherwise skips the unknown quantization and loads random weights).
"""

from ._compat import install_old_paths
from .calibration.report import QuantizationReport
from .config import BCQuantizationConfig
from .integrations.hub import Provenance, push_folder, record_evaluation
from .integrations.quantizer import BCHfQuantizer, load_report, quantize_model, register
from .layers.mxlinear import MXLinear
from .layers.qlinear import QuantLinear
from .version import __version__


install_old_paths()
register()

__all__ = [
    "BCHfQuantizer",
    "BCQuantizationConfig",
    "MXLinear",
    "Provenance",
    "QuantLinear",
    "QuantizationReport",
    "__version__",
    "load_report",
    "push_folder",
    "quantize_model",
    "record_evaluation",
]
