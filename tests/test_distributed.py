"""Data-parallel calibration on 2 gloo processes equals one process on the same windows; bad inputs fail on all ranks.

The workers set the environment variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR...), so the process group is
created by optimum-bc itself, exactly as under ``torchrun --nproc-per-node 2``.
"""

import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc import distributed as dp
from optimum_bc.calibration import bc_budget

from .conftest import VOCAB, tiny_llama


WORLD = 2
# Every tensor (codes, scales, biases, sink biases) is bit-identical: both runs add the same float32 batch sums in
# float64 (in another order) and round once (see optimum_bc.distributed). Only a float64 difference straddling a
# float32 rounding boundary could make a bias differ by 1 ulp; these models have none (measured: 0 differences).


def _windows() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


def _config(method: str, **kwargs: Any) -> BCQuantizationConfig:
    options = {"bits": 3, "group_size": 32, "num_samples": 8, "seq_len": 32} | kwargs
    return BCQuantizationConfig(method=method, dataset=_windows(), **options)


# As tests/test_offload.py: block 1, the (tied) embeddings and LM head on disk; calibration onloads each in turn.
OFFLOADED = {
    "model.embed_tokens": "disk",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "disk",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}
#: name -> (config options, device map of a from_pretrained load; None: quantize_model on a loaded model). "budget":
#: BC's token budget for the run (4 batches of 64 tokens: GPTQ's 192 splits them 2 + 1 over the ranks; RTN's 64
#: leaves rank 1 none, and RTN + BC runs on the budget batches alone).
RUNS = {
    "rtn_bc_sink": ({"method": "rtn", "bc_sink_tokens": 1}, None),
    "gptq_bc_budget": ({"method": "gptq", "bc_sink_tokens": 1, "batch_size": 2, "budget": 192}, None),
    "rtn_bc_budget": ({"method": "rtn", "bc_sink_tokens": 1, "batch_size": 2, "budget": 64}, None),
    "gptq_bc_layer_sink": ({"method": "gptq", "bc_sink_tokens": 1, "bc_layer": True, "batch_size": 2}, {"": "cpu"}),
    "gptq_bc_disk_offload": ({"method": "gptq", "bc_sink_tokens": 1}, OFFLOADED),
    # Static activation scales: the observers merge every rank's values before fitting (exact at this size).
    "gptq_w8a8_mse": ({"method": "gptq", "bc_sink_tokens": 1, "act_bits": 8, "act_scale": "mse"}, None),
    "rtn_w4a6_percentile": (
        {"method": "rtn", "bits": 4, "bc_sink_tokens": 1, "act_bits": 6, "act_scale": "percentile"},
        None,
    ),
}


def _quantized(name: str, float_dir: str) -> tuple[torch.nn.Module, int]:
    options, device_map = RUNS[name]
    options = dict(options)
    budget = options.pop("budget", bc_budget.BC_TOKENS)
    config = _config(**options)
    if device_map is None:
        model = tiny_llama()
        default, bc_budget.BC_TOKENS = bc_budget.BC_TOKENS, budget
        try:
            quantize_model(model, config)
        finally:
            bc_budget.BC_TOKENS = default
        assert model.quantization_report.bc_tokens == min(budget, 8 * 32)
        return model, model.quantization_report.calibration_tokens
    model = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=config, device_map=device_map, offload_folder=tempfile.mkdtemp()
    )
    return model, model.quantization_report.calibration_tokens


def _choices(model: torch.nn.Module) -> list[tuple[str | None, dict[str, float]]]:
    """bc_target="auto" (the default): each block's chosen mode and held-out candidate scores."""
    return [(b.bc_choice, b.bc_scores) for b in model.quantization_report.blocks]


def _in_memory(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor] | None:
    """The state dict (None when part of the model lives on disk: compare the saved checkpoints then)."""
    if "disk" in (RUNS[name][1] or {}).values():
        return None
    return {k: v.clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out: str, float_dir: str) -> None:
    """One rank: the runs of RUNS, then the bad inputs; results and error messages go to ``out/rank{r}.pt``."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    result: dict[str, Any] = {}
    try:
        for name in RUNS:
            model, tokens = _quantized(name, float_dir)
            model.save_pretrained(Path(out) / f"{name}_saved_by_rank{rank}")
            result[name] = (_in_memory(model, name), tokens, _choices(model))
        for name, config in (
            ("mismatch", _config("rtn", bits=4 if rank == 0 else 3)),
            ("too_few", _config("rtn", num_samples=1)),
        ):
            try:
                quantize_model(tiny_llama(), config)
                result[name] = None
            except ValueError as err:
                result[name] = str(err)
        result["subsampled_scales"] = _subsampled_scales()
        try:
            dp.check_agree(["q_proj", "k_proj"][: 2 - rank], "layer layout of block 0")
            result["disagree"] = None
        except ValueError as err:
            result["disagree"] = str(err)
        try:
            dp.run_on_main(_disk_full, "save 'folder'")
            result["save_failed"] = None
        except (OSError, RuntimeError) as err:
            result["save_failed"] = f"{type(err).__name__}: {err}"
        result["world"] = dist.get_world_size()
        torch.save(result, Path(out) / f"rank{rank}.pt")
        _die_during_calibration(rank, out, result)
    except Exception:  # noqa: BLE001 - reported by the test, not lost in a child's stderr
        result["crash"] = traceback.format_exc()
    finally:
        torch.save(result, Path(out) / f"rank{rank}.pt")
        if dist.is_initialized():
            dist.destroy_process_group()


def _subsampled_scales() -> dict[str, torch.Tensor]:
    """Static MSE scales fitted from subsamples (SAMPLE_SIZE shrunk below one batch's values): the input scales."""
    from optimum_bc.formats import activations

    size = activations.SAMPLE_SIZE
    activations.SAMPLE_SIZE = 128
    try:
        model = tiny_llama()
        quantize_model(model, _config("rtn", act_bits=8, act_scale="mse"))
    finally:
        activations.SAMPLE_SIZE = size
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("input_scale", "input_zero"))}


def _disk_full() -> None:
    raise OSError("disk full")


def _die_during_calibration(rank: int, out: str, result: dict[str, Any]) -> None:
    """Rank 1 dies at its first bias-compensation sum; rank 0 must raise, and write no checkpoint."""
    if rank == 1:
        from optimum_bc.algorithms.compensation import InputMoments

        InputMoments.reduce = lambda self: os._exit(3)
    try:
        model, _ = _quantized("rtn_bc_sink", "")
        model.save_pretrained(Path(out) / "after_dead_rank")
        result["dead"] = None
    except RuntimeError as err:
        result["dead"] = str(err)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]], str]:
    out = tmp_path_factory.mktemp("dp")
    float_dir = tmp_path_factory.mktemp("float")
    tiny_llama().save_pretrained(float_dir)
    context = mp.spawn(_worker, args=(_free_port(), str(out), str(float_dir)), nprocs=WORLD, join=False)
    for process in context.processes:  # not mp.spawn's join: it would kill rank 0 as soon as rank 1 dies
        process.join(timeout=240)
    assert [p.exitcode for p in context.processes] == [0, 3]
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, result in enumerate(results):
        assert "crash" not in result, f"rank {r} crashed:\n{result['crash']}"
    return out, results, str(float_dir)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_equal_one_process(spawned, name) -> None:
    out, results, float_dir = spawned
    assert all(r["world"] == WORLD for r in results)
    reference, tokens = _quantized(name, float_dir)
    single = _in_memory(reference, name)
    for rank, result in enumerate(results):
        state, rank_tokens, choices = result[name]
        assert rank_tokens == tokens == 8 * 32  # the report's sum covers every window, on every rank
        # auto: every rank splits the folds by global batch index and sums the held-out scores, so it chooses as
        # one process does, from the same scores (float64 sums added in another order).
        expected = _choices(reference)
        assert all(mode is not None and scores for mode, scores in expected)
        assert [mode for mode, _ in choices] == [mode for mode, _ in expected]
        for (_, ours), (_, theirs) in zip(choices, expected, strict=True):
            assert ours.keys() == theirs.keys()
            assert all(ours[m] == pytest.approx(theirs[m], rel=1e-6) for m in ours)
        if single is None:
            continue
        assert state.keys() == single.keys()
        assert any(k.endswith("qweight") for k in single) and any(k.endswith("sink_bias") for k in single)
        for key in single:
            assert torch.equal(state[key], single[key]), f"rank {rank}: {key} differs from one process"
    # Only rank 0 writes; its folder reloads to the in-memory model.
    assert not (out / f"{name}_saved_by_rank1").exists()
    saved = out / f"{name}_saved_by_rank0"
    assert (saved / "model.safetensors").is_file()
    reference.save_pretrained(out / f"{name}_one_process")
    ours, theirs = load_file(saved / "model.safetensors"), load_file(out / f"{name}_one_process/model.safetensors")
    assert ours.keys() == theirs.keys() and any(k.endswith("sink_bias") for k in ours)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), f"saved {key} differs from one process"
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_mismatched_config_fails_on_every_rank(spawned) -> None:
    _, results, _ = spawned
    for result in results:
        assert result["mismatch"] is not None
        assert "ranks [1] have another quantization config than rank 0" in result["mismatch"]
        assert "calibration data" not in result["mismatch"]


def test_more_ranks_than_windows_fails_on_every_rank(spawned) -> None:
    _, results, _ = spawned
    for result in results:
        assert result["too_few"] is not None
        assert "2 processes but only 1 calibration windows in 1 batches" in result["too_few"]
        assert "num_samples >= 2" in result["too_few"]


def test_subsampled_static_scales_agree_between_ranks(spawned) -> None:
    """Beyond the exact regime the ranks merge proportional samples with one seed: every rank fits the same scales,
    within the range one process observes."""
    _, results, _ = spawned
    ours, theirs = results[0]["subsampled_scales"], results[1]["subsampled_scales"]
    assert ours.keys() == theirs.keys() and any(k.endswith("input_scale") for k in ours)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert all(torch.isfinite(v).all() and (v > 0).all() for k, v in ours.items() if k.endswith("input_scale"))


def test_layouts_that_differ_between_ranks_fail_on_every_rank(spawned) -> None:
    _, results, _ = spawned
    for result in results:
        assert result["disagree"] is not None
        assert "ranks [1] found another layer layout of block 0 than rank 0" in result["disagree"]


def test_failed_save_on_rank_0_fails_every_rank(spawned) -> None:
    _, results, _ = spawned
    assert results[0]["save_failed"] == "OSError: disk full"
    assert (
        results[1]["save_failed"]
        == "RuntimeError: optimum-bc: rank 0 failed to save 'folder' (OSError: disk full); this rank wrote nothing"
    )


def test_dead_rank_fails_the_others_without_checkpoint(spawned) -> None:
    out, results, _ = spawned
    assert "crash" not in results[0]
    message = results[0]["dead"]
    assert message is not None and "another rank stopped" in message and "Nothing was saved" in message
    assert not (out / "after_dead_rank").exists()


def test_shard_is_contiguous_and_covers_every_window() -> None:
    windows = list(range(7))
    assert dp.shard(windows) == windows  # one process: everything
    assert dp.shard_range(7) == range(0, 7)
    assert dp.fingerprint({"a": torch.arange(3)}) == dp.fingerprint({"a": torch.arange(3)})
    assert dp.fingerprint({"a": torch.arange(3)}) != dp.fingerprint({"a": torch.arange(4)})
