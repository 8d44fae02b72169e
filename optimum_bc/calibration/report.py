"""``QuantizationReport``: per-layer and per-block numbers of one quantization run, returned as data."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    """One quantized Linear. MSEs are per output element against the BC target, on the first calibration tokens
    within BC's (``QuantizationReport.mse_tokens``)."""

    name: str
    block: int
    seconds: float
    loss: float
    damp: float | None = None
    mse_before: float | None = None
    mse_after: float | None = None
    bc_choice: str | None = None  # bc_target="auto": the BC mode its block chose (optimum_bc.bc_select.MODES)


@dataclass
class ExpertReport:
    """One expert of a fused mixture-of-experts weight: the calibration tokens routed to it, the method used (an
    expert no token reaches is rounded to nearest) and, with BC, its output MSE (routing-weighted) before/after."""

    name: str
    expert: int
    tokens: int
    method: str
    loss: float
    mse_before: float | None = None
    mse_after: float | None = None


@dataclass
class BlockReport:
    """One decoder block; ``mse_*`` are those of the block output when layer-level compensation ran."""

    index: int
    seconds: float
    mse_before: float | None = None
    mse_after: float | None = None
    bc_choice: str | None = None  # bc_target="auto": the chosen BC mode (in the race: the winner, in every block)
    # Per-block choice: the held-out block-output error of every candidate. Race: every stream's normalised error
    # after the block (after the last block: the KL divergence of its next-token distribution, when there is a head).
    bc_scores: dict[str, float] = field(default_factory=dict)
    bc_fallback: str | None = None  # why the held-out choice did not decide (nothing held out)
    bc_choice_seconds: float = 0.0  # time choosing took (the extra block forwards: candidates or the race's streams)
    # Where the block's time went (BlockClock): block forwards of the stage passes, the float pass and the pass to
    # the next block; statistics (Hessians, BC input sums); solve (the quantization algorithm and packing); BC (the
    # auto choice or race, the report's residual pass, layer-level BC, each with its own forwards).
    forward_seconds: float = 0.0
    statistics_seconds: float = 0.0
    solve_seconds: float = 0.0
    bc_seconds: float = 0.0
    # Block-forward passes over the calibration tokens: whole passes, and passes stopped once a stage's inputs were
    # seen (each counted as one, however early it stopped).
    block_passes: float = 0.0
    stopped_passes: float = 0.0


#: The BlockReport fields that split a block's time.
TIME_SPLIT = ("forward_seconds", "statistics_seconds", "solve_seconds", "bc_seconds")


class BlockClock:
    """Times the parts of one block's calibration (:data:`TIME_SPLIT`) and counts its block-forward passes.

    Nested ``timed`` sections count for the outermost one only (the auto choice's forwards are BC time)."""

    def __init__(self, batches: int) -> None:
        self.batches = max(batches, 1)
        self.seconds = dict.fromkeys(TIME_SPLIT, 0.0)
        self.passes = [0.0, 0.0]  # whole, stopped
        self._depth = 0

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the time spent inside to ``part`` ("forward", "statistics", "solve" or "bc")."""
        self._depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.seconds[f"{part}_seconds"] += time.perf_counter() - start

    def count_pass(self, stopped: bool = False) -> None:
        """Count one block forward on one calibration batch (a pass is one forward on every batch)."""
        self.passes[int(stopped)] += 1 / self.batches

    def fill(self, report: "BlockReport") -> None:
        """Write the split and the pass counts into ``report``."""
        for name, seconds in self.seconds.items():
            setattr(report, name, seconds)
        report.block_passes, report.stopped_passes = self.passes


@dataclass
class QuantizationReport:
    """Everything measured while quantizing a model (attached as ``model.quantization_report``)."""

    layers: list[LayerReport] = field(default_factory=list)
    blocks: list[BlockReport] = field(default_factory=list)
    total_seconds: float = 0.0
    calibration_tokens: int = 0
    experts: list[ExpertReport] = field(default_factory=list)
    bc_summary: str | None = None  # bc_target="auto": which candidate stream won the race, and why
    # Calibration tokens BC's sums and the auto race ran on: the first batches up to
    # optimum_bc.calibration.bc_budget.BC_TOKENS (0 without BC).
    bc_tokens: int = 0
    # Calibration tokens of the per-layer MSEs: the first batches up to bc_budget.REPORT_TOKENS (0 without BC).
    mse_tokens: int = 0

    def without_timings(self) -> "QuantizationReport":
        """A copy with every recorded time set to 0 (timings differ between otherwise identical runs)."""
        quiet = QuantizationReport.from_dict(self.to_dict())
        for row in [*quiet.layers, *quiet.blocks]:
            row.seconds = 0.0
        for block in quiet.blocks:
            block.bc_choice_seconds = 0.0
            for name in TIME_SPLIT:
                setattr(block, name, 0.0)
        quiet.total_seconds = 0.0
        return quiet

    def tokens_per_expert(self) -> dict[str, list[int]]:
        """Calibration tokens routed to each expert, per fused expert weight (full name)."""
        counts: dict[str, list[int]] = {}
        for row in self.experts:
            column = counts.setdefault(row.name, [])
            column.extend([0] * (row.expert + 1 - len(column)))
            column[row.expert] = row.tokens
        return counts

    def time_split(self) -> str:
        """One line: the blocks' time split summed over blocks and the block-forward passes per block."""
        parts = ", ".join(
            f"{n.removesuffix('_seconds')} {sum(getattr(b, n) for b in self.blocks):.1f} s" for n in TIME_SPLIT
        )
        whole = sum(b.block_passes for b in self.blocks) / len(self.blocks)
        stopped = sum(b.stopped_passes for b in self.blocks) / len(self.blocks)
        return f"time split: {parts}; per block {whole:.2f} whole + {stopped:.2f} stopped block-forward passes"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantizationReport":
        """Inverse of :meth:`to_dict`."""
        return cls(
            layers=[LayerReport(**row) for row in data.get("layers", [])],
            blocks=[BlockReport(**row) for row in data.get("blocks", [])],
            total_seconds=data.get("total_seconds", 0.0),
            calibration_tokens=data.get("calibration_tokens", 0),
            experts=[ExpertReport(**row) for row in data.get("experts", [])],
            bc_summary=data.get("bc_summary"),
            bc_tokens=data.get("bc_tokens", 0),
            mse_tokens=data.get("mse_tokens", 0),
        )

    def format_table(self) -> str:
        """Plain-text table, one row per layer, then totals."""

        def num(v: float | None) -> str:
            return "-" if v is None else f"{v:.4g}"

        lines = [
            f"{'layer':<44} {'mse before BC':>14} {'mse after BC':>14} {'loss':>11} {'seconds':>8} {'BC chosen':>16}"
        ]
        for row in self.layers:
            lines.append(
                f"{row.name:<44} {num(row.mse_before):>14} {num(row.mse_after):>14} {num(row.loss):>11}"
                f" {row.seconds:>8.2f} {row.bc_choice or '-':>16}"
            )
        for block in self.blocks:
            if block.mse_before is not None:
                lines.append(
                    f"{'block ' + str(block.index) + ' (layer-level BC)':<44} {num(block.mse_before):>14}"
                    f" {num(block.mse_after):>14} {'':>11} {block.seconds:>8.2f}"
                )
        for name, counts in self.tokens_per_expert().items():
            rtn = [row.expert for row in self.experts if row.name == name and row.method == "rtn" and row.tokens == 0]
            lines.append(f"{name}: tokens per expert {counts}" + (f", RTN (no token): {rtn}" if rtn else ""))
        for block in self.blocks:
            if block.bc_fallback:
                lines.append(f"block {block.index}: {block.bc_fallback}")
        if self.bc_summary:
            lines.append(self.bc_summary)
        bc = f" (BC on {self.bc_tokens}, its MSEs on {self.mse_tokens})" if self.bc_tokens else ""
        lines.append(
            f"{len(self.layers)} layers, {len(self.blocks)} blocks, {self.calibration_tokens} calibration tokens{bc},"
            f" {self.total_seconds:.1f} s"
        )
        if self.blocks:
            lines.append(self.time_split())
        return "\n".join(lines)
