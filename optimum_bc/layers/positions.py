"""Token positions for position-dependent bias compensation (the attention-sink bias and the per-position table).

A Linear layer never sees token positions, but two BC variants need them: the sink bias (the first tokens of a
sequence, whose activations are outliers in LLaMA-family models, get their own compensation) and the reference
code's per-position table. Every decoder block receives ``position_ids`` from the model (also during generation
with a KV cache, where they continue after the cached tokens, and with left padding, where the first real token
has position 0), so a forward pre-hook on each block publishes them for the layers inside it to read. The encoder
blocks of image models (ViT, DeiT, DINOv2) get no ``position_ids``: every image gives the same tokens (CLS, registers,
patches), so their blocks publish ``arange(tokens)`` (``attach_position_hooks(blocks, numbered=True)``).
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


def _stack() -> list:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """A block publishes its ``position_ids``; blocks that get none keep what the model published."""
    _stack().append(current_positions())
    hidden = args[0] if args else kwargs.get("hidden_states")
    positions = kwargs.get("position_ids")
    if positions is None or hidden is None or hidden.dim() < 2:
        return
    batch, tokens = hidden.shape[0], hidden.shape[1]
    _set(positions.reshape(-1, positions.shape[-1])[:, -tokens:].expand(batch, tokens))


def _numbered_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """An encoder block of an image model publishes ``arange(tokens)`` for every image of its input."""
    _stack().append(current_positions())
    hidden = args[0] if args else kwargs["hidden_states"]
    batch, tokens = hidden.shape[0], hidden.shape[1]
    _set(torch.arange(tokens, device=hidden.device).expand(batch, tokens))


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    stack = _stack()
    _set(stack.pop() if stack else None)


def _model_positions(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Token positions of a top-level causal-LM call, for families whose blocks receive no ``position_ids``.

    From ``position_ids`` if given, else from the 2-D attention mask (left padding: the first real token is 0), else
    ``cache_position``, else the cache length plus ``arange``.
    """
    ids = kwargs.get("input_ids", args[0] if args else None)
    x = ids if ids is not None else kwargs.get("inputs_embeds")
    if x is None or x.dim() < 2:
        return None
    batch, tokens = x.shape[0], x.shape[1]
    if kwargs.get("position_ids") is not None:
        positions = kwargs["position_ids"]
        return positions.reshape(-1, positions.shape[-1])[:, -tokens:].expand(batch, tokens)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens:]
    if kwargs.get("cache_position") is not None:
        return kwargs["cache_position"].reshape(1, -1)[:, -tokens:].expand(batch, tokens)
    past = kwargs.get("past_key_values")
    start = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
    return torch.arange(start, start + tokens, device=x.device).expand(batch, tokens)


def _model_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    _stack().append(current_positions())
    _set(_model_positions(args, kwargs))


def attach_position_hooks(
    blocks: Iterable[nn.Module], model: nn.Module | None = None, *, numbered: bool = False
) -> None:
    """Publish each block's ``position_ids`` while it runs, and with ``model`` the positions of every top-level call
    (for blocks that receive none, e.g. BLOOM and MPT). ``numbered``: the blocks publish ``arange(tokens)`` instead
    (encoder blocks of image models; give no ``model``). Idempotent."""
    if model is not None and not getattr(model, _HOOK_ATTR, None):
        handles = (
            model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True),
            model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True),
        )
        setattr(model, _HOOK_ATTR, handles)
    for block in blocks:
        if getattr(block, _HOOK_ATTR, None):
            continue
        handles = (
            block.register_forward_pre_hook(_numbered_pre_hook if numbered else _pre_hook, with_kwargs=True),
            block.register_forward_hook(_post_hook, with_kwargs=True, always_call=True),
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
            "position_ids), or call optimum_bc.layers.positions.attach_position_hooks(blocks) on hand-built models"
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
