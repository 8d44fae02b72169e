"""Per-expert calibration of fused 3-D expert weights: each expert sees only the tokens routed to it.

The block runs under :class:`optimum_bc.expert_capture.ExpertCapture` (a ``TorchFunctionMode``), which recognises, in any
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
from collections.abc import Callable

import torch
from torch import nn

from ..algorithms import QuantizedWeight, WeightQuantizer, get_algorithm
from ..config import BCQuantizationConfig
from .architectures import is_skipped
from .expert_capture import capturing, keep_rows, routing_weights
from .experts import EXPERTS_ATTR, fused_expert_params, install, pack
from .report import ExpertReport


logger = logging.getLogger(__name__)


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
                            x = x[keep_rows(capture, (name, e), i, batch.valid)]
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
                        keep = keep_rows(capture, (pname, e), i, valid)
                        r = (float_outputs[(pname, e)][i].float() - out_q.float())[keep]
                        w = routing_weights(capture, (pname, e), i, out_q.shape[0])
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
