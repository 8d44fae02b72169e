"""Text data: calibration sets, streamed text sources, perplexity evaluation, packaged models for offline runs.

A bottom floor beside ``formats``: nothing here imports another optimum_bc module outside ``data``.
``optimum_bc.data`` was a module before 0.2; its names stay importable from here.
"""

from .calibration_data import (
    KNOWN_DATASETS,
    MAX_DOC_DRAWS,
    STREAM_THRESHOLD,
    WIKI_VITAL_CALIBRATION_FRACTION,
    Sample,
    TextSource,
    TokenizerLike,
    build_calibration_set,
    describe_dataset,
    load_evaluation_text,
    sample_streamed,
    tokenize_text,
    wiki_vital_articles,
)
from .hub_text import DOC_SEPARATOR, HUB_PROBE_TIMEOUT_S, OFFLINE_ALTERNATIVES, Split
