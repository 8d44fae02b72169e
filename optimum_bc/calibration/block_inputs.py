"""The inputs of the decoder blocks: one calibration batch's hidden states, masks and per-block arguments.

The first block's inputs are recorded by running the model's embeddings once per batch; every block's own keyword
arguments (hybrid stacks give sliding-window, full and linear-attention layers different masks) are recorded in the
same pass, with the blocks replaced by recording stubs.
"""

import inspect
import logging
from dataclasses import dataclass

import torch
from accelerate.utils import send_to_device
from torch import nn


logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook to stop the model forward after the first block's inputs are recorded."""


@dataclass
class _Batch:
    """Inputs of a decoder block for one calibration batch."""

    hidden: torch.Tensor  # (batch, tokens, hidden)
    kwargs: dict
    valid: torch.Tensor  # (batch, tokens) bool: non-padding tokens
    # Every block's own keyword arguments (hybrid stacks give sliding / full / linear layers different masks).
    per_block: list[dict] | None = None

    def for_block(self, index: int) -> "_Batch":
        """The batch with block ``index``'s own keyword arguments."""
        if self.per_block is None:
            return self
        return _Batch(self.hidden, self.per_block[index], self.valid, self.per_block)

    def with_hidden(self, hidden: torch.Tensor) -> "_Batch":
        """The same batch (arguments, mask) with other hidden states."""
        return _Batch(hidden, self.kwargs, self.valid, self.per_block)

    def to(self, device: torch.device, store: torch.device | None = None) -> "_Batch":
        """The batch with its kwargs (masks, rotary embeddings) and mask on ``device`` and its hidden states on
        ``store`` (default ``device``; the CPU when activations are offloaded)."""
        store = device if store is None else store
        if self.valid.device == device and self.hidden.device == store:
            return self
        return _Batch(
            self.hidden.to(store), send_to_device(self.kwargs, device), self.valid.to(device), self.per_block
        )


def collate(samples: list[dict[str, torch.Tensor]], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Group calibration samples into batches, right-padding shorter ones (mask 0)."""
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        length = max(s["input_ids"].shape[-1] for s in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.long)
        mask = torch.zeros(len(chunk), length, dtype=torch.long)
        for i, s in enumerate(chunk):
            n = s["input_ids"].shape[-1]
            ids[i, :n] = s["input_ids"].reshape(-1)
            mask[i, :n] = s.get("attention_mask", torch.ones(1, n, dtype=torch.long)).reshape(-1)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _block_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """A block call's hidden states and every other argument by name (some families pass masks positionally)."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    named: dict = {}
    for name, value in bound.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    first = next(iter(named))
    return named.pop(first), named


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[dict], store: torch.device | None = None
) -> list[_Batch]:
    """Run the model up to its first decoder block and record that block's inputs for every batch.

    Every block's own keyword arguments are recorded too: the blocks are replaced by recording stubs for one cheap
    pass (embeddings and masks only), stopped at the last block. If the model's code between blocks cannot run on
    the stubs' outputs, every block gets the first block's arguments.

    ``store``: where the hidden states are kept (None: where they were computed).
    """
    records: list[_Batch] = []
    current: dict = {}
    signatures = [inspect.signature(block.forward) for block in blocks]

    def make_stub(index: int) -> object:
        def stub(*args: object, **kwargs: object) -> torch.Tensor:
            hidden, named = _block_arguments(signatures[index], args, kwargs)
            if index == 0:
                valid = current["valid"].to(hidden.device)
                current["record"] = _Batch(hidden.detach().to(store or hidden.device), named, valid, [])
            current["record"].per_block.append(named)
            if index == len(blocks) - 1:
                raise _StopForward
            return hidden

        return stub

    device = model.get_input_embeddings().weight.device
    saved = [block.__dict__.get("forward") for block in blocks]
    for i, block in enumerate(blocks):
        block.forward = make_stub(i)
    try:
        for batch in batches:
            current["valid"] = batch["attention_mask"].bool()
            current.pop("record", None)
            try:
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                )
            except _StopForward:
                pass
            except Exception:  # noqa: BLE001 - model code between blocks failed on a stub's output
                if "record" not in current:
                    raise
            record = current["record"]
            if len(record.per_block) != len(blocks):
                logger.debug("optimum-bc: per-block arguments not recorded; every block gets the first block's")
                record.per_block = None
            records.append(record)
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
    return records
