"""The ``lm-eval``, ``push`` and ``demo`` commands of the ``optimum-bc`` CLI (parsers and implementations)."""

import argparse
import os
import time
from typing import Any

import torch

from .args import UsageError, add_loading_options, loading_kwargs
from .checks import usage_errors


DEMO_SETTINGS = ("rtn", "rtn+bc", "gptq", "gptq+bc")


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """The ``lm-eval``, ``push`` and ``demo`` subcommands."""
    from ..config import SUPPORTED_BITS

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
    add_loading_options(lm, dtype_default="auto")

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
    d.add_argument("--bits", type=int, default=3, choices=list(SUPPORTED_BITS), help="bits per weight (3)")
    d.add_argument("--group-size", type=int, default=128, help="group size (128)")
    d.add_argument("--bc-target", default="sequential", help="sequential (default) or float")
    d.add_argument("--num-samples", type=int, default=16, help="calibration windows (16)")
    d.add_argument("--seq-len", type=int, default=512, help="tokens per window (512)")
    d.add_argument("--eval-windows", type=int, default=8, help="evaluation windows of --seq-len tokens (8)")
    d.add_argument(
        "--settings", default=",".join(DEMO_SETTINGS), help=f"comma-separated subset of {','.join(DEMO_SETTINGS)}"
    )


def cmd_lm_eval(args: argparse.Namespace) -> int:
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..integrations.lm_eval import evaluate_tasks, format_results

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--tasks is empty; pass comma-separated lm-eval task names")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be > 0, got {args.limit}")
    if args.include_path is not None and not os.path.isdir(args.include_path):
        raise UsageError(f"--include-path {args.include_path!r} is not a folder")
    load = loading_kwargs(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, **load)
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


def cmd_push(args: argparse.Namespace) -> int:
    from ..integrations.hub_push import push_folder

    if not os.path.isdir(args.directory):
        raise UsageError(f"{args.directory!r} is not a folder; pass the --output of `optimum-bc quantize`")
    with usage_errors("DIRECTORY"):  # bad input is refused before any request (upload failures are PushError)
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

    from ..config import BCQuantizationConfig
    from ..data.evaluation import evaluate_perplexity
    from ..data.packaged import packaged_model_dir
    from ..integrations.quantizer import quantize_model

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(settings) - set(DEMO_SETTINGS))
    if unknown or not settings:
        raise UsageError(f"--settings: unknown {unknown or 'empty list'}; choose from {','.join(DEMO_SETTINGS)}")
    for s in settings:  # validate every config before the long work starts
        try:
            BCQuantizationConfig(
                bits=args.bits, group_size=args.group_size, method=s.split("+")[0], bc_target=args.bc_target
            )
        except ValueError as err:
            raise UsageError(str(err)) from None
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
