"""lm-evaluation-harness adapter (extra ``eval``): run ``lm_eval`` tasks on optimum-bc models.

``lm_eval``'s own ``hf`` model type loads a saved BC folder once ``optimum_bc`` is imported (that import registers
``quant_method="bc"`` with transformers). The ``lm_eval`` command line never imports us, so this module gives the two
ways in that do: :func:`evaluate_tasks` for a model already in memory (e.g. right after quantization) and the
``optimum-bc lm-eval`` command, which calls it.
"""

import os
from collections.abc import Sequence
from typing import Any

import torch


INSTALL_HINT = "the lm-eval adapter needs lm-evaluation-harness: pip install 'optimum-bc[eval]'"


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return lm_eval


def lm_eval_model(model: torch.nn.Module, tokenizer: Any, batch_size: int = 1, max_length: int | None = None) -> Any:
    """Wrap an in-memory causal LM (quantized or float, on any device map) as an ``lm_eval`` ``HFLM``."""
    _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if getattr(tokenizer, "eos_token_id", None) is None and getattr(tokenizer, "bos_token_id", None) is None:
        raise ValueError(
            "lm-eval scores continuations after a prefix token and this tokenizer has neither an eos nor a bos token; "
            "set one (tokenizer.eos_token = ...) before evaluating"
        )
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str | dict],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    include_path: str | os.PathLike[str] | None = None,
    seed: int = 1234,
    log_samples: bool = False,
) -> dict:
    """Run ``lm_eval.simple_evaluate`` on ``tasks`` and return its results dict.

    Args:
        model: the model to score, already loaded (``from_pretrained`` of a BC folder, or just quantized).
        tokenizer: its tokenizer.
        tasks: lm-eval task names (``"hellaswag"``, ``"arc_easy"``, ...; their data comes from the Hub) or task
            config dicts; tasks defined in YAML files under ``include_path`` work offline with local data files.
        num_fewshot: few-shot examples per prompt (the task's default if None).
        limit: evaluate only the first N documents (or that fraction, if < 1) of each task.
        batch_size: sequences per forward pass.
        include_path: a folder of extra task YAML files.
        seed: seed of every random choice lm-eval makes (few-shot sampling).
        log_samples: also return every document's requests and scores under ``results["samples"]``.
    """
    if not tasks:
        raise ValueError("no lm-eval task given; pass task names such as ['arc_easy'] or task config dicts")
    lm_eval = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise ValueError(f"include_path {str(include_path)!r} is not a folder; pass a folder of lm-eval task YAMLs")
    manager = _task_manager(TaskManager, tasks, include_path)
    results = lm_eval.simple_evaluate(
        model=lm_eval_model(model, tokenizer, batch_size=batch_size),
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return results


def _task_manager(manager_cls: Any, tasks: Sequence[str | dict], include_path: str | os.PathLike[str] | None) -> Any:
    """lm-eval's task index; only ``include_path`` when it defines every named task (indexing the built-in tasks
    takes about a minute), else the built-in tasks too. Unknown names fail here, before any scoring."""
    names = [t for t in tasks if isinstance(t, str)]
    if include_path is not None:
        local = manager_cls(include_path=str(include_path), include_defaults=False)
        if all(local.match_tasks([t]) for t in names):
            return local
    manager = manager_cls(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in names if not manager.match_tasks([t])]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; list the known ones with `lm_eval ls tasks`, or pass include_path= "
            "a folder holding their YAML files"
        )
    return manager


def format_results(results: dict) -> str:
    """The results table ``lm_eval`` prints (markdown)."""
    from lm_eval.utils import make_table

    return make_table(results)
