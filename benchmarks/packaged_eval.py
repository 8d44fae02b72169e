"""Shared by the benchmark scripts: load the packaged SmolLM2-135M in fp32 and score it on held-out wiki-vital."""

from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_bc.evaluation import evaluate_perplexity
from optimum_bc.packaged import packaged_model_dir


def packaged_model(
    seq_len: int, eval_windows: int
) -> tuple[Any, Callable[[], torch.nn.Module], Callable[[torch.nn.Module], float]]:
    """``(tokenizer, load, perplexity)``: ``load()`` gives a fresh fp32 model, ``perplexity(model)`` scores the first
    ``eval_windows`` windows of ``seq_len`` tokens of the wiki-vital evaluation split."""
    path = packaged_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def perplexity(model: torch.nn.Module) -> float:
        return evaluate_perplexity(
            model, tokenizer, "wiki-vital", seq_len=seq_len, max_samples=eval_windows, progress=False
        )

    return tokenizer, load, perplexity
