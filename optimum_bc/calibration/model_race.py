"""``bc_target="auto"`` with a weight method that reads its inputs (GPTQ, COMQ, ERQ): a race of whole models.

The shared-weight race (:mod:`optimum_bc.calibration.auto_race`) fits one set of quantized weights, on its leading
stream. With RTN every stream is then exactly its manual variant; with a method that fits the weights to the inputs
it sees, the other streams stand in poorly for their manual variants (docs/bc_auto.md, seventh round: on GPTQ 3-bit
g128 the race picked the float + sink stream and gave 34.30 where that manual variant gives 31.35; with ERQ the
worst stream on the calibration windows was the best manual variant held out).

So here every candidate IS its manual variant. One calibrator per mode of
:func:`optimum_bc.algorithms.bc_select.race_modes` (its config: the mode's target and sink tokens, BC off for
``"none"``) quantizes its own copy of every block on its own quantized stream, exactly as that variant run alone
would; the float stream is shared. After the last block the streams are scored as the shared race scores them
(:class:`~optimum_bc.calibration.auto_race.AutoRace`: the mean KL divergence of the next-token distribution from the
float model's on BC's budget batches; an image encoder's final-norm features; else the normalised error) and the
winner's blocks replace the model's. The report is the winner's, with every stream's scores and, per block, the time
and passes of all streams (``bc_choice_seconds``: the other streams').

Cost: one calibration per candidate (four with a sink token). Memory: one packed copy of the quantized model per
candidate, kept on the CPU. Offloaded calibration (blocks on disk), or copies that would take more than half the CPU
memory available (:func:`copies_fit`), take the shared-weight race instead, whose memory is bounded by one block.
"""

import copy
import logging

import psutil
import torch
from torch import nn

from ..algorithms.bc_select import leader, race_modes
from ..config import BCQuantizationConfig
from .architectures import first_param_device, get_blocks
from .auto_race import encoder_norm, final_head
from .block_inputs import _Batch
from .offload import drop_dense_caches
from .report import TIME_SPLIT


logger = logging.getLogger(__name__)

#: BlockReport counters summed over the race's calibrators (the block's whole cost).
_SUMMED = ("seconds", "block_passes", "stopped_passes", *TIME_SPLIT)


def mode_config(config: BCQuantizationConfig, mode: str) -> BCQuantizationConfig:
    """The manual variant race mode ``mode`` stands for: its target and sink tokens, BC off for ``"none"``."""
    variant = copy.copy(config)
    variant.bias_compensation = mode != "none"
    variant.bc_target = "sequential" if mode == "none" else mode.removesuffix("+sink")
    variant.bc_sink_tokens = config.bc_sink_tokens if mode.endswith("+sink") else 0
    return variant


def copies_fit(blocks: nn.ModuleList, config: BCQuantizationConfig) -> bool:
    """Whether the other candidates' packed copies of ``blocks`` fit in half the CPU memory available now (each
    weight ``bits / 8`` bytes plus an eighth of a byte for scales and zero points; logged when they do not)."""
    weights = sum(p.numel() for p in blocks.parameters())
    need = weights * (config.bits / 8 + 0.125) * (len(race_modes(config.layer_sink_tokens)) - 1)
    available = psutil.virtual_memory().available
    if need <= available / 2:
        return True
    logger.warning(
        "optimum-bc: bc_target='auto': the race of whole models would keep %.1f GiB of packed candidate copies, more "
        "than half the %.1f GiB of CPU memory available: the candidates share their weights instead (the shared-weight "
        "race). Set bc_target explicitly to run one variant.",
        need / 2**30,
        available / 2**30,
    )
    return False


def _keep(block: nn.Module, device: torch.device) -> nn.Module:
    """A block held on the CPU until needed (a finished candidate's, its dense caches dropped, or the pristine float
    copy)."""
    drop_dense_caches(block)
    return block if device.type == "cpu" else block.to("cpu")


class ModelRace:
    """Runs the race for ``parent`` (a :class:`~optimum_bc.calibration.calibrator.BlockCalibrator` whose ``run``
    has set its batch bookkeeping); its report, compensated layers and the model's blocks become the winner's."""

    def __init__(self, parent) -> None:
        self.parent = parent
        self.modes = race_modes(parent.config.layer_sink_tokens)
        self.calibrators = {}
        for mode in self.modes:
            child = type(parent)(
                parent.model, parent.spec, mode_config(parent.config, mode), parent.skip, None, parent.store
            )
            for name in (
                "batch_ids",
                "total_batches",
                "bc_batches",
                "report_batches",
                "total_bc_batches",
                "local_batches",
                "total_blocks",
            ):
                setattr(child, name, getattr(parent, name))
            child.report.calibration_tokens = parent.report.calibration_tokens
            child.report.bc_tokens = parent.report.bc_tokens if child.bc else 0
            child.report.mse_tokens = parent.report.mse_tokens if child.bc else 0
            self.calibrators[mode] = child

    def run(self, batches: list[_Batch], float_batches: list[_Batch], bar) -> None:
        """Quantize every block once per candidate, score the streams, install the winner (``float_batches``: the
        float stream's batches, ``bar``: the progress bar, advanced per block)."""
        parent = self.parent
        blocks = get_blocks(parent.model, parent.spec)
        streams = dict.fromkeys(self.modes, batches)
        floats = {mode: float_batches if c.float_stream else None for mode, c in self.calibrators.items()}
        models: dict[str, list[nn.Module]] = {mode: [] for mode in self.modes}
        devices: list[torch.device] = []
        block_scores: list[dict[str, float]] = []
        for i in range(len(blocks)):
            bar.set_description(f"optimum-bc {parent.spec.blocks}.{i} ({len(self.modes)} candidates)")
            device = first_param_device(blocks[i])
            devices.append(device)
            # Each candidate quantizes its own copy of the float block, made when its turn comes from one pristine
            # copy taken before the first candidate quantizes the block itself (two float copies at most).
            pristine = _keep(copy.deepcopy(blocks[i]), device)
            shared: dict[int, list[_Batch]] = {}
            for k, (mode, child) in enumerate(self.calibrators.items()):
                block = blocks[i] if k == 0 else copy.deepcopy(pristine).to(device)
                streams[mode], next_fp = child.quantize_block(i, block, streams[mode], floats[mode])
                if next_fp is not None:  # the float stream is the same for every candidate: keep one copy
                    floats[mode] = shared.setdefault(len(next_fp), next_fp)
                models[mode].append(_keep(block, device))
            del pristine
            block_scores.append(self._score(i, streams, floats, device))
            bar.update(1)
        winner = leader(block_scores[-1], self.modes)
        sink_tokens = parent.config.layer_sink_tokens
        # Every Linear BC compensates in some candidate: the layers the saved config gives a bias (and sink rows).
        compensated = {name for c in self.calibrators.values() for name in c.compensated}
        for i, block in enumerate(models[winner]):
            blocks[i] = block.to(devices[i])
            for name, module in block.named_modules():  # the config's layout: a (zero) sink bias where BC puts one
                full = f"{parent.spec.blocks}.{i}.{name}"
                if full in compensated and sink_tokens and module.sink_bias is None:
                    module.set_sink_bias(torch.zeros(sink_tokens, module.bias.shape[0]))
        self._report(winner, block_scores, compensated)

    def _score(
        self,
        index: int,
        streams: dict[str, list[_Batch]],
        floats: dict[str, list[_Batch] | None],
        device: torch.device,
    ) -> dict[str, float]:
        """Every stream's error after block ``index`` on the budget batches (the race's measures, reused from
        :class:`~optimum_bc.calibration.auto_race.AutoRace` through the parent's state)."""
        parent = self.parent
        n = parent.bc_batches
        fp = next(f for f in floats.values() if f is not None)[:n]
        parent.streams = {mode: stream[:n] for mode, stream in streams.items()}
        scores = parent._stream_errors(fp, device)
        if index == parent.total_blocks - 1:
            parent.race_head = final_head(parent.model, parent.spec.blocks)
            parent.race_norm = encoder_norm(parent.model, parent.spec.blocks) if parent.race_head is None else None
            parent.race_hidden = scores
            if parent._head_fits(parent.streams[self.modes[0]]):
                scores = parent._logit_divergence(fp, device)
            elif parent.race_norm is not None:
                scores = parent._feature_errors(fp, device)
            else:
                parent.race_hidden = {}
        parent.streams = {}
        return scores

    def _report(self, winner: str, block_scores: list[dict[str, float]], compensated: set[str]) -> None:
        """The winner's report, with every stream's scores and every calibrator's time and passes per block
        (``compensated``: the layers BC compensates in some candidate, whose rows name the choice)."""
        parent = self.parent
        chosen = self.calibrators[winner]
        for row in chosen.report.layers:
            if row.name in compensated:
                row.bc_choice = winner
        for b, block in enumerate(chosen.report.blocks):
            block.bc_choice, block.bc_scores = winner, block_scores[b]
            others = [c.report.blocks[b] for mode, c in self.calibrators.items() if mode != winner]
            block.bc_choice_seconds = sum(o.seconds for o in others)
            for name in _SUMMED:
                setattr(block, name, getattr(block, name) + sum(getattr(o, name) for o in others))
        parent.report.layers, parent.report.blocks = chosen.report.layers, chosen.report.blocks
        parent.report.experts = chosen.report.experts
        parent.compensated = chosen.compensated
        logger.info("optimum-bc: bc_target='auto': the %r model ended closest to the float model", winner)
        parent.report.bc_summary = parent._race_summary(
            "BC chosen by the auto race of whole models (each candidate quantized on its own stream)",
            winner,
            block_scores[-1],
            "model",
        )
        parent.race_hidden = {}
