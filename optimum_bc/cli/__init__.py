"""The ``optimum-bc`` command line: quantize, export, eval, lm-eval, report, push, demo.

Exit codes: 0 success; 2 bad arguments or settings, found before any weight is read (argparse, config validation,
the MODEL folder, the datasets, the settings checked against the model's config); 1 a failure during the work. Each
error is one line on stderr (the traceback too with ``-v/--verbose``).
"""

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from ..version import __version__
from .args import (
    UsageError,
    add_config_options,
    add_loading_options,
    config_kwargs,
    loading_kwargs,
    set_verbosity,
)
from .checks import check_dataset_arg, check_model_arg, check_model_settings, check_seq_len, usage_errors


logger = logging.getLogger("optimum_bc")

__all__ = ["UsageError", "main"]


def _version() -> str:
    import torch
    import transformers

    return f"optimum-bc {__version__} (transformers {transformers.__version__}, torch {torch.__version__})"


def _build_parser() -> argparse.ArgumentParser:
    from .extra import add_parsers

    parser = argparse.ArgumentParser(
        prog="optimum-bc",
        description="Post-training quantization (RTN / GPTQ / COMQ / ERQ, integer and MX formats) with bias "
        "compensation for transformers models.",
    )
    parser.add_argument("--version", action="version", version=_version())
    common = argparse.ArgumentParser(add_help=False)
    noise = common.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="only results and errors: no logs, no progress bars")
    noise.add_argument(
        "-v", "--verbose", "--debug", action="store_true", help="debug logs, and the traceback of an error"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser(
        parents=[common],
        name="quantize",
        help="quantize a model and save it",
        description="Quantize MODEL into --output. Every BCQuantizationConfig field has a flag; the settings are "
        "checked against MODEL's config.json before any weight is read.",
    )
    q.add_argument("model", help="Hub id or local folder of a float causal LM")
    q.add_argument("--output", required=True, help="folder to write the quantized model into (must not exist)")
    q.add_argument("--gguf-file", help="GGUF file inside MODEL: dequantized by transformers, then quantized")
    q.add_argument("--eval-dataset", help="also print perplexity on this evaluation text")
    q.add_argument(
        "--reproducible",
        action="store_true",
        help="leave timings out of the saved report: same seed and thread count -> byte-identical files",
    )
    q.add_argument("--eval-max-samples", type=int, help="evaluate only the first N windows of --eval-dataset")
    q.add_argument(
        "--save-format",
        default="native",
        choices=["native", "compressed-tensors", "gptq"],
        help="checkpoint layout: native (optimum-bc, default) or one stock transformers / vLLM load (then "
        "--bc-sink-tokens defaults to 0: stock classes hold no first-token bias)",
    )
    x = sub.add_parser(
        "export",
        parents=[common],
        help="rewrite a BC checkpoint in a layout stock loaders read",
        description="Reload SRC_DIR (a folder written by `optimum-bc quantize` or save_pretrained) and write it to "
        "DST_DIR as compressed-tensors or GPTQ, which stock transformers and vLLM load without optimum-bc.",
    )
    x.add_argument("src_dir", help="folder of a BC-quantized model (native layout)")
    x.add_argument("dst_dir", help="folder to write (must not exist unless --overwrite)")
    x.add_argument("--format", required=True, choices=["compressed-tensors", "gptq"], help="target layout")
    x.add_argument("--overwrite", action="store_true", help="replace DST_DIR once the new folder is complete")
    for p in (q, x):
        p.add_argument(
            "--drop-sink-bias",
            action="store_true",
            help="export a model quantized with --bc-sink-tokens > 0 without its first-token biases (refused "
            "otherwise: it measured worse than no compensation)",
        )
    add_loading_options(q, dtype_default="float32")
    add_config_options(q)

    e = sub.add_parser(
        parents=[common],
        name="eval",
        help="print perplexity",
        description="Perplexity of a model on an evaluation text.",
    )
    e.add_argument("model", help="quantized folder, float folder or Hub id")
    e.add_argument("--dataset", default="wiki-vital", help="evaluation text name or path (wiki-vital)")
    e.add_argument("--seq-len", type=int, default=2048, help="window length (2048)")
    e.add_argument("--max-samples", type=int, help="evaluate only the first N windows")
    e.add_argument("--gguf-file", help="GGUF file inside MODEL")
    add_loading_options(e, dtype_default="auto")

    r = sub.add_parser(
        parents=[common],
        name="report",
        help="per-layer error table and plot",
        description="Show a saved model's report.",
    )
    r.add_argument("directory", help="folder written by `optimum-bc quantize` or save_pretrained")
    r.add_argument("--plot", help="PNG path for the per-layer error plot (default DIRECTORY/layer_errors.png)")
    add_parsers(sub, common)
    return parser


def _load_float(model_id: str, gguf_file: str | None, load: dict[str, Any]) -> tuple[Any, Any]:
    """Float model + tokenizer; a GGUF file is dequantized by transformers and its quantizer detached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model_id, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_id, **load, **kwargs)
    if gguf_file:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    return model, tokenizer


def _config_from_args(args: argparse.Namespace, tokenizer: Any = None, **overrides: Any) -> Any:
    """The ``BCQuantizationConfig`` of the command line (ValueError on a bad combination)."""
    from ..config import BCQuantizationConfig

    return BCQuantizationConfig(**{**config_kwargs(args), **overrides}, tokenizer=tokenizer)


def _check_quantize_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Every check of ``quantize`` that reads no weight; returns the config (without tokenizer) and load kwargs."""
    if os.path.exists(args.output) and os.listdir(args.output):
        raise UsageError(
            f"--output {args.output!r} exists and is not empty; choose a new folder (nothing is overwritten)"
        )
    overrides = {}
    if args.save_format != "native" and args.bc_sink_tokens is None:
        overrides["bc_sink_tokens"] = 0  # the export-friendly BC: stock classes hold no first-token bias
        logger.info(
            "--save-format %s: using --bc-sink-tokens 0 (stock classes hold no first-token bias)", args.save_format
        )
    with usage_errors():
        config = _config_from_args(args, **overrides)
        if args.save_format != "native":
            from ..export import check_config_exportable

            check_config_exportable(config, args.save_format, args.drop_sink_bias)
    load = loading_kwargs(args)
    check_model_arg(args.model, args.gguf_file)
    check_dataset_arg("--dataset", str(config.dataset))
    if args.eval_dataset:
        check_dataset_arg("--eval-dataset", args.eval_dataset)
    if not args.gguf_file:
        check_model_settings(args.model, config, args.save_format, args.drop_sink_bias)
    return config, load


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..distributed import run_on_main
    from ..export.atomic import atomic_folder
    from ..integrations.card_folder import write_model_card
    from ..integrations.quantizer import quantize_model
    from ..integrations.save_hooks import _without_timings, canonical_safetensors_headers

    config, load = _check_quantize_args(args)
    model, tokenizer = _load_float(args.model, args.gguf_file, load)
    if args.save_format != "native":  # layer widths the format cannot group (GGUF models are only known now)
        from ..export import check_float_model_exportable

        with usage_errors():
            check_float_model_exportable(model, config, args.save_format, args.drop_sink_bias)
    config.tokenizer = tokenizer
    report = quantize_model(model, config)
    if not args.quiet:
        print(report.format_table())
    ppl, eval_error = None, None
    if args.eval_dataset:  # before saving, so the result lands in the card's model-index
        from ..data.evaluation import evaluate_perplexity
        from ..integrations.provenance import record_evaluation

        try:
            ppl = evaluate_perplexity(
                model,
                tokenizer,
                args.eval_dataset,
                seq_len=config.seq_len,
                max_samples=args.eval_max_samples,
                progress=not args.quiet,
            )
            record_evaluation(model, args.eval_dataset, ppl, seq_len=config.seq_len, max_samples=args.eval_max_samples)
        except Exception as err:  # noqa: BLE001 - save the quantized model anyway, then report the failure
            eval_error = err
    if args.save_format != "native":  # layer checks of the export, before anything is written
        from ..export import check_exportable

        check_exportable(model, args.save_format, args.drop_sink_bias)

    # A private folder beside --output, swapped in whole: an interrupted save never leaves a half-written --output,
    # and a concurrent run with the same --output fails here instead of claiming the other run's folder.
    def save() -> None:
        try:
            with atomic_folder(args.output, overwrite=False) as tmp, _without_timings(model, args.reproducible):
                if args.save_format == "native":
                    type(model).save_pretrained(model, tmp)
                else:
                    from ..export import write_export

                    write_export(model, tmp, args.save_format, drop_sink_bias=args.drop_sink_bias)
                if args.reproducible:
                    canonical_safetensors_headers(tmp)
                tokenizer.save_pretrained(tmp)
                write_model_card(tmp, model_ref=os.path.basename(os.path.abspath(args.output)))
        except ValueError as err:  # the export was checked above: what is left is the target folder
            raise UsageError(f"--output: {err}") from err

    # Under torchrun every rank holds the same model: rank 0 writes it, the others wait and fail if it fails.
    run_on_main(save, f"save --output {args.output!r}")
    print(f"saved {len(report.layers)} quantized layers to {args.output} ({report.total_seconds:.1f} s)")
    if eval_error is not None:
        raise eval_error
    if ppl is not None:
        print(f"perplexity on {args.eval_dataset}: {ppl:.3f}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from ..config import BCQuantizationConfig
    from ..export import check_config_exportable, export_model
    from ..integrations.card_folder import _TOKENIZER_FILES, _read_bc_config, write_model_card

    src = Path(args.src_dir)
    if not src.is_dir():
        raise UsageError(f"SRC_DIR {args.src_dir!r} is not a folder; pass a folder written by `optimum-bc quantize`")
    with usage_errors("SRC_DIR"):
        settings = BCQuantizationConfig.from_dict(_read_bc_config(src)["quantization_config"])
        check_config_exportable(settings, args.format, args.drop_sink_bias)
    if os.path.exists(args.dst_dir) and not args.overwrite:
        raise UsageError(f"DST_DIR {args.dst_dir!r} already exists; pick a new folder or pass --overwrite")
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    extra = [src / name for name in (*_TOKENIZER_FILES, "special_tokens_map.json", "chat_template.jinja")]
    out = export_model(
        model,
        args.dst_dir,
        args.format,
        overwrite=args.overwrite,
        extra_files=[f for f in extra if f.is_file()],
        drop_sink_bias=args.drop_sink_bias,
    )
    write_model_card(out, render_plot=False)
    print(f"exported {args.src_dir} to {args.dst_dir} as {args.format}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..data.evaluation import evaluate_perplexity

    check_model_arg(args.model, args.gguf_file)
    check_dataset_arg("--dataset", args.dataset)
    load = loading_kwargs(args)
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    check_seq_len(AutoConfig.from_pretrained(args.model, **kwargs), args.seq_len)
    tokenizer = AutoTokenizer.from_pretrained(args.model, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(args.model, **load, **kwargs)
    ppl = evaluate_perplexity(
        model, tokenizer, args.dataset, seq_len=args.seq_len, max_samples=args.max_samples, progress=not args.quiet
    )
    print(f"perplexity on {args.dataset} ({args.seq_len}-token windows): {ppl:.3f}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..calibration.plotting import plot_layer_errors
    from ..integrations.quantizer import load_report

    with usage_errors("DIRECTORY"):
        report = load_report(args.directory)
    path = args.plot or os.path.join(args.directory, "layer_errors.png")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(f"--plot {path!r}: the folder {folder!r} does not exist or is not writable; create it first")
    print(report.format_table())
    plot_layer_errors(report, path)
    print(f"per-layer error plot written to {path}")
    return 0


def _commands() -> dict[str, Any]:
    from .extra import cmd_demo, cmd_lm_eval, cmd_push

    return {
        "quantize": cmd_quantize,
        "export": cmd_export,
        "eval": cmd_eval,
        "lm-eval": cmd_lm_eval,
        "report": cmd_report,
        "push": cmd_push,
        "demo": cmd_demo,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optimum-bc`` console script; returns the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    set_verbosity(args.quiet, args.verbose)
    try:
        return _commands()[args.command](args)
    except UsageError as err:
        if args.verbose:
            traceback.print_exc()
        print(f"optimum-bc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the CLI turns every failure into one line + exit code 1
        if args.verbose:
            traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"optimum-bc {args.command}: failed: {type(err).__name__}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
