"""Shared by the benchmark scripts: load the packaged SmolLM2-135M in fp32 and score it on held-out wiki-vital."""

import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_bc import BCQuantizationConfig, QuantizationReport, quantize_model
from optimum_bc.data.evaluation import evaluate_perplexity
from optimum_bc.data.packaged import packaged_model_dir


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


def quantize_packaged(
    load: Callable[[], torch.nn.Module], tokenizer: Any, num_samples: int, seq_len: int, **settings: Any
) -> tuple[torch.nn.Module, QuantizationReport, float]:
    """A fresh model from ``load()`` quantized with ``BCQuantizationConfig(**settings)`` on ``num_samples`` windows of
    ``seq_len`` wiki-vital tokens (batches of 4); returns it, the report and the seconds ``quantize_model`` took."""
    config = BCQuantizationConfig(
        dataset="wiki-vital", tokenizer=tokenizer, num_samples=num_samples, seq_len=seq_len, batch_size=4, **settings
    )
    model = load()
    start = time.perf_counter()
    report = quantize_model(model, config)
    return model, report, time.perf_counter() - start


def load_results(path: str) -> dict:
    """A resumable benchmark's JSON (``{"cells": {}}`` when it does not exist yet)."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"cells": {}}


def save_results(path: str, results: dict) -> None:
    """Write the JSON atomically (a killed run leaves the previous file), so every finished cell survives."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)
