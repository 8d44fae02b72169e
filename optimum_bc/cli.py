"""The ``optimum-bc`` command line: quantize, export, eval, lm-eval, report, push, demo.

Exit codes: 0 success, 2 bad arguments or invalid settings, 1 any other failure (one line on stderr; the traceback
only with ``--debug``).
"""

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch


logger = logging.getLogger("optimum_bc")

DEMO_SETTINGS = ("rtn", "rtn+bc", "gptq", "gptq+bc")


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def _add_quant_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quantization")
    group.add_argument(
        "--bits", type=int, choices=[2, 3, 4, 6, 8], help="bits per weight (default 4; an MX format sets its own)"
    )
    group.add_argument("--method", default="gptq", help="weight quantizer: gptq (default), rtn, comq or erq")
    group.add_argument(
        "--format", default="int", help="weight format: int (default) or an MX format, e.g. mxfp4, mxint4, mxfp8_e4m3"
    )
    group.add_argument(
        "--group-size", type=int, help="columns per scale; -1 = per channel (default 128; MX formats: 32)"
    )
    group.add_argument("--sym", action="store_true", help="symmetric grid (MX formats always are)")
    group.add_argument("--desc-act", action="store_true", help="GPTQ act-order")
    group.add_argument("--damp-percent", type=float, default=0.01, help="GPTQ dampening (0.01)")
    group.add_argument("--comq-sweeps", type=int, default=1, help="COMQ passes over all coordinates (1)")
    group.add_argument("--comq-update-scale", action="store_true", help="COMQ: also optimise the scales")
    group.add_argument("--erq-lambda", type=float, default=0.01, help="ERQ ridge, relative to mean Gram diag (0.01)")
    group.add_argument(
        "--erq-chunk", type=float, default=0.5, help="ERQ: fraction of remaining columns per step (0.5)"
    )
    group.add_argument("--no-bc", action="store_true", help="disable bias compensation")
    group.add_argument("--bc-target", default="sequential", help="sequential (default) or float")
    group.add_argument("--bc-layer", action="store_true", help="also compensate each whole decoder block")
    group.add_argument(
        "--bc-sink-tokens",
        type=int,
        help="first tokens with their own extra bias (default 1; 0 when --save-format is not native: stock classes "
        "hold no first-token bias)",
    )
    data = parser.add_argument_group("calibration data")
    data.add_argument(
        "--dataset", default="wiki-vital", help="wikitext2 | c4 | ptb | wiki-vital (offline) | a .txt file or folder"
    )
    data.add_argument("--num-samples", type=int, default=128, help="calibration windows (128)")
    data.add_argument("--seq-len", type=int, default=2048, help="tokens per window (2048)")
    data.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (1)")
    data.add_argument("--seed", type=int, default=0, help="sampling seed (0)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimum-bc",
        description="Post-training quantization (RTN / GPTQ) with bias compensation for transformers models.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("--quiet", action="store_true", help="only print results")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser(
        parents=[common],
        name="quantize",
        help="quantize a model and save it",
        description="Quantize MODEL into --output.",
    )
    q.add_argument("model", help="Hub id or local folder of a float OPT / LLaMA-family model")
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
        help="checkpoint layout: native (optimum-bc, default) or one stock transformers / vLLM load",
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
    _add_quant_options(q)

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

    lm = sub.add_parser(
        parents=[common],
        name="lm-eval",
        help="run lm-evaluation-harness tasks (extra: eval)",
        description="Score MODEL (a quantized folder, float folder or Hub id) on lm-evaluation-harness tasks and "
        "print lm-eval's table. Needs `pip install 'optimum-bc[eval]'`. Task data comes from the Hub unless the "
        "tasks are defined in YAML files under --include-path with local data files.",
    )
    lm.add_argument("model", help="quantized folder, float folder or Hub id")
    lm.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. arc_easy,hellaswag")
    lm.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (task default)")
    lm.add_argument("--limit", type=float, help="only the first N documents per task (a fraction if < 1)")
    lm.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (1)")
    lm.add_argument("--include-path", help="folder of extra task YAML files")
    lm.add_argument("--output", help="also write lm-eval's results as JSON to this file")

    r = sub.add_parser(
        parents=[common],
        name="report",
        help="per-layer error table and plot",
        description="Show a saved model's report.",
    )
    r.add_argument("directory", help="folder written by `optimum-bc quantize` or save_pretrained")
    r.add_argument("--plot", help="PNG path for the per-layer error plot (default DIRECTORY/layer_errors.png)")

    p = sub.add_parser(
        parents=[common],
        name="push",
        help="upload a quantized folder to the Hub",
        description="Upload DIRECTORY (written by `optimum-bc quantize` or save_pretrained) to the Hub repository "
        "REPO_ID in one commit, with its model card. The token comes from HF_TOKEN or `hf auth login`. A failed "
        "upload commits nothing and never changes DIRECTORY.",
    )
    p.add_argument("directory", help="folder of a BC-quantized model")
    p.add_argument("repo_id", help="target repository, e.g. user/opt-125m-bc-4bit (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    p.add_argument("--commit-message", help="commit message (default: 'Upload N-bit optimum-bc model')")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")

    d = sub.add_parser(
        "demo",
        parents=[common],
        help="offline comparison on the packaged SmolLM2-135M",
        description="Quantize the packaged SmolLM2-135M with RTN and GPTQ, with and without BC, and compare "
        "perplexity on held-out Wikipedia text. Runs offline on CPU in a few minutes.",
    )
    d.add_argument("--bits", type=int, default=3, choices=[2, 3, 4, 8], help="bits per weight (3)")
    d.add_argument("--group-size", type=int, default=128, help="group size (128)")
    d.add_argument("--bc-target", default="sequential", help="sequential (default) or float")
    d.add_argument("--num-samples", type=int, default=16, help="calibration windows (16)")
    d.add_argument("--seq-len", type=int, default=512, help="tokens per window (512)")
    d.add_argument("--eval-windows", type=int, default=8, help="evaluation windows of --seq-len tokens (8)")
    d.add_argument(
        "--settings", default=",".join(DEMO_SETTINGS), help=f"comma-separated subset of {','.join(DEMO_SETTINGS)}"
    )
    return parser


def _config_from_args(args: argparse.Namespace, tokenizer: Any) -> Any:
    from .config import BCQuantizationConfig

    return BCQuantizationConfig(
        bits=args.bits,
        group_size=args.group_size,
        sym=True if args.sym else None,
        format=args.format,
        method=args.method,
        desc_act=args.desc_act,
        damp_percent=args.damp_percent,
        comq_sweeps=args.comq_sweeps,
        comq_update_scale=args.comq_update_scale,
        erq_lambda=args.erq_lambda,
        erq_chunk=args.erq_chunk,
        bias_compensation=not args.no_bc,
        bc_target=args.bc_target,
        bc_layer=args.bc_layer and not args.no_bc,
        bc_sink_tokens=args.bc_sink_tokens,
        dataset=args.dataset,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        tokenizer=tokenizer,
    )


def _check_model_arg(model_id: str, gguf_file: str | None = None) -> None:
    """A MODEL that names a local folder must be one transformers can load; checked before any work."""
    from .hub import hub_id_of

    path = os.path.expanduser(model_id)
    if not os.path.exists(path):
        if hub_id_of(model_id) is None:  # not a Hub id either: a mistyped path
            raise UsageError(f"MODEL {model_id!r}: no such folder (and not a Hub id like org/name); check the path")
        return
    if not os.path.isdir(path):
        raise UsageError(f"MODEL {model_id!r} is a file; pass the folder that holds it (and --gguf-file for GGUF)")
    if gguf_file:
        if not os.path.isfile(os.path.join(path, gguf_file)):
            raise UsageError(f"--gguf-file {gguf_file!r} is not in {model_id!r}; pass a file name inside MODEL")
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"MODEL {model_id!r} holds no config.json; pass a folder written by save_pretrained")
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, f)) for f in tokenizer_files):
        raise UsageError(
            f"MODEL {model_id!r} holds no tokenizer (tokenizer.json / tokenizer_config.json); save the tokenizer "
            "beside the model: tokenizer.save_pretrained(folder)"
        )


def _check_dataset_arg(option: str, value: str) -> None:
    """A dataset name or path given on the command line resolves, before any model is loaded."""
    from pathlib import Path

    from .data import DOC_SEPARATOR, _resolve_str, _text_files
    from .text_stream import TextSource

    try:
        kind, resolved = _resolve_str(value)
        if kind == "path":
            TextSource(_text_files(Path(resolved)), DOC_SEPARATOR)  # opens each file: non-UTF-8 text fails here
    except ValueError as err:
        raise UsageError(f"{option} {value!r}: {err}") from None


def _load_float(model_id: str, gguf_file: str | None) -> tuple[Any, Any]:
    """Float model + tokenizer; a GGUF file is dequantized by transformers and its quantizer detached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model_id, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32, **kwargs)
    if gguf_file:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    return model, tokenizer


def cmd_quantize(args: argparse.Namespace) -> int:
    from .atomic import atomic_folder
    from .distributed import run_on_main
    from .hub import _without_timings, canonical_safetensors_headers, write_model_card
    from .quantizer import quantize_model

    if os.path.exists(args.output) and os.listdir(args.output):
        raise UsageError(
            f"--output {args.output!r} exists and is not empty; choose a new folder (nothing is overwritten)"
        )
    if args.save_format != "native" and args.bc_sink_tokens is None:
        args.bc_sink_tokens = 0  # the export-friendly BC: stock classes hold no first-token bias
        logger.info(
            "--save-format %s: using --bc-sink-tokens 0 (stock classes hold no first-token bias)", args.save_format
        )
    settings = _config_from_args(args, tokenizer=None)  # validate the settings before loading anything
    if args.save_format != "native":
        from .export import check_config_exportable

        check_config_exportable(settings, args.save_format, args.drop_sink_bias)
    _check_model_arg(args.model, args.gguf_file)
    _check_dataset_arg("--dataset", args.dataset)
    if args.eval_dataset:
        _check_dataset_arg("--eval-dataset", args.eval_dataset)
    if not args.gguf_file:
        from .api import check_architecture

        check_architecture(args.model)  # an architecture without discoverable blocks fails before the weights load
    model, tokenizer = _load_float(args.model, args.gguf_file)
    if args.save_format != "native":  # layer widths the format cannot group: refuse before calibrating
        from .export import check_float_model_exportable

        check_float_model_exportable(model, settings, args.save_format, args.drop_sink_bias)
    config = _config_from_args(args, tokenizer)
    report = quantize_model(model, config)
    if not args.quiet:
        print(report.format_table())
    ppl, eval_error = None, None
    if args.eval_dataset:  # before saving, so the result lands in the card's model-index
        from .evaluation import evaluate_perplexity
        from .hub import record_evaluation

        try:
            ppl = evaluate_perplexity(
                model,
                tokenizer,
                args.eval_dataset,
                seq_len=args.seq_len,
                max_samples=args.eval_max_samples,
                progress=not args.quiet,
            )
            record_evaluation(model, args.eval_dataset, ppl, seq_len=args.seq_len, max_samples=args.eval_max_samples)
        except Exception as err:  # noqa: BLE001 - save the quantized model anyway, then report the failure
            eval_error = err
    if args.save_format != "native":  # layer checks of the export, before anything is written
        from .export import check_exportable

        check_exportable(model, args.save_format, args.drop_sink_bias)

    # A private folder beside --output, swapped in whole: an interrupted save never leaves a half-written --output,
    # and a concurrent run with the same --output fails here instead of claiming the other run's folder.
    def save() -> None:
        try:
            with atomic_folder(args.output, overwrite=False) as tmp, _without_timings(model, args.reproducible):
                if args.save_format == "native":
                    type(model).save_pretrained(model, tmp)
                else:
                    from .export import write_export

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

    from .config import BCQuantizationConfig
    from .export import check_config_exportable, export_model
    from .hub import _TOKENIZER_FILES, _read_bc_config, write_model_card

    src = Path(args.src_dir)
    if not src.is_dir():
        raise UsageError(f"SRC_DIR {args.src_dir!r} is not a folder; pass a folder written by `optimum-bc quantize`")
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation import evaluate_perplexity

    _check_model_arg(args.model, args.gguf_file)
    _check_dataset_arg("--dataset", args.dataset)
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(args.model, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    ppl = evaluate_perplexity(
        model, tokenizer, args.dataset, seq_len=args.seq_len, max_samples=args.max_samples, progress=not args.quiet
    )
    print(f"perplexity on {args.dataset} ({args.seq_len}-token windows): {ppl:.3f}")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .lm_eval_adapter import evaluate_tasks, format_results

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks is empty; pass comma-separated lm-eval task names")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be > 0, got {args.limit}")
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise UsageError(f"--include-path {args.include_path!r} is not a folder")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = evaluate_tasks(
        model,
        tokenizer,
        tasks,
        num_fewshot=args.num_fewshot,
        limit=limit,
        batch_size=args.batch_size,
        include_path=args.include_path,
    )
    print(format_results(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"results": results["results"], "config": {"model": args.model, "tasks": tasks}}, f, indent=1)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .plotting import plot_layer_errors
    from .quantizer import load_report

    report = load_report(args.directory)
    path = args.plot or os.path.join(args.directory, "layer_errors.png")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(f"--plot {path!r}: the folder {folder!r} does not exist or is not writable; create it first")
    print(report.format_table())
    plot_layer_errors(report, path)
    print(f"per-layer error plot written to {path}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    if not os.path.isdir(args.directory):
        raise UsageError(f"{args.directory!r} is not a folder; pass the --output of `optimum-bc quantize`")
    info = push_folder(
        args.directory,
        args.repo_id,
        private=True if args.private else None,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
    )
    print(f"pushed {args.directory} to {args.repo_id}: {info.pr_url or info.commit_url}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .config import BCQuantizationConfig
    from .evaluation import evaluate_perplexity
    from .packaged import packaged_model_dir
    from .quantizer import quantize_model

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(settings) - set(DEMO_SETTINGS))
    if unknown or not settings:
        raise UsageError(f"--settings: unknown {unknown or 'empty list'}; choose from {','.join(DEMO_SETTINGS)}")
    for s in settings:  # validate every config before the long work starts
        BCQuantizationConfig(
            bits=args.bits, group_size=args.group_size, method=s.split("+")[0], bc_target=args.bc_target
        )
    path = packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def perplexity(model: Any) -> float:
        return evaluate_perplexity(
            model, tokenizer, "wiki-vital", seq_len=args.seq_len, max_samples=args.eval_windows, progress=False
        )

    print(
        f"optimum-bc demo: SmolLM2-135M (LLaMA, packaged GGUF dequantized to fp32), {args.bits}-bit g{args.group_size}"
        f", calibration {args.num_samples} x {args.seq_len} tokens of wiki-vital; perplexity on a SHORT held-out slice"
        f" ({args.eval_windows} x {args.seq_len} tokens), so numbers are indicative, not a benchmark."
    )
    rows = [("fp32", perplexity(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)), 0.0)]
    print(f"  fp32 done: {rows[0][1]:.2f}")
    for s in settings:
        method, bc = s.split("+")[0], s.endswith("+bc")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        config = BCQuantizationConfig(
            bits=args.bits,
            group_size=args.group_size,
            method=method,
            bias_compensation=bc,
            bc_target=args.bc_target,
            dataset="wiki-vital",
            tokenizer=tokenizer,
            num_samples=args.num_samples,
            seq_len=args.seq_len,
            batch_size=4,
        )
        start = time.perf_counter()
        quantize_model(model, config)
        seconds = time.perf_counter() - start
        rows.append((s, perplexity(model), seconds))
        print(f"  {s} done: {rows[-1][1]:.2f} ({seconds:.0f} s)")
    print(f"\n{'setting':<10} {'perplexity':>11} {'quantize s':>11}")
    for name, ppl, seconds in rows:
        print(f"{name:<10} {ppl:>11.2f} {seconds:>11.1f}")
    return 0


COMMANDS = {
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
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
    )
    import optimum_bc  # noqa: F401  (registers quant_method "bc" before any from_pretrained)

    if args.quiet:
        from transformers.utils import logging as hf_logging

        from .calibration import set_progress_bars

        set_progress_bars(False)
        hf_logging.disable_progress_bar()

    try:
        return COMMANDS[args.command](args)
    except (UsageError, ValueError) as err:
        if args.debug:
            traceback.print_exc()
        message = str(err)
        if message.startswith("dataset=") and hasattr(args, "dataset"):  # the library names its argument
            message = "--dataset " + message.removeprefix("dataset=")
        print(f"optimum-bc {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the CLI turns every failure into one line + exit code 1
        if args.debug:
            traceback.print_exc()
        print(f"optimum-bc {args.command}: failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
