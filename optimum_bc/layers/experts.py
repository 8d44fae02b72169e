"""Packed fused expert weights (``MixtralExperts.gate_up_proj [E, 2I, H]``, GPT-OSS's transposed ``[E, H, 2I]``, ...)
read back by the stock experts forward of every family, dequantizing only the experts the tokens are routed to.

:class:`PackedExperts` is a ``torch.nn.utils.parametrize`` parametrization holding one packed layer per expert
(``QuantLinear`` or ``MXLinear``, always ``[out, in]``; the checkpoint layout). Reading ``experts.gate_up_proj``
returns the stacked ``[E, out, in]`` (or transposed) weight:

* inside a forward of the experts module called as ``forward(hidden_states, top_k_index, top_k_weights)`` and without
  gradients, a forward-pre-hook reads ``top_k_index`` and only the routed experts are dequantized, in one vectorized
  unpack of their stacked codes (:func:`optimum_bc.layers.dequant.dequantize_int_rows`), into a scratch buffer shared
  by every packed expert weight of the same name, shape, dtype and device: its memory is one layer's float experts
  (one buffer per weight name, e.g. ``gate_up_proj`` and ``down_proj``), whatever the number of layers. The other
  experts' slices keep stale (finite) values, which transformers' CPU experts implementations do not read:
  ``eager`` and ``batched_mm`` index the routed experts only, ``grouped_mm`` multiplies each expert's slice by its
  own tokens (none for an unrouted expert); the CUDA-only kernels (``deepgemm``, ``sonicmoe``) were not checked.
  The weight is dequantized once per forward and reused by every read in it. The buffer is shared, so two models
  of the same shapes must not run their experts concurrently in different threads.
* any other read (another call signature, gradients enabled, ``parametrize.cached()``, outside a forward): a fresh
  tensor with every expert dequantized, the exact weight as before.

Both give the same values as ``QuantLinear.dequantize_weight`` / ``MXLinear.dequantize_weight`` bit for bit.
"""

import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..formats.formats import e8m0_to_scale
from ..formats.packing import unpack_int32
from .dequant import contiguous_groups, dequantize_int_rows, dequantize_mx_rows
from .mxlinear import MXLinear
from .packed_base import PackedLinearBase


#: Scratch buffers by ``(weight name, shape, dtype, device, inference mode)``; each lives while a PackedExperts using
#: it does (every one keeps a reference), so a deleted model frees its buffers.
_SCRATCH: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()


def scratch_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The shared scratch buffer for weights called ``name`` of this shape, dtype and device (zeros when new)."""
    key = (name, tuple(shape), dtype, torch.device(device), torch.is_inference_mode_enabled())
    buffer = _SCRATCH.get(key)
    if buffer is None:
        buffer = torch.zeros(shape, dtype=dtype, device=device)
        _SCRATCH[key] = buffer
    return buffer


def routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(top_k_index, top_k_weights)`` of a standard experts call ``(hidden_states, index, weights)``, else None."""
    values = list(args) + list(kwargs.values())
    if len(values) < 3 or not all(isinstance(v, torch.Tensor) for v in values[:3]):
        return None
    hidden, index, weights = values[:3]
    if index.is_floating_point() or not weights.is_floating_point() or index.shape != weights.shape:
        return None
    if index.dim() != 2 or hidden.dim() != 2 or index.shape[0] != hidden.shape[0]:
        return None
    return index, weights


class PackedExperts(nn.Module):
    """Parametrization: the stacked ``[E, out, in]`` (or, ``transposed``, ``[E, in, out]``) weight dequantized from
    one packed layer per expert. The ``original`` tensor parametrize keeps is an empty placeholder carrying the
    weight's dtype (so ``model.to(dtype)`` moves the dequantized weight with it). ``name`` (the attribute it replaces)
    keys the shared scratch buffer."""

    def __init__(self, layers: list[PackedLinearBase], transposed: bool, name: str = "") -> None:
        super().__init__()
        self.packed = nn.ModuleList(layers)
        self.transposed = transposed
        self.name = name
        self._in_forward = False
        self._routed: torch.Tensor | None = None  # sorted expert ids of the current forward (None: all)
        self._forward_cache: torch.Tensor | None = None
        self._scratch: torch.Tensor | None = None  # keeps the shared buffer alive
        self._derived: tuple | None = None  # see _side

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        """The stacked weight in ``original``'s dtype and device (see the module docstring for which experts)."""
        if not self._in_forward:
            return self._full(original)
        cached = self._forward_cache
        if cached is not None and cached.dtype == original.dtype and cached.device == original.device:
            return cached  # an eager forward reads the weight once per routed expert
        if torch.is_grad_enabled() or parametrize._cache_enabled:
            weight = self._full(original)  # autograd or parametrize may keep it: never the shared buffer
        else:
            weight = self._fill(self._routed, original.dtype, original.device)
        self._forward_cache = weight
        return weight

    def _full(self, original: torch.Tensor) -> torch.Tensor:
        full = self.dequantize(None, original.dtype, original.device)
        return full.transpose(1, 2) if self.transposed else full

    def _fill(self, routed: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Dequantize the ``routed`` experts (None: all) into the shared scratch buffer and return it (transposed
        families get a transposed view of an ``[E, out, in]`` buffer: the same layout as the full read)."""
        first = self.packed[0]
        shape = (len(self.packed), first.out_features, first.in_features)
        scratch = self._scratch
        # Inference tensors can only be written in inference mode, others only outside it: one buffer for each.
        mode = (shape, dtype, device, torch.is_inference_mode_enabled())
        if scratch is None or (scratch.shape, scratch.dtype, scratch.device, scratch.is_inference()) != mode:
            scratch = self._scratch = scratch_buffer(self.name, shape, dtype, device)
        if routed is not None and routed.numel() == len(self.packed):
            routed = None
        if routed is None:
            self.dequantize(None, dtype, out=scratch)
        elif routed.numel():  # each routed expert's slice is written by the last op of its dequantization
            self.dequantize(routed, dtype, out=[scratch[e] for e in routed.tolist()])
        return scratch.transpose(1, 2) if self.transposed else scratch

    def dequantize(
        self,
        experts: torch.Tensor | None,
        dtype: torch.dtype,
        device: torch.device | None = None,
        out: torch.Tensor | list[torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Dense ``[len(experts), out, in]`` weights of the ``experts`` (ids, None: all) in ``dtype``: one unpack of
        their stacked codes, float32 math rounded once to ``dtype``. With ``out`` (a ``[len(experts), out, in]``
        tensor of ``dtype`` or one ``[out, in]`` view per expert) the result is written there and None returned."""
        with torch.no_grad():
            ids = range(len(self.packed)) if experts is None else experts.tolist()
            layers = [self.packed[i] for i in ids]
            qweight = torch.stack([layer.qweight for layer in layers])
            first = layers[0]
            if isinstance(first, MXLinear):
                scales = e8m0_to_scale(torch.stack([layer.scales for layer in layers]))
                weight = dequantize_mx_rows(qweight, scales, first.element.values, first.bits, out)
            else:
                zeros, scales, g_idx = self._side()
                if experts is not None:
                    index = experts.to(zeros.device)
                    zeros, scales = zeros.index_select(0, index), scales.index_select(0, index)
                    g_idx = None if g_idx is None else g_idx.index_select(0, index)
                weight = dequantize_int_rows(qweight, zeros, scales, first.bits, first.in_features, g_idx, out)
        if out is not None or weight is None:
            return None
        return weight.to(device=device, dtype=dtype)

    def _side(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """uint8 zero points and float32 scales ``[E, out, G]`` of every expert and their ``g_idx`` ``[E, in]`` (None:
        the default grouping), derived once (5 bytes per group, small next to the codes). Dropped by ``.to()`` /
        ``load_state_dict``, and rebuilt when the first expert's buffers were replaced or written in place."""
        first = self.packed[0]
        source = tuple((t.data_ptr(), t._version) for t in (first.qzeros, first.scales, first.g_idx))
        if self._derived is None or self._derived[0] != source:
            zeros = unpack_int32(torch.cat([layer.qzeros for layer in self.packed]), first.bits, first.num_groups)
            scales = torch.stack([layer.scales for layer in self.packed]).float()
            g_idx = torch.stack([layer.g_idx for layer in self.packed])
            default = contiguous_groups(g_idx, first.num_groups)
            self._derived = (source, zeros.view(scales.shape), scales, None if default else g_idx)
        return self._derived[1:]

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        """Drop derived data before moving or casting (it is rebuilt from the moved buffers)."""
        self._derived, self._scratch, self._forward_cache = None, None, None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        """Load as usual, then drop the derived data of the old buffers."""
        super()._load_from_state_dict(*args, **kwargs)
        self._derived = None

    def begin_forward(self, routed: torch.Tensor | None) -> None:
        """A forward of the owning experts module begins; ``routed``: the sorted expert ids its tokens use (None:
        unknown, all)."""
        self._in_forward, self._routed, self._forward_cache = True, routed, None

    def end_forward(self) -> None:
        """That forward ended: drop the reference to the filled buffer (its memory stays for the next layer)."""
        self._in_forward, self._routed, self._forward_cache = False, None, None

    def biases(self, dtype: torch.dtype) -> torch.Tensor:
        """``[E, out]``: each expert's compensation bias."""
        return torch.stack([layer.bias.to(dtype) for layer in self.packed])

    def weight_bytes(self) -> int:
        """Bytes of the packed buffers of every expert."""
        return sum(layer.weight_bytes() for layer in self.packed)


def routed_experts(args: tuple, kwargs: dict, experts: int) -> torch.Tensor | None:
    """Sorted ids (``< experts``) the tokens of a standard experts call are routed to; None for another signature."""
    found = routing(args, kwargs)
    if found is None:
        return None
    index = found[0]
    return torch.unique(index[(index >= 0) & (index < experts)])
