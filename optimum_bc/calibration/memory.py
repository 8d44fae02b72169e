"""How much memory calibrating one block needs, checked against ``max_memory`` before anything loads.

The estimates follow the calibration's own steps (the Gram triangle, GPTQ's in-place factor, a packed layer's dense
weight, bias compensation's streamed float copy, one batch's forward activations and the report's residual pass, the
activation streams) and are measured within 20 % of real peaks (tests/test_gptq_memory.py,
tests/test_block_memory.py).
"""

from collections.abc import Mapping

import torch
from accelerate.utils import named_module_tensors
from torch import nn

from ..algorithms.base import GRAM_ROW_BLOCK
from ..algorithms.bc_select import FOLDS
from ..config import BCQuantizationConfig
from .discovery import layer_features
from .experts import fused_expert_params


Device = int | str | torch.device


def group_calibration_bytes(in_features: int, stacked_out: int) -> int:
    """Peak bytes of observing and quantizing one group of Linears sharing an input (``stacked_out`` rows in all).

    Accumulating: the float64 lower triangle of the Gram sum (row blocks of
    :data:`~optimum_bc.algorithms.base.GRAM_ROW_BLOCK`: ``4 · in · (in + block)``) plus one row block of the batch
    product in float32 and float64. Solving (GPTQ, :mod:`optimum_bc.algorithms.gptq`): the float32 lower triangle
    (half an in×in matrix) beside the in×in factor computed in place; then, once the triangle is freed, the factor
    with the float32 working copy of the weights, the uint8 codes and their reordered copy (8 bytes a weight).
    Measured within 20 % (tests/test_gptq_memory.py).
    """
    n, block = in_features, min(GRAM_ROW_BLOCK, in_features)
    accumulate = 4 * n * (n + block) + 12 * block * n
    solve = max(4 * n * n + 2 * n * (n + block) + 2 * block * n, 4 * n * n + 8 * stacked_out * n)
    return max(accumulate, solve)


#: Peak bytes per weight of computing a packed layer's dense weight, which the quantized stream does on the layer's
#: forwards (``QuantLinear.dequantize_weight``, built a block of rows at a time into the result): the float32
#: result (4), the per-row scales / zeros (at most 0.17 at group size 32) and ~1-2 MiB of per-block temporaries.
#: Measured with tests/test_dequant_memory.py's live-storage counter on 2048x5504 layers: 4.02-4.17 (was 33).
DENSE_WEIGHT_BYTES_PER_WEIGHT = 5


def packed_bytes(numel: int, bits: int, group_size: int) -> int:
    """About the bytes of one packed layer with ``numel`` weights: the codes (``bits`` a weight) and per group of
    ``group_size`` weights a float16 scale and a packed zero point."""
    groups = -(-numel // group_size) if group_size > 0 else 1
    return numel * bits // 8 + groups * (16 + bits) // 8


def forward_elements(hidden_size: int, widest_input: int, attention_scores: int = 0) -> int:
    """Activation elements per token alive at the peak of one decoder block's forward pass (no autograd).

    The MLP holds its input and the residual (``2 · hidden``) beside three ``widest_input``-wide tensors (the gated
    MLP's activated gate, its up projection and their product; ``widest_input`` is the block's widest Linear input,
    the MLP's intermediate size); attention holds about ``8 · hidden`` (the normalised input, q / k / v, the rotated
    q / k, the attention output, the residual) plus the scores an eager implementation materialises
    (``attention_scores`` per token, e.g. ``2 · heads · seq_len`` for the scores and their softmax; SDPA keeps none).
    Measured with LLaMA blocks (SDPA, 1024-2048 hidden, 512-5504 intermediate, 4096 tokens): 1.00-1.03 of this.
    """
    return max(2 * hidden_size + 3 * widest_input, 8 * hidden_size + attention_scores)


#: Bytes per output element of the report's residual pass (``_measure_layers``) beside the layer's output: its
#: float32 valid-rows copy and ``r = float - quantized + bias`` (float32), ``r`` in float64 and ``r²`` (float64).
RESIDUAL_BYTES_PER_OUTPUT = 20


def forward_shape(model_config: object, calibration: list, batch_size: int) -> dict[str, int]:
    """The per-batch arguments of :func:`block_calibration_bytes` for a text model: the tokens of one calibration
    batch (``batch_size`` windows of the longest window), the hidden size and, with eager attention, the attention
    scores per token (scores and softmax: ``2 · heads · window``)."""
    windows = [int(s["input_ids"].shape[-1]) for s in calibration if isinstance(s, dict) and "input_ids" in s]
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = getattr(text, "hidden_size", None)
    if not windows or not hidden:
        return {}
    window = max(windows)
    scores = 0
    if getattr(model_config, "_attn_implementation", None) == "eager":
        scores = 2 * int(getattr(text, "num_attention_heads", 0) or 0) * window
    return {
        "batch_tokens": min(batch_size, len(windows)) * window,
        "hidden_size": int(hidden),
        "attention_scores": scores,
        "calibration_tokens": sum(windows),
        "experts_per_token": int(getattr(text, "num_experts_per_tok", None) or 1),
    }


def expert_calibration_bytes(
    block: nn.Module, bias_compensation: bool, batch_tokens: int, calibration_tokens: int, experts_per_token: int
) -> int:
    """Peak bytes of quantizing ``block``'s fused expert weights (``[experts, ., .]`` parameters,
    :mod:`optimum_bc.calibration.expert_calibration`) beyond the block's own tensors, 0 without any.

    The parameters are quantized one after the other; while one is, every expert of it accumulates its own Gram
    triangle (``experts x`` the dense layer's, for a weight method that reads its inputs; all alive until the last
    expert is solved) beside one expert's solve (:func:`group_calibration_bytes`), float32 copies of its experts'
    weights when the model is not float32, the uint8 codes of it and of the parameters done before, and one batch's
    routed inputs (``batch_tokens · experts_per_token`` rows). With bias compensation the float expert outputs of
    every calibration token are kept for the whole phase (``calibration_tokens · experts_per_token`` rows of each
    parameter's output width). An experts class declares its layout (``is_transposed``); without one the wider side
    is taken as the input (the larger Gram)."""
    first = 0
    codes = 0
    peak = 0
    for owner, attr in fused_expert_params(block).values():
        param = owner._parameters.get(attr)
        if param is None or param.dim() != 3:
            continue
        experts, rows, cols = param.shape
        flag = getattr(owner, "is_transposed", None)
        in_f, out_f = (rows, cols) if flag else (cols, rows)
        if flag is None:
            in_f, out_f = max(rows, cols), min(rows, cols)
        block_rows = min(GRAM_ROW_BLOCK, in_f)
        grams = experts * 4 * in_f * (in_f + block_rows) if batch_tokens else 0
        copies = 4 * experts * in_f * out_f if param.element_size() != 4 else 0
        inputs = 4 * batch_tokens * experts_per_token * in_f
        codes += experts * in_f * out_f
        peak = max(peak, grams + group_calibration_bytes(in_f, out_f) + copies + codes + inputs)
        if bias_compensation:
            first += 4 * calibration_tokens * experts_per_token * out_f
    return first + peak if peak else 0


def measures_float_residuals(config: BCQuantizationConfig, batches: int) -> bool:
    """Whether a block's end measures the float target's residuals, which needs the float32 dense weights of its
    Linears: ``bc_target="float"`` (or per-position BC), or "auto" choosing per block on held-out batches (with
    ``bc_layer``; the race and a single batch measure the sequential target only)."""
    if not config.bias_compensation:
        return False
    if config.bc_target != "auto" or config.bc_granularity != "channel":
        return config.bc_target == "float" or config.bc_granularity == "position"
    return bool(config.bc_layer) and batches >= FOLDS


def block_calibration_bytes(
    block: nn.Module,
    groups: list[list[str]],
    float_copy: bool,
    bits: int = 4,
    group_size: int = 128,
    shared_float_copy: bool = False,
    batch_tokens: int = 0,
    hidden_size: int = 0,
    attention_scores: int = 0,
    float_residuals: bool = True,
    calibration_tokens: int = 0,
    experts_per_token: int = 1,
) -> int:
    """Memory one offloaded block needs on its execution device while calibrated (the activation streams kept
    between blocks not included: ``streams.activation_bytes``).

    Calibration goes through the block's Linear groups in order; while group ``g`` is quantized the device holds the
    block's other tensors (norms), the float weights of ``g`` and the groups after it, the packed weights of the
    groups before it (offloaded calibration keeps no dense cache: ``transient_dense_weights``), and the largest of
    the working sets that never overlap (the estimate is the largest over the groups):

    * ``g``'s solve: its stacked float32 weights (``4 · out · in``), :func:`group_calibration_bytes` and the last
      batch's captured inputs (float32);
    * a forward pass on one batch of ``batch_tokens`` tokens: the temporary dense weight of its largest packed layer
      (:data:`DENSE_WEIGHT_BYTES_PER_WEIGHT`) and the activations (:func:`forward_elements`, ``hidden_size`` and
      ``attention_scores``); the first one (the layer-order pass, and with bias compensation the float pass) runs
      the whole float block and keeps every group's input;
    * accumulating ``g``'s statistics: the Gram triangle and two float32 copies of the batch's inputs (valid rows,
      a column slice);
    * with bias compensation, the float stream's streamed Linear.

    With bias compensation (``float_copy``) the float stream's copy of a block on disk streams its weights one module
    at a time (:meth:`OffloadedCalibration.float_copy`): the largest Linear's float weight. At the block's end, where
    the report's errors are measured, the device holds the packed block, the float32 dense weights of its quantized
    Linears when the float target's residuals are measured (``float_residuals``: ``bc_target="float"``, or "auto"
    choosing per block on held-out batches), float32 copies of one batch's kept float Linear outputs
    (:class:`~optimum_bc.calibration.bc_budget.FloatOutputs`, themselves on the activation store) and a layer's
    residual terms (:data:`RESIDUAL_BYTES_PER_OUTPUT`) beside the quantized pass's activations.
    ``shared_float_copy``: the copy shares the block's tensors instead (a block kept on the CPU and calibrated on a
    GPU), so every float weight stays until the block's end. ``batch_tokens=0`` leaves the per-batch terms out.
    A block with fused expert weights then quantizes them beside its packed Linears
    (:func:`expert_calibration_bytes`: ``calibration_tokens`` and ``experts_per_token`` size its kept outputs).

    Before loading the groups are not observed yet: Linears of ``groups`` under one parent module with the same
    input width are counted as one group (q/k/v, gate/up), which over-counts only a sibling that has its own input.
    """
    weights = sum(
        t.numel() * t.element_size() for _, t in named_module_tensors(block, include_buffers=True, recurse=True)
    )
    merged: dict[tuple[str, int], list[str]] = {}
    for name in (n for group in groups for n in group):
        key = (name.rpartition(".")[0], layer_features(block.get_submodule(name))[0])
        merged.setdefault(key, []).append(name)
    linears = [[block.get_submodule(name) for name in group] for group in merged.values()]
    numels = [[linear.weight.numel() for linear in group] for group in linears]
    size = next(block.parameters()).element_size()
    floats = [sum(n) * size for n in numels]
    packed = [sum(packed_bytes(n, bits, group_size) for n in group) for group in numels]
    rest = weights - sum(floats)
    largest = max((n for group in numels for n in group), default=0)
    streamed = largest * size if float_copy else 0
    inputs = [layer_features(group[0])[0] for group in linears]
    outputs = sum(layer_features(linear)[1] for group in linears for linear in group)
    widest_out = max((layer_features(linear)[1] for group in linears for linear in group), default=0)
    widest_in = max(inputs, default=0)
    tokens, hidden = (batch_tokens, hidden_size or widest_in) if batch_tokens else (0, 0)
    forward = tokens * size * forward_elements(hidden, widest_in, attention_scores) if tokens else 0
    # The first pass keeps every group's input until its end (the widest is the MLP's product, already counted).
    first_pass = forward + tokens * size * (sum(inputs) - widest_in)
    need = 0
    for g, group in enumerate(linears):
        in_features = inputs[g]
        stacked = sum(layer_features(linear)[1] for linear in group)
        solve = 4 * stacked * in_features + group_calibration_bytes(in_features, stacked) + 4 * tokens * in_features
        dense = DENSE_WEIGHT_BYTES_PER_WEIGHT * max((n for group in numels[:g] for n in group), default=0)
        block_rows = min(GRAM_ROW_BLOCK, in_features)
        gram = 4 * in_features * (in_features + block_rows) + 8 * tokens * in_features
        passes = max(dense + forward, streamed + first_pass if g == 0 else 0)
        held = sum(floats) if float_copy and shared_float_copy else sum(floats[g:])
        need = max(need, rest + held + sum(packed[:g]) + max(solve, gram, passes, streamed))
    experts = expert_calibration_bytes(block, float_copy, batch_tokens, calibration_tokens, experts_per_token)
    if experts:
        # Loaded whole from the offload store, the expert weights' mapped pages stay resident beside the loaded
        # copy while the block is calibrated on the CPU (measured on Mixtral blocks: file-backed resident memory
        # +46 MiB for 48 MiB of expert weights); a GPU holds the copy only.
        mapped = 0 if shared_float_copy else rest
        need = max(need, rest + mapped + sum(packed) + experts)
    if float_copy:
        held = sum(floats) if shared_float_copy else 0
        end = rest + held + sum(packed) + (4 * sum(sum(n) for n in numels) if float_residuals else 0)
        residuals = tokens * (
            size * (2 * hidden + 2 * widest_in) + 4 * outputs + RESIDUAL_BYTES_PER_OUTPUT * widest_out
        )
        # No float block runs here (the report pairs the kept float outputs): the largest dense weight's transient.
        need = max(need, end + DENSE_WEIGHT_BYTES_PER_WEIGHT * largest + residuals)
    else:
        end = rest + sum(packed) + DENSE_WEIGHT_BYTES_PER_WEIGHT * largest + forward
        need = max(need, end)
    return need


def execution_device(max_memory: Mapping[Device, int]) -> Device:
    """The device a ``max_memory`` calibrates on: its first accelerator with a budget, else the CPU."""
    devices = [d for d in max_memory if d not in ("cpu", "disk") and max_memory[d] > 0]
    return devices[0] if devices else "cpu"


def check_max_memory(max_memory: Mapping[Device, int], needed: int) -> None:
    """Raise if the execution device's budget in ``max_memory`` cannot hold one block during calibration."""
    device = execution_device(max_memory)
    budget = max_memory.get(device, 0)
    if budget < needed:
        raise ValueError(
            f"max_memory[{device!r}] = {budget / 2**20:.1f} MiB is too small to calibrate even one decoder block: "
            f"one block needs about {needed / 2**20:.1f} MiB on its execution device (its weights, the in×in "
            "statistics and float32 weights of its largest Linear group, a streamed float Linear for bias "
            "compensation, and on the CPU the calibration activations). Fix: raise "
            f"max_memory[{device!r}] to at least {-(-needed // 2**20)}MiB."
        )


def reserve_calibration_memory(
    max_memory: Mapping[Device, int], streamed: int, shared: int, activations: int, block_weights: int
) -> dict[Device, int]:
    """Check ``max_memory`` can calibrate one block, and return the budgets Accelerate places the modules with.

    ``streamed`` / ``shared``: one block's need (:func:`block_calibration_bytes`) when its float copy streams from
    disk (the CPU calibrates the blocks of a CPU / disk map) or shares its tensors (a GPU calibrates blocks kept on
    the CPU); ``activations``: the calibration streams (``streams.activation_bytes``), counted on the CPU, where they
    live (a GPU keeps them only when they fit, see ``offload_activations``). The execution device's budget is
    lowered by what calibration needs beyond the block's weights (``block_weights``, the largest block: Accelerate
    keeps room for the largest layer itself), so that the modules placed there and the block being calibrated fit
    in the budget together.
    """
    device = execution_device(max_memory)
    needed = streamed + activations if device == "cpu" else shared
    check_max_memory(max_memory, needed)
    budgets = dict(max_memory)
    budgets[device] = max_memory[device] - max(0, needed - block_weights)
    return budgets
