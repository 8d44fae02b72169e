"""Activation quantization of the inputs of quantized Linears: uniform fake quantization, static or dynamic scales.

An input ``x`` is mapped to ``bits``-bit integer codes and back: ``x̂ = s · (clamp(round(x / s) + z) - z)``.
Asymmetric grids (default) have codes ``[0, 2^bits - 1]`` and an integer zero point ``z``; symmetric grids have codes
``[-2^(bits-1) + 1, 2^(bits-1) - 1]`` and ``z = 0``.

Granularity: ``"tensor"`` (one ``(s, z)`` per layer input) or ``"token"`` (one per token row, always dynamic).
Scales: ``"dynamic"`` computes them from each input at run time (min-max); the static choices are fitted once on the
calibration inputs of the quantized stream and stored as the layer buffers ``input_scale`` / ``input_zero``:

* ``"minmax"``: the observed range;
* ``"percentile"``: the range clipped to the ``PERCENTILE`` quantiles of the observed values (each side);
* ``"mse"``: the range shrunk by the factor ``α`` in ``MSE_ALPHAS`` that minimises the mean squared quantization
  error of the observed values (the error of a random subsample of at most ``SAMPLE_SIZE`` values).

The quantized Linear then computes ``W_q x̂ + b``: bias compensation, GPTQ's Hessian and ERQ's Aqer all see ``x̂``.
"""

from dataclasses import dataclass

import torch

from .. import distributed


ACT_BITS = (4, 6, 8)
ACT_GRANULARITIES = ("tensor", "token")
ACT_SCALES = ("minmax", "percentile", "mse", "dynamic")
#: Quantile of each tail kept by ``act_scale="percentile"``.
PERCENTILE = 0.9999
#: Range-shrink factors searched by ``act_scale="mse"``: geometric from 1 down to about 0.01 (outlier-stretched
#: ranges need deep clipping).
MSE_ALPHAS = tuple(0.92**i for i in range(56))
#: Values kept (uniformly at random) per layer input to fit percentile scales; the MSE search scores the first
#: ``MSE_SAMPLE`` of them (168 candidate ranges each).
SAMPLE_SIZE = 1 << 18
MSE_SAMPLE = 1 << 16
#: The largest-magnitude values kept exactly beside the random sample: rare massive activations (a few tokens of
#: DINOv2 or LLaMA) that a subsample misses but whose clipping dominates the error.
TAIL_SIZE = 4096


@dataclass(frozen=True)
class ActSpec:
    """How one layer's input is quantized."""

    bits: int
    sym: bool
    granularity: str
    dynamic: bool

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + 1 if self.sym else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.sym else 2**self.bits - 1


def spec_from_config(config: object) -> ActSpec | None:
    """The activation spec of a ``BCQuantizationConfig`` (None when activations stay in float)."""
    bits = getattr(config, "act_bits", None)
    if bits is None:
        return None
    return ActSpec(bits, config.act_sym, config.act_granularity, config.act_scale == "dynamic")


def range_params(low: torch.Tensor, high: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[low, high]`` (broadcastable tensors; the range always includes 0)."""
    low = torch.clamp(low.float(), max=0.0)
    high = torch.clamp(high.float(), min=0.0)
    if spec.sym:
        scale = torch.maximum(-low, high) / spec.qmax
        zero = torch.zeros_like(scale)
    else:
        scale = (high - low) / (spec.qmax - spec.qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-low / scale).clamp(spec.qmin, spec.qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: ActSpec) -> torch.Tensor:
    """``s · (clamp(round(x / s) + z, qmin, qmax) - z)`` computed in float32, returned in ``x.dtype``."""
    s, z = scale.float(), zero.float()
    q = torch.clamp(torch.round(x.float() / s) + z, spec.qmin, spec.qmax)
    return ((q - z) * s).to(x.dtype)


def dynamic_params(x: torch.Tensor, spec: ActSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point of ``x`` per token row (``"token"``) or over the whole tensor (``"tensor"``)."""
    if spec.granularity == "token":
        return range_params(x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True), spec)
    return range_params(x.min(), x.max(), spec)


def quantize_input(
    x: torch.Tensor, spec: ActSpec, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake-quantize a layer input with the stored static ``(scale, zero)`` or, for dynamic specs, its own."""
    if spec.dynamic:
        scale, zero = dynamic_params(x, spec)
    return fake_quantize(x, scale.to(x.device), zero.to(x.device), spec)


class ActObserver:
    """Collects one layer input's range and a uniform random subsample of its values; fits the static scale."""

    def __init__(self, spec: ActSpec, method: str, seed: int = 0) -> None:
        self.spec = spec
        self.method = method
        self.low = torch.tensor(float("inf"))
        self.high = torch.tensor(float("-inf"))
        self.samples: list[torch.Tensor] = []
        self.tail = torch.empty(0)
        self.count = 0
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def add_batch(self, x: torch.Tensor) -> None:
        """Observe the rows of ``x`` (padding already removed)."""
        flat = x.detach().reshape(-1).float().cpu()
        if flat.numel() == 0:
            return
        self.low = torch.minimum(self.low, flat.min())
        self.high = torch.maximum(self.high, flat.max())
        self.count += flat.numel()
        tail = torch.cat([self.tail, flat[flat.abs().topk(min(TAIL_SIZE, flat.numel())).indices]])
        self.tail = tail[tail.abs().topk(min(TAIL_SIZE, tail.numel())).indices]
        keep = min(flat.numel(), SAMPLE_SIZE)
        if keep < flat.numel():  # uniform, with replacement (a permutation of millions of values costs more)
            flat = flat[torch.randint(flat.numel(), (keep,), generator=self.generator)]
        self.samples.append(flat)
        kept = sum(s.numel() for s in self.samples)
        if kept > 2 * SAMPLE_SIZE:  # thin to SAMPLE_SIZE, keeping the sample uniform over everything seen
            merged = torch.cat(self.samples)
            self.samples = [merged[torch.randperm(merged.numel(), generator=self.generator)[:SAMPLE_SIZE]]]

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fitted ``(scale, zero)`` as float32 tensors of shape ``[1]`` (every data-parallel rank's values)."""
        self._merge_ranks()
        if self.count == 0:
            raise ValueError("activation observer saw no calibration values; the layer was never reached")
        values = torch.cat(self.samples)
        if self.method == "minmax":
            scale, zero = range_params(self.low, self.high, self.spec)
        elif self.method == "percentile":
            q = torch.quantile(values[: 1 << 24], torch.tensor([1 - PERCENTILE, PERCENTILE]))
            scale, zero = range_params(q[0], q[1], self.spec)
        else:
            scale, zero = self._mse_search(values[:MSE_SAMPLE])
        return scale.reshape(1).float(), zero.reshape(1).float()

    def _merge_ranks(self) -> None:
        """Make the observation every data-parallel rank's (no-op in one process), so all ranks fit one scale.

        The range, the count and the tail are exact (all ranks' extremes). The values are exact too, in one process's
        order, while no rank subsampled (at most ``2 * SAMPLE_SIZE`` values in all, ``SAMPLE_SIZE`` per batch);
        beyond that each rank's sample gives a share proportional to its count, drawn with the same seed on every
        rank: a uniform sample like one process's, but another one, so percentile and MSE scales can differ from a
        one-process run by that sample's noise."""
        if not distributed.is_distributed():
            return
        what = "the static activation scales' observations"
        ends = torch.stack([-self.low, self.high]).float()
        distributed.all_reduce_max([ends], what)
        self.low, self.high = -ends[0], ends[1]
        tail = torch.cat(distributed.all_gather_rows(self.tail.float(), what))
        self.tail = tail[tail.abs().topk(min(TAIL_SIZE, tail.numel())).indices]
        counts = [int(c) for c in torch.cat(distributed.all_gather_rows(torch.tensor([self.count]), what))]
        mine = torch.cat(self.samples) if self.samples else torch.empty(0)
        samples = distributed.all_gather_rows(mine, what)
        self.count = sum(counts)
        if self.count <= 2 * SAMPLE_SIZE and all(s.numel() == c for s, c in zip(samples, counts, strict=True)):
            self.samples = [torch.cat(samples)]
            return
        generator = torch.Generator().manual_seed(self.seed)
        parts = []
        for sample, count in zip(samples, counts, strict=True):
            take = min(sample.numel(), round(SAMPLE_SIZE * count / self.count))
            parts.append(sample[torch.randperm(sample.numel(), generator=generator)[:take]])
        merged = torch.cat(parts)
        self.samples = [merged[torch.randperm(merged.numel(), generator=generator)]]

    def _mse_search(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shrink the range ends by the factors of ``MSE_ALPHAS``: both ends together (symmetric grids), or each end
        in turn (high, low, high again: a skewed outlier on one side must not clip the other).

        The error is estimated over all observed values: the exact tail values plus the random sample standing for
        the rest."""
        tail = self.tail
        rest = max(self.count - tail.numel(), 0)

        def error(low: torch.Tensor, high: torch.Tensor) -> float:
            s, z = range_params(low, high, self.spec)
            sample = float((fake_quantize(values, s, z, self.spec) - values).square().mean())
            exact = float((fake_quantize(tail, s, z, self.spec) - tail).square().sum())
            return (sample * rest + exact) / self.count

        low, high = self.low.clone(), self.high.clone()
        if self.spec.sym:
            alpha = min(MSE_ALPHAS, key=lambda a: error(low * a, high * a))
            return range_params(low * alpha, high * alpha, self.spec)
        for end in ("high", "low", "high"):
            if end == "high":
                high = self.high * min(MSE_ALPHAS, key=lambda a: error(low, self.high * a))
            else:
                low = self.low * min(MSE_ALPHAS, key=lambda a: error(self.low * a, high))
        return range_params(low, high, self.spec)


def _check(ok: bool, field: str, value: object, allowed: str, fix: str) -> None:
    if not ok:
        raise ValueError(f"BCQuantizationConfig: {field}={value!r} is invalid; allowed: {allowed}. Fix: {fix}")


def check_activation_fields(config: object) -> None:
    """Validate a ``BCQuantizationConfig``'s activation fields (ValueError naming the field and the fix)."""
    bits, granularity, method = config.act_bits, config.act_granularity, config.act_scale
    _check(
        bits is None or (type(bits) is int and bits in ACT_BITS),
        "act_bits",
        bits,
        f"None (float activations) or one of {ACT_BITS}",
        "act_bits=8",
    )
    _check(
        granularity in ACT_GRANULARITIES,
        "act_granularity",
        granularity,
        str(ACT_GRANULARITIES),
        'act_granularity="tensor"',
    )
    _check(method in ACT_SCALES, "act_scale", method, str(ACT_SCALES), 'act_scale="mse"')
    _check(isinstance(config.act_sym, bool), "act_sym", config.act_sym, "True or False", "act_sym=False")
    _check(
        granularity == "tensor" or method == "dynamic",
        "act_granularity",
        granularity,
        '"token" only with act_scale="dynamic" (a per-token scale cannot be fitted before the tokens are seen)',
        'act_scale="dynamic", or act_granularity="tensor" with a static act_scale',
    )


class StageActivations:
    """The input quantizers of one calibration stage's layer groups (keyed by the group's first layer).

    Static scales are fitted with :meth:`observe` / :meth:`fit` on the stage's quantized-stream inputs before the
    weights are quantized; :meth:`apply` then gives the inputs the packed layers will see, :meth:`attach` sets them on
    the packed layers.
    """

    def __init__(self, config: object, keys: list[str]) -> None:
        self.spec = spec_from_config(config)
        self.static = self.spec is not None and not self.spec.dynamic
        method = getattr(config, "act_scale", "minmax")
        seed = getattr(config, "seed", 0)
        self.observers = {k: ActObserver(self.spec, method, seed) for k in keys} if self.static else {}
        self.params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(self, key: str, x: torch.Tensor) -> None:
        self.observers[key].add_batch(x)

    def fit(self) -> None:
        self.params = {k: obs.params() for k, obs in self.observers.items()}
        self.observers = {}

    def apply(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized as the packed layer of group ``key`` will quantize it (unchanged without a spec)."""
        if self.spec is None:
            return x
        return quantize_input(x, self.spec, *self.params.get(key, (None, None)))

    def attach(self, key: str, layer: torch.nn.Module) -> None:
        if self.spec is not None:
            layer.set_input_quantizer(self.spec, *self.params.get(key, (None, None)))
