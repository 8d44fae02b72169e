"""``ExpertCapture``: the routed rows of every expert of a fused 3-D expert weight, from any family's forward.

A ``torch.overrides.TorchFunctionMode`` recognises an expert slice ``W[e]`` of a fused parameter
(``Tensor.__getitem__`` with one integer index) and records the input and output rows of the ``F.linear`` / matmul
that reads it, the token indices gathered from the experts' hidden states just before, and the routing weight that
multiplies the expert's output (``out * w`` or ``(out + bias) * w``). ``torch.bmm`` with the whole parameter (or its
``transpose(1, 2)`` view), the dense dispatch of Llama 4 or Inkling's shared experts, records ``x[e]`` per expert.
"""

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .experts import routes_standard


_LINEAR = {F.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__}
_MUL = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__}
_TRANSPOSE = {torch.transpose, torch.Tensor.transpose}


def _expert_index(index: object) -> int | None:
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    if isinstance(index, torch.Tensor) and index.numel() == 1 and not index.is_floating_point():
        return int(index)
    return None


class ExpertCapture(TorchFunctionMode):
    """Records, per ``(parameter name, expert)``: input rows, output rows, routing weights and token indices."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self.params = {id(p): (name, p) for name, p in params.items()}
        self.order: list[str] = []
        self.transposed: dict[str, bool] = {}
        self.inputs: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
        self.outputs: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
        self.weights: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
        self.tokens: dict[tuple[str, int], list[torch.Tensor | None]] = defaultdict(list)
        self.standard: dict[str, bool] = {}  # experts module name -> called as (hidden, top_k_index, top_k_weights)
        self._slices: dict[int, tuple[str, int, torch.Tensor]] = {}
        self._tagged: dict[int, tuple[tuple[str, int], torch.Tensor]] = {}
        self._flipped: dict[int, tuple[str, torch.Tensor]] = {}
        self._hidden: dict[int, torch.Tensor] = {}
        self._gathered: torch.Tensor | None = None

    def enter_experts(self, name: str, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of an experts module: its hidden states (to see the token gather) and call style."""
        self.standard.setdefault(name, routes_standard(args, kwargs))
        hidden = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(hidden, torch.Tensor):
            self._hidden[id(hidden)] = hidden

    def _record(self, name: str, e: int, x: torch.Tensor, out: torch.Tensor, transposed: bool) -> None:
        if name not in self.transposed:
            self.order.append(name)
            self.transposed[name] = transposed
        rows = x.reshape(-1, x.shape[-1]).detach()
        key = (name, e)
        tokens = self._gathered if self._gathered is not None and self._gathered.shape[0] == rows.shape[0] else None
        self.inputs[key].append(rows)
        self.outputs[key].append(out.reshape(-1, out.shape[-1]).detach())
        self.tokens[key].append(tokens)
        self._tagged[id(out)] = (key, out)

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> object:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and len(args) == 2:
            source, index = args
            hit = self.params.get(id(source))
            if hit is not None and hit[1] is source:
                e = _expert_index(index)
                if e is not None:
                    self._slices[id(out)] = (hit[0], e, out)
            elif id(source) in self._hidden and isinstance(index, torch.Tensor) and index.dim() == 1:
                if not index.is_floating_point() and index.dtype != torch.bool:
                    self._gathered = index
        elif func in _LINEAR or func in _MATMUL:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
            hit = self._slices.get(id(w))
            if hit is not None and hit[2] is w:
                self._record(hit[0], hit[1], x, out, transposed=func not in _LINEAR)
        elif func in _TRANSPOSE and sorted(int(d) % 3 for d in args[1:3]) == [1, 2]:
            hit = self.params.get(id(args[0]))
            if hit is not None and hit[1] is args[0]:
                self._flipped[id(out)] = (hit[0], out)
        elif func is torch.bmm and len(args) == 2:
            x, w = args
            hit = self.params.get(id(w))
            flipped = self._flipped.get(id(w))
            if hit is not None and hit[1] is w:  # x @ W[e] with W [E, in, out]
                name, transposed = hit[0], True
            elif flipped is not None and flipped[1] is w:  # x @ W[e].T with W [E, out, in]
                name, transposed = flipped[0], False
            else:
                return out
            self._gathered = None
            for e in range(w.shape[0]):
                self._record(name, e, x[e], out[e], transposed=transposed)
        elif (func in _ADD or func in _MUL) and len(args) == 2 and isinstance(out, torch.Tensor):
            for mine, other in (args, args[::-1]):
                tag = self._tagged.get(id(mine))
                if tag is None or tag[1] is not mine:
                    continue
                if func in _ADD:
                    self._tagged[id(out)] = (tag[0], out)
                elif isinstance(other, torch.Tensor) and other.numel() == mine.reshape(-1, mine.shape[-1]).shape[0]:
                    self.weights[tag[0]].append(other.reshape(-1).detach())
                break
        return out

    def clear(self) -> None:
        """Drop the recorded rows (kept: forward order, layouts, call styles)."""
        for store in (self.inputs, self.outputs, self.weights, self.tokens):
            store.clear()
        self._slices.clear()
        self._tagged.clear()
        self._flipped.clear()
        self._hidden.clear()
        self._gathered = None


@contextmanager
def capturing(block: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[ExpertCapture]:
    """Run forwards of ``block`` inside: the experts use their eager implementation and are captured."""
    capture = ExpertCapture(params)
    owners = {name.rpartition(".")[0] for name in params}
    handles, configs = [], []
    for owner in owners:
        module = block.get_submodule(owner)
        handles.append(
            module.register_forward_pre_hook(
                lambda m, a, k, owner=owner: capture.enter_experts(owner, a, k), with_kwargs=True
            )
        )
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_experts_implementation", None) not in (None, "eager"):
            configs.append((config, config._experts_implementation))
            config._experts_implementation = "eager"
    try:
        with capture:
            yield capture
    finally:
        for h in handles:
            h.remove()
        for config, implementation in configs:
            config._experts_implementation = implementation


def keep_rows(capture: ExpertCapture, key: tuple[str, int], i: int, valid: torch.Tensor) -> torch.Tensor:
    """Which rows of record ``i`` of ``key`` are real routed tokens: not padding, not a zero (unrouted) row."""
    rows = capture.inputs[key][i]
    keep = rows.abs().amax(-1) > 0
    tokens = capture.tokens[key][i]
    flat = valid.reshape(-1).to(rows.device)
    if tokens is not None:
        keep &= flat[tokens.to(rows.device)]
    elif rows.shape[0] == flat.shape[0]:
        keep &= flat
    return keep


def routing_weights(capture: ExpertCapture, key: tuple[str, int], i: int, rows: int) -> torch.Tensor | None:
    ws = capture.weights.get(key, [])
    if len(ws) != len(capture.outputs[key]) or ws[i].shape[0] != rows:
        return None
    return ws[i].float()
