"""Token positions for position-dependent bias compensation (the attention-sink bias and the per-position table).

A Linear layer never sees token positions, but two BC variants need them: the sink bias (the first tokens of a
sequence, whose activations are outliers in LLaMA-family models, get their own compensation) and the reference
code's per-position table. Every decoder block receives ``position_ids`` from the model (also during generation
with a KV cache, where they continue after the cached tokens, and with left padding, where the first real token
has position 0), so a forward pre-hook on each block publishes them for the layers inside it to read.
"""

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


_state = threading.local()
_HOOK_ATTR = "_optimum_bc_positions_hooks"


def current_positions() -> torch.Tensor | None:
    """``(batch, tokens)`` positions of the block being run, or None outside a hooked block."""
    return getattr(_state, "positions", None)


def _set(positions: torch.Tensor | None) -> None:
    _state.positions = positions


@contextmanager
def token_positions(positions: torch.Tensor) -> Iterator[None]:
    """Publish ``positions`` (``(batch, tokens)`` long) for layers run by hand, outside a hooked decoder block."""
    previous = current_positions()
    _set(positions)
    try:
        yield
    finally:
        _set(previous)


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    positions = kwargs.get("position_ids")
    if positions is None or hidden is None:
        _set(None)
        return
    batch, tokens = hidden.shape[0], hidden.shape[1]
    _set(positions.reshape(-1, positions.shape[-1])[:, -tokens:].expand(batch, tokens))


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    _set(None)


def attach_position_hooks(blocks: Iterable[nn.Module]) -> None:
    """Publish each block's ``position_ids`` while it runs (idempotent)."""
    for block in blocks:
        if getattr(block, _HOOK_ATTR, None):
            continue
        handles = (
            block.register_forward_pre_hook(_pre_hook, with_kwargs=True),
            block.register_forward_hook(_post_hook, with_kwargs=True),
        )
        setattr(block, _HOOK_ATTR, handles)


def positions_for(x: torch.Tensor, layer: str) -> torch.Tensor:
    """Position of every row of ``x`` (``(batch, tokens, d)`` or flattened ``(batch*tokens, d)``) as a long tensor
    shaped like ``x`` without its last dimension."""
    positions = current_positions()
    if positions is None:
        raise RuntimeError(
            f"{layer} has a position-dependent compensation bias but no token positions were published: run it "
            "inside its decoder block of a model quantized or loaded by optimum-bc (blocks publish their "
            "position_ids), or call optimum_bc.positions.attach_position_hooks(blocks) on hand-built models"
        )
    if positions.numel() != x[..., 0].numel():
        raise RuntimeError(
            f"{layer}: the block published positions for {positions.numel()} tokens but the layer got "
            f"{x[..., 0].numel()} rows"
        )
    return positions.reshape(x.shape[:-1]).to(x.device)


def sink_term(x: torch.Tensor, sink_bias: torch.Tensor, layer: str) -> torch.Tensor:
    """The extra bias of each row of ``x``: ``sink_bias[p]`` at positions ``p < len(sink_bias)``, 0 elsewhere."""
    positions = positions_for(x, layer)
    table = torch.cat([sink_bias, torch.zeros_like(sink_bias[:1])]).to(dtype=x.dtype, device=x.device)
    return table[positions.clamp(min=0, max=sink_bias.shape[0])]


def position_term(x: torch.Tensor, position_bias: torch.Tensor, layer: str) -> torch.Tensor:
    """The reference code's per-position bias of each row of ``x``; positions beyond the table are refused."""
    positions = positions_for(x, layer)
    calibrated = position_bias.shape[0]
    if positions.numel() and int(positions.max()) >= calibrated:
        raise ValueError(
            f"{layer}: position-granularity BC was calibrated for {calibrated} positions but got position "
            f"{int(positions.max())}; it is evaluation-only. Evaluate with seq_len <= {calibrated}, or quantize with "
            "bc_granularity='channel' (and bc_sink_tokens) for deployment"
        )
    return position_bias.to(dtype=x.dtype, device=x.device)[positions.clamp(min=0)]
