"""Number formats and bit packing: the integer grid, MX element formats, scale primitives, int32 bit streams.

The bottom floor of the package: nothing here imports another optimum_bc module. ``optimum_bc.formats`` was a
module before 0.2; its names stay importable from here.
"""

from .formats import (
    ALIASES,
    E8M0_BIAS,
    E8M0_NAN,
    FORMATS,
    INT_FORMAT,
    MIN_SCALE,
    MX_BLOCK_SIZE,
    MX_ELEMENTS,
    SCALE_DTYPE,
    ElementFormat,
    Grid,
    IntFormat,
    IntGrid,
    MXFormat,
    MXGrid,
    QParams,
    WeightFormat,
    canonical_format,
    check_mx_shapes,
    compute_qparams,
    dequantize_codes,
    e8m0_to_scale,
    get_format,
    is_mx,
    mx_scale,
    quantize_codes,
    scale_to_e8m0,
)
