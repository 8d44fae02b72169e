"""The calibration streams' plumbing: where activations live, running a block on one batch, capturing the inputs
of its Linears, and the rows / positions of non-padding tokens."""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..algorithms.bc_select import FOLDS, race_modes
from ..config import BCQuantizationConfig
from ..formats.activations import StageActivations
from ..layers.positions import token_positions
from .block_inputs import _StopForward


logger = logging.getLogger(__name__)


#: Activations are offloaded by default when they would fill more than this share of the GPU's free memory; the rest
#: is left to the block, its float copy, the Hessians and the forward pass's own temporaries.
ACTIVATION_SHARE = 0.5


def free_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator ``device`` (None when the backend cannot tell)."""
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "mem_get_info"):
        return None
    return int(backend.mem_get_info(device)[0])


def activation_streams(config: BCQuantizationConfig) -> int:
    """How many activation streams calibration keeps from block to block: the quantized stream, the float stream
    (bias compensation's target, algorithms using float inputs) and, with ``bc_target="auto"`` (channel
    granularity, no ``bc_layer``, at least :data:`~optimum_bc.algorithms.bc_select.FOLDS` calibration batches), the
    race's other candidate streams (:mod:`optimum_bc.calibration.auto_race`)."""
    streams = 1 + int(config.needs_float_stream)
    batches = -(-config.num_samples // max(1, config.batch_size))
    race = config.bc_target == "auto" and config.bc_granularity == "channel" and not config.bc_layer
    if config.bias_compensation and race and batches >= FOLDS:
        streams += len(race_modes(config.layer_sink_tokens)) - 1
    return streams


def activation_bytes(tokens: int, hidden_size: int, dtype: torch.dtype, streams: int) -> int:
    """Memory of the calibration activations: ``streams`` streams, each one block's inputs and outputs."""
    return tokens * hidden_size * torch.empty((), dtype=dtype).element_size() * streams * 2


def activation_store(setting: bool | None, device: torch.device, needed: int) -> torch.device | None:
    """Where the calibration activations live between uses: None (with the block, on ``device``) or the CPU.

    ``setting`` is ``config.offload_activations``; None decides from the free memory of ``device``: offload when
    the activations (``needed`` bytes) exceed :data:`ACTIVATION_SHARE` of it. Blocks running on the CPU keep theirs.
    """
    if device.type == "cpu":
        return None
    if setting is None:
        free = free_memory(device)
        setting = free is not None and needed > ACTIVATION_SHARE * free
        logger.debug(
            "optimum-bc: calibration activations need %.1f MiB, %s MiB free on %s: %s",
            needed / 2**20,
            "?" if free is None else f"{free / 2**20:.0f}",
            device,
            "kept on the CPU" if setting else f"kept on {device}",
        )
    return torch.device("cpu") if setting else None


def _valid_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (``(batch, tokens, d)`` or already flattened ``(batch*tokens, d)``) at non-padding tokens."""
    return x.reshape(-1, x.shape[-1])[valid.reshape(-1)]


def _valid_positions(valid: torch.Tensor) -> torch.Tensor:
    """Token position of each row returned by :func:`_valid_rows` for the same mask."""
    positions = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    return positions[valid]


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The block's output hidden states; calibration windows are right-padded, so token ``t`` is at position ``t``
    (published for families whose blocks receive no ``position_ids``)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], hidden.shape[1])
    with token_positions(positions):
        out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


@contextmanager
def _capture_inputs(
    block: nn.Module, names: list[str], store: dict[str, torch.Tensor], stop: bool = False
) -> Iterator[None]:
    """Record the input of each named submodule of ``block`` into ``store`` during the forward passes inside.

    With ``stop`` the forward is cut (``_StopForward``) once every input is recorded: the rest of the block is not
    needed to observe them.
    """
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            store[name] = args[0].detach()
            if stop and len(store) == len(names):
                raise _StopForward

        handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
    try:
        yield
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def fit_input_scales(
    acts: StageActivations,
    block: nn.Module,
    keys: list[str],
    batches: list,
    device: torch.device,
    count_pass: Callable[..., None],
) -> None:
    """Fit a stage's static activation scales on its layers' inputs in the quantized stream ``batches`` (one
    stopped block pass per batch, each counted with ``count_pass(stopped=True)``)."""
    for batch in batches:
        seen: dict[str, torch.Tensor] = {}
        with _capture_inputs(block, keys, seen, stop=True):
            count_pass(stopped=True)
            _run_block(block, batch.hidden.to(device), batch.kwargs)
        for key in keys:
            acts.observe(key, _valid_rows(seen[key], batch.valid))
    acts.fit()
