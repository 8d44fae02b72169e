"""The model card of a BC-quantized model: metadata (base model, tags, ``model-index``) and the Markdown text.

Everything the card says comes from the saved folder: ``config.json`` (quantization and calibration settings), the
QuantizationReport and the :class:`~optimum_bc.integrations.provenance.Provenance` stored in the safetensors metadata
(base model, its card, package versions, evaluation results). So a card can be rebuilt from any folder written by
``save_pretrained`` (:mod:`.card_folder`), which is what ``optimum-bc push`` does (:mod:`.hub_push`).
"""

import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from ..calibration.report import QuantizationReport
from .metadata import PLOT_FILENAME
from .provenance import _KNOWN_DATASETS, Provenance


logger = logging.getLogger(__name__)

#: last line of a generated card; the hash tells an untouched generated card from one a person edited.
_CARD_MARKER = re.compile(r"\n<!-- optimum-bc:model-card sha256=([0-9a-f]{16}) -->\n?$")
_KEPT_START = "<!-- optimum-bc:kept-card:start {kind} -->"
_KEPT_END = "<!-- optimum-bc:kept-card:end -->"
_PAPER = "https://arxiv.org/abs/2404.01892"
_PIPELINE_BY_SUFFIX = (("ForCausalLM", "text-generation"),)


# --------------------------------------------------------------------------------------------------- the card


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(metadata, body) of a Markdown card, parsed by huggingface_hub's ``ModelCard``; malformed metadata is absent."""
    import yaml
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    match = REGEX_YAML_BLOCK.search(text)
    if not match:
        return {}, text
    try:
        card = ModelCard(text, ignore_metadata_errors=True)
    except (ValueError, yaml.YAMLError):
        return {}, text[match.end() :]
    return card.data.to_dict(), card.text


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
        lines += ["", f"![Bias-compensation gain per layer type: output MSE after / before BC]({PLOT_FILENAME})"]
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
    "weight_format",
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
    number_format = cfg.get("weight_format", cfg.get("format", "int"))  # "format" before config_version 3
    if number_format != "int":
        scheme = f"{method.upper()} to the OCP MX format `{number_format}` ({bits}-bit elements, 32 per E8M0 scale)"
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
            "LoRA adapters through `optimum_bc.integrations.peft.get_peft_model`.",
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
