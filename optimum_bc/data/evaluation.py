"""Perplexity of a causal language model on a held-out text, following the GPTQ reference protocol.

GPTQ (arXiv 2210.17323, ``opt.py::opt_eval``) tokenizes the whole test text once, cuts it into non-overlapping
windows of ``seq_len`` tokens (dropping the tail) and reports ``exp`` of the mean next-token negative log-likelihood
over all predicted tokens. A ``stride`` below ``seq_len`` gives the sliding-window variant of the transformers
perplexity guide instead: every token after the first is still scored exactly once, but with more left context.
"""

import logging
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers.utils.logging import tqdm

from optimum_bc.data.calibration_data import DOC_SEPARATOR, TokenizerLike, load_evaluation_text, tokenize_text


logger = logging.getLogger(__name__)

EvaluationSource = str | os.PathLike[str] | Sequence[str] | torch.Tensor | Sequence[int]


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer: TokenizerLike | None,
    dataset: EvaluationSource,
    seq_len: int = 2048,
    stride: int | None = None,
    max_samples: int | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``dataset``, scored window by window.

    Args:
        model: a causal LM returning ``logits``; it may be spread over devices (the ids go to the device of its
            input embeddings). It runs in eval mode; its previous train/eval mode is restored afterwards.
        tokenizer: tokenizes text sources with its default special tokens, as the GPTQ reference does; may be
            ``None`` for token ids.
        dataset: a name known to ``load_evaluation_text`` ("wikitext2", "ptb", "c4", "wiki-vital", whose
            evaluation split is used), a path to a .txt file or folder, raw text as a list of strings (joined with
            blank lines; a bare string is always read as a name or path), or token ids (1-D or ``[1, N]``
            LongTensor, or a list of ints).
        seq_len: tokens per window.
        stride: ``None`` or ``seq_len`` for non-overlapping windows (GPTQ). Below ``seq_len``, windows start every
            ``stride`` tokens and each window after the first scores only its last ``stride`` tokens.
        max_samples: score at most this many windows (GPTQ scores 256 windows of C4).
        progress: show a tqdm bar with the running perplexity.
    """
    stride = seq_len if stride is None else stride
    for name, value, minimum in (("seq_len", seq_len, 2), ("stride", stride, 1), ("max_samples", max_samples, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if stride > seq_len:
        raise ValueError(
            f"stride={stride} is larger than seq_len={seq_len}: tokens would be skipped; use stride <= seq_len"
        )
    ids = _evaluation_ids(tokenizer, dataset)
    if ids.numel() < seq_len + 1:
        raise ValueError(
            f"the evaluation text has only {ids.numel()} tokens, it needs at least seq_len + 1 = {seq_len + 1}; "
            "pass a longer text or a smaller seq_len"
        )
    starts = range(0, ids.numel() - seq_len + 1, stride)
    if max_samples is not None:
        starts = starts[:max_samples]

    device = model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    nll_sum, num_scored_total = 0.0, 0
    bar = tqdm(starts, desc="perplexity", unit="window", disable=not progress)
    try:
        for index, start in enumerate(bar):
            window = ids[start : start + seq_len].unsqueeze(0).to(device)  # (1, seq_len)
            logits = model(input_ids=window, use_cache=False).logits  # (1, seq_len, vocab)
            # tokens not scored by an earlier window; a window's first token has no prediction
            num_scored = seq_len - 1 if index == 0 else min(stride, seq_len - 1)
            predictions = logits[0, -num_scored - 1 : -1].float()  # (num_scored, vocab)
            targets = window[0, -num_scored:].to(predictions.device)
            nll_sum += F.cross_entropy(predictions, targets, reduction="sum").item()
            num_scored_total += num_scored
            bar.set_postfix(ppl=f"{math.exp(nll_sum / num_scored_total):.3f}")
    finally:
        bar.close()
        model.train(was_training)
    perplexity = math.exp(nll_sum / num_scored_total)
    logger.info("Perplexity %.4f over %d windows of %d tokens", perplexity, len(starts), seq_len)
    return perplexity


def _evaluation_ids(tokenizer: TokenizerLike | None, dataset: EvaluationSource) -> torch.Tensor:
    """Turn the evaluation source into one 1-D LongTensor token stream."""
    if isinstance(dataset, torch.Tensor) or (
        isinstance(dataset, (list, tuple)) and dataset and all(isinstance(t, int) for t in dataset)
    ):
        ids = torch.as_tensor(dataset)
        if ids.is_floating_point() or (ids.dim() == 2 and ids.shape[0] != 1) or ids.dim() > 2:
            raise ValueError(f"token ids must be integer, 1-D or [1, N]; got {ids.dtype} {list(ids.shape)}")
        return ids.long().reshape(-1)
    if isinstance(dataset, (str, os.PathLike)):
        text = load_evaluation_text(dataset)
    elif isinstance(dataset, (list, tuple)) and dataset and all(isinstance(t, str) for t in dataset):
        text = DOC_SEPARATOR.join(dataset)
    else:
        raise ValueError(
            f"unsupported evaluation dataset {type(dataset).__name__}; pass a name, a .txt path, a list of strings "
            "or token ids"
        )
    if not text.strip():
        raise ValueError("the evaluation text is empty; pass a non-empty text")
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to evaluate on text: pass tokenizer=... (or pass token ids)")
    return tokenize_text(tokenizer, text, add_special_tokens=True)
