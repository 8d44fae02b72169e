"""Per-expert calibration of fused 3-D expert weights: each expert sees only the tokens routed to it.

The block runs under a ``torch.overrides.TorchFunctionMode`` (:class:`ExpertCapture`) that recognises, in any
family's experts forward, an expert slice ``W[e]`` of a fused parameter (``Tensor.__getitem__`` with one integer
index) and records the input rows of the ``F.linear`` / matmul that reads it, with the routing weight that later
multiplies the expert's output; ``torch.bmm`` with the whole ``[E, ., .]`` parameter (Llama 4's dense dispatch, where
unrouted rows are zero) records ``x[e]`` per expert. Nothing is written per family; the eager experts
implementation is forced while calibrating so the per-expert slices are visible.

Per fused parameter, in forward order (``gate_up`` before ``down``, so ``down`` is calibrated on the quantized
``gate_up``'s outputs): each expert's Hessian (and BC moments) comes from its routed, non-padding rows only; an
expert no calibration token reaches is rounded to nearest (RTN) with a warning naming it and its count (0). Any
expert with at least one routed token uses the configured method (GPTQ's dampening makes a rank-deficient Hessian
factorisable).

Bias compensation is per expert, on the expert's output (the last fused parameter): ``b_e = Σ w² r / Σ w²`` over the
rows routed to ``e`` with ``r`` = float expert output - quantized expert output on the same (quantized-stream) input
and ``w`` the routing weight, the least-squares bias of the routed contribution ``w (y + b)`` to the block output.
"""

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .algorithms import QuantizedWeight, WeightQuantizer, get_algorithm
from .architectures import is_skipped
from .config import BCQuantizationConfig
from .experts import EXPERTS_ATTR, fused_expert_params, install, pack, routes_standard
from .report import ExpertReport


logger = logging.getLogger(__name__)

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


def _keep(capture: ExpertCapture, key: tuple[str, int], i: int, valid: torch.Tensor) -> torch.Tensor:
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


def _routing_weights(capture: ExpertCapture, key: tuple[str, int], i: int, rows: int) -> torch.Tensor | None:
    ws = capture.weights.get(key, [])
    if len(ws) != len(capture.outputs[key]) or ws[i].shape[0] != rows:
        return None
    return ws[i].float()


class ExpertCalibrator:
    """Quantizes the fused experts of one block on the quantized stream ``batches`` (see the module docstring)."""

    def __init__(
        self,
        config: BCQuantizationConfig,
        options: dict,
        algorithm: type[WeightQuantizer],
        run: Callable[[nn.Module, object], None],
        skip: list[str] | None = None,
    ) -> None:
        self.skip = skip or []  # modules_to_not_convert: matching expert weights (or their module) stay in float
        self.config = config
        self.options = options
        self.algorithm = algorithm
        self.run = run  # run(block, batch): one forward of the block on one calibration batch

    def quantize(self, block: nn.Module, prefix: str, batches: list, model_config: object) -> list[ExpertReport]:
        """Quantize, compensate and pack every fused expert parameter of ``block``; returns one row per expert."""
        found = {n: getattr(m, a) for n, (m, a) in fused_expert_params(block).items()}
        found = {
            n: p
            for n, p in found.items()
            if isinstance(p, nn.Parameter)
            and p.dim() == 3
            and not is_skipped(prefix + n, self.skip)
            and not is_skipped(prefix + n.rpartition(".")[0], self.skip)
        }
        if not found:
            return []
        order, transposed, standard, first = self._observe(block, found, batches)
        results: dict[str, list[QuantizedWeight]] = {}
        rows: list[ExpertReport] = []
        for name in order:
            quantized, counts = self._quantize_param(block, found, prefix, name, transposed[name], batches)
            results[name] = quantized
            for e, qw in enumerate(quantized):
                rows.append(ExpertReport(prefix + name, e, counts[e], self._method(counts[e]), qw.loss))
        biases: dict[str, list] = {n: [None] * p.shape[0] for n, p in found.items()}
        for owner_name in dict.fromkeys(n.rpartition(".")[0] for n in order):
            last = [n for n in order if n.rpartition(".")[0] == owner_name][-1]  # the expert output
            if not self.config.bias_compensation or not batches:
                continue
            if standard.get(owner_name, False) or self._own_bias(block, last) is not None:
                self._compensate(block, found, last, batches, first, biases, rows, prefix)
            else:
                logger.info(
                    "optimum-bc: %s%s: experts not called with routing weights; no per-expert BC", prefix, last
                )
        recorded = dict(getattr(model_config, EXPERTS_ATTR, None) or {})
        for name in order:
            owner, attr = fused_expert_params(block)[name]
            param = found[name]
            dtype = param.dtype
            own = self._own_bias(block, name)
            hooked = biases[name][0] is not None and own is None
            bias_list = [
                b.to(dtype) if (b is not None and hooked) else torch.zeros(q.codes.shape[0], dtype=dtype)
                for b, q in zip(biases[name], results[name], strict=True)
            ]
            if own is not None and biases[name][0] is not None:
                own.data = (own.data.float() + torch.stack(biases[name]).to(own.device)).to(own.dtype)
            layers = [m.to(param.device) for m in pack(results[name], self.config, bias_list, dtype)]
            install(owner, attr, layers, transposed[name], hooked)
            recorded[prefix + name] = {"transposed": transposed[name], "hooked_bias": hooked}
        setattr(model_config, EXPERTS_ATTR, recorded)
        return rows

    def _method(self, tokens: int) -> str:
        return self.config.method if tokens > 0 or not self.algorithm.needs_inputs else "rtn"

    def _own_bias(self, block: nn.Module, name: str) -> nn.Parameter | None:
        """The family's own per-expert bias of ``name`` (``<name>_bias``, ``[E, out]``), if any (GPT-OSS)."""
        owner_name, _, attr = name.rpartition(".")
        owner = block.get_submodule(owner_name) if owner_name else block
        bias = getattr(owner, f"{attr}_bias", None)
        return bias if isinstance(bias, nn.Parameter) and bias.dim() == 2 else None

    def _observe(self, block: nn.Module, found: dict, batches: list) -> tuple:
        """Forward order, layout and call style of the fused parameters, and the float expert outputs of batch
        records (for BC), from one captured pass."""
        first: list[tuple] = []
        if not batches:
            return self._layout_without_data(block, found)
        with capturing(block, found) as capture:
            for batch in batches:
                self.run(block, batch)
                first.append(({k: list(v) for k, v in capture.outputs.items()}, batch.valid))
                capture.clear()
            order, transposed, standard = list(capture.order), dict(capture.transposed), dict(capture.standard)
        for name in [n for n in found if n not in transposed]:  # no token reached any expert of it
            flag = self._declared_layout(block, prefix_free=name)
            if flag is not None:
                order.append(name)
                transposed[name] = flag
        return order, transposed, standard, first

    def _layout_without_data(self, block: nn.Module, found: dict) -> tuple:
        transposed = {}
        for name in found:
            flag = self._declared_layout(block, prefix_free=name)
            if flag is not None:
                transposed[name] = flag
        return list(transposed), transposed, {}, []

    @staticmethod
    def _declared_layout(block: nn.Module, prefix_free: str) -> bool | None:
        """``is_transposed`` of a transformers experts class (``use_experts_implementation``); None (with a warning:
        the parameter stays in float) for a 3-D parameter whose per-expert use was never seen."""
        owner = block.get_submodule(prefix_free.rpartition(".")[0])
        flag = getattr(owner, "is_transposed", None)
        if flag is None:
            logger.warning(
                "optimum-bc: %s (%s) stays in float: a 3-D parameter not read as per-expert slices on the "
                "calibration tokens, and its class declares no expert layout",
                prefix_free,
                type(owner).__name__,
            )
            return None
        return bool(flag)

    def _quantize_param(
        self, block: nn.Module, found: dict, prefix: str, name: str, transposed: bool, batches: list
    ) -> tuple[list[QuantizedWeight], list[int]]:
        """Quantize every expert of ``name`` on its routed rows; the parameter then holds the dequantized weights."""
        param = found[name]
        experts = param.shape[0]
        weights = [(param.data[e].T if transposed else param.data[e]).float() for e in range(experts)]
        in_features = weights[0].shape[1]
        quantizers = [self.algorithm(in_features, **self.options) for _ in range(experts)]
        counts = [0] * experts
        if self.algorithm.needs_inputs and batches:
            with capturing(block, {name: param}) as capture:
                for batch in batches:
                    self.run(block, batch)
                    for (_, e), records in capture.inputs.items():
                        for i, x in enumerate(records):
                            x = x[_keep(capture, (name, e), i, batch.valid)]
                            if x.shape[0]:
                                quantizers[e].add_batch(x)
                                if self.algorithm.needs_float_inputs:
                                    quantizers[e].add_float_batch(x, x)
                                counts[e] += x.shape[0]
                    capture.clear()
        rtn = get_algorithm("rtn")
        quantized = []
        for e in range(experts):
            if counts[e] == 0 and self.algorithm.needs_inputs:
                logger.warning(
                    "optimum-bc: %s expert %d: 0 calibration tokens routed to it; rounded to nearest (RTN)",
                    prefix + name,
                    e,
                )
                quantizer = rtn(in_features, **self.options)
            else:
                quantizer = quantizers[e]
            qw = quantizer.quantize(weights[e])
            quantizer.free()
            quantized.append(qw)
            dense = qw.dequantize().to(param.dtype).to(param.device)
            param.data[e] = dense.T if transposed else dense
        return quantized, counts

    def _compensate(
        self,
        block: nn.Module,
        found: dict,
        name: str,
        batches: list,
        first: list,
        biases: dict,
        rows: list[ExpertReport],
        prefix: str,
    ) -> None:
        """Per-expert bias of the expert output ``name``: routing-weighted mean of float - quantized output."""
        experts = found[name].shape[0]
        sum_wr: dict[int, torch.Tensor] = {}
        sum_w2 = torch.zeros(experts)
        sum_r2: dict[int, torch.Tensor] = {}
        n_rows = torch.zeros(experts)
        with capturing(block, found) as capture:
            for batch, (float_outputs, valid) in zip(batches, first, strict=True):
                self.run(block, batch)
                for (pname, e), outs in capture.outputs.items():
                    if pname != name:
                        continue
                    for i, out_q in enumerate(outs):
                        keep = _keep(capture, (pname, e), i, valid)
                        r = (float_outputs[(pname, e)][i].float() - out_q.float())[keep]
                        w = _routing_weights(capture, (pname, e), i, out_q.shape[0])
                        w2 = (w[keep] ** 2) if w is not None else torch.ones(r.shape[0], device=r.device)
                        sum_wr[e] = sum_wr.get(e, 0) + (w2[:, None] * r).sum(0).cpu()
                        sum_r2[e] = sum_r2.get(e, 0) + (w2[:, None] * r * r).sum(0).cpu()
                        sum_w2[e] += float(w2.sum())
                        n_rows[e] += r.shape[0]
                capture.clear()
        for e in range(experts):
            if e not in sum_wr or sum_w2[e] <= 0:
                continue
            b = sum_wr[e] / sum_w2[e]
            before = sum_r2[e] / sum_w2[e]
            after = before - 2 * b * (sum_wr[e] / sum_w2[e]) + b * b
            biases[name][e] = b
            row = next(r for r in rows if r.name == prefix + name and r.expert == e)
            row.mse_before, row.mse_after = float(before.mean()), float(after.clamp(min=0).mean())
        if not sum_wr:
            biases[name] = [None] * experts
            return
        width = next(iter(sum_wr.values())).shape[0]
        biases[name] = [torch.zeros(width) if b is None else b for b in biases[name]]
