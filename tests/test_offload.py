"""Quantizing a model dispatched by Accelerate (blocks on "cpu" and "disk") equals quantizing it in memory."""

from pathlib import Path

import pytest
import torch
from accelerate.hooks import AlignDevicesHook
from accelerate.utils import named_module_tensors
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from optimum_bc import BCQuantizationConfig, QuantLinear
from optimum_bc.calibration.bc_budget import calibration_activation_bytes
from optimum_bc.calibration.memory import (
    block_calibration_bytes,
    forward_shape,
    measures_float_residuals,
    reserve_calibration_memory,
)
from optimum_bc.calibration.offload import (
    OffloadedCalibration,
    check_device_map,
    check_offload_folder,
    device_for,
    float_copy,
    shared_float_copy,
)
from optimum_bc.calibration.streams import activation_bytes, activation_streams

from .conftest import VOCAB, tiny_llama, tiny_opt


DEVICE_MAPS = {
    "llama": {
        "model.embed_tokens": "disk",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "disk",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    },
    "opt": {
        "model.decoder.embed_tokens": "cpu",
        "model.decoder.embed_positions": "disk",
        "model.decoder.final_layer_norm": "disk",
        "model.decoder.layers.0": "disk",
        "model.decoder.layers.1": "cpu",
        "lm_head": "cpu",
    },
}


def _cfg(ids: torch.Tensor, **kw: object) -> BCQuantizationConfig:
    base = {"bits": 3, "group_size": 32, "dataset": ids, "num_samples": 16, "seq_len": 32, "batch_size": 4}
    base.update(kw)
    return BCQuantizationConfig(**base)


def _block_need(
    model: torch.nn.Module, block: torch.nn.Module, linears: list, cfg: BCQuantizationConfig, ids: torch.Tensor
) -> int:
    """The pre-check's need for one block with ``cfg`` (one batch's forward activations included)."""
    calibration = [{"input_ids": row} for row in ids]
    batches = -(-len(calibration) // cfg.batch_size)
    return block_calibration_bytes(
        block,
        linears,
        cfg.bias_compensation,
        bits=cfg.bits,
        group_size=cfg.group_size,
        float_residuals=measures_float_residuals(cfg, batches),
        **forward_shape(model.config, calibration, cfg.batch_size),
    )


def _saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return tensors


@pytest.fixture(params=["llama", "opt"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    model = tiny_llama() if request.param == "llama" else tiny_opt()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path


def test_cpu_disk_device_map_same_packed_weights_and_logits(family, calib_ids, tmp_path) -> None:
    name, path = family
    options = {"method": "gptq", "bc_layer": True, "desc_act": name == "llama"}
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    ref = AutoModelForCausalLM.from_pretrained(path, quantization_config=_cfg(calib_ids, **options))
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=_cfg(calib_ids, **options),
        device_map=DEVICE_MAPS[name],
        offload_folder=str(tmp_path / "offload"),
    )
    assert model.hf_device_map == DEVICE_MAPS[name]
    assert [r.mse_after for r in model.quantization_report.layers] == [
        r.mse_after for r in ref.quantization_report.layers
    ]
    # Disk blocks keep their packed weights in the offload store, not in memory, behind a fresh offloading hook.
    for module_name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            hook = module._hf_hook
            assert isinstance(hook, AlignDevicesHook)
            on_disk = device_for(model.hf_device_map, module_name) == "disk"
            assert hook.offload is on_disk
            assert (module.qweight.device.type == "meta") is on_disk
            if on_disk:
                assert module._cached_weight is None
                for tensor_name, _ in named_module_tensors(module, include_buffers=True):
                    assert hook.weights_map[tensor_name].device.type == "cpu"
    assert torch.equal(model(x).logits, ref(x).logits)
    for module_name, module in model.named_modules():
        if isinstance(module, QuantLinear) and device_for(model.hf_device_map, module_name) == "disk":
            assert module._cached_weight is None and module.qweight.device.type == "meta"  # nothing left resident
    assert torch.equal(
        model.generate(x[:1, :6], max_new_tokens=6, do_sample=False),
        ref.generate(x[:1, :6], max_new_tokens=6, do_sample=False),
    )
    model.save_pretrained(tmp_path / "offloaded", max_shard_size="100KB")
    ref.save_pretrained(tmp_path / "memory")
    saved, expected = _saved_tensors(tmp_path / "offloaded"), _saved_tensors(tmp_path / "memory")
    # transformers cannot see the embedding tie through meta tensors, so the offloaded save may repeat lm_head.
    assert set(saved) - set(expected) <= {"lm_head.weight"} and set(expected) <= set(saved)
    if "lm_head.weight" in saved and "lm_head.weight" not in expected:
        assert torch.equal(saved["lm_head.weight"], ref.get_input_embeddings().weight)
    assert any(k.endswith("qweight") for k in saved)
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), key
    assert len(list((tmp_path / "offloaded").glob("*.safetensors"))) > 1  # streamed shard by shard


def test_reload_with_disk_device_map_identical_logits(family, calib_ids, tmp_path) -> None:
    name, path = family
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    ref = AutoModelForCausalLM.from_pretrained(path, quantization_config=_cfg(calib_ids, bc_layer=True))
    ref.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "q", device_map=DEVICE_MAPS[name], offload_folder=str(tmp_path / "offload")
    )
    assert "disk" in reloaded.hf_device_map.values()
    assert torch.equal(reloaded(x).logits, ref(x).logits)


def test_auto_device_map_with_small_max_memory_goes_to_disk_and_matches(calib_ids, tmp_path) -> None:
    # A narrow MLP: the tiny model's default one needs more memory to calibrate a block (its down_proj's float64
    # in×in statistics) than the whole model holds, so nothing would go to disk.
    # Five blocks, so that a budget holding one block's calibration (0.5 MiB with the activations, which the
    # placement keeps free) leaves most of them for the disk.
    config = tiny_llama(intermediate_size=64).config
    config.num_hidden_layers = 5
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "float")
    cfg = {"bias_compensation": False}  # the tiny model is smaller than a block's BC working set
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=_cfg(calib_ids, **cfg))
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float",
        quantization_config=_cfg(calib_ids, **cfg),
        device_map="auto",
        max_memory={"cpu": "700KB"},
        offload_folder=str(tmp_path / "offload"),
    )
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    x = torch.randint(0, VOCAB, (2, 20))
    assert torch.equal(model(x).logits, ref(x).logits)


def test_smallest_accepted_max_memory_puts_embeddings_and_lm_head_on_disk_and_matches(calib_ids, tmp_path) -> None:
    """A CPU budget just above one block's calibration need: the placement keeps that need free, so nothing else
    fits on the CPU (embeddings, blocks, norm and the tied LM head all go to disk) and the result equals quantizing
    in memory (packed weights, logits)."""
    config = tiny_llama(intermediate_size=64).config
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    float_model = LlamaForCausalLM(config)
    float_model.save_pretrained(tmp_path / "float")
    cfg = _cfg(calib_ids, bias_compensation=False)
    block = float_model.model.layers[0]
    linears = [[name] for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    activations = activation_bytes(calib_ids.numel(), config.hidden_size, torch.float32, activation_streams(cfg))
    needed = _block_need(float_model, block, linears, cfg, calib_ids) + activations
    ref = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=_cfg(calib_ids, bias_compensation=False)
    )
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float",
        quantization_config=cfg,
        device_map="auto",
        max_memory={"cpu": needed + 1024},
        offload_folder=str(tmp_path / "offload"),
    )
    assert set(model.hf_device_map.values()) == {"disk"}
    assert device_for(model.hf_device_map, "model.embed_tokens") == "disk"
    assert device_for(model.hf_device_map, "lm_head") == "disk"
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_placement_budget_keeps_the_calibration_working_set_free() -> None:
    # The CPU calibrates (streamed float copy, activations counted): 1000 - (600 + 100 - 200) for the placement.
    assert reserve_calibration_memory({"cpu": 1000, "disk": 0}, 600, 900, 100, 200) == {"cpu": 500, "disk": 0}
    # GPU 0 calibrates blocks kept on the CPU (shared float copy; activations follow offload_activations).
    assert reserve_calibration_memory({0: 2000, "cpu": 5000}, 600, 900, 100, 200) == {0: 1300, "cpu": 5000}
    with pytest.raises(ValueError, match=r"max_memory\['cpu'\] .* too small .* at least 1MiB"):
        reserve_calibration_memory({"cpu": 699}, 600, 900, 100, 200)


def test_max_memory_smaller_than_one_block_fails_before_loading(calib_ids, tmp_path) -> None:
    model = tiny_llama()
    model.save_pretrained(tmp_path / "float")
    block = model.model.layers[0]
    linears = [[name] for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    config = _cfg(calib_ids)
    # float, and one quantized stream per candidate of bc_target="auto"'s race (none, float+sink, seq, seq+sink)
    streams = activation_streams(config)
    assert streams == 5
    outputs = sum(block.get_submodule(n[0]).out_features for n in linears)
    activations = calibration_activation_bytes(
        config, calib_ids.numel(), model.config.hidden_size, outputs, torch.float32
    )
    needed = _block_need(model, block, linears, config, calib_ids) + activations
    with pytest.raises(
        ValueError, match=r"too small to calibrate even one decoder block: one block needs about"
    ) as err:
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "float",
            quantization_config=config,
            device_map="auto",
            max_memory={"cpu": needed - 1024},
            offload_folder=str(tmp_path / "offload"),
        )
    assert f"needs about {needed / 2**20:.1f} MiB" in str(err.value)
    assert f"at least {-(-needed // 2**20)}MiB" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda:0", 3, "npu:1"])
def test_device_map_naming_missing_device_fails_before_loading(calib_ids, tmp_path, device) -> None:
    tiny_llama().save_pretrained(tmp_path / "float")
    device_map = dict(DEVICE_MAPS["llama"], **{"model.layers.1": device})
    with pytest.raises(ValueError, match=r"device_map names .* Fix"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "float", quantization_config=_cfg(calib_ids), device_map=device_map
        )
    check_device_map({"a": "cpu", "b": "disk"})  # real placements pass


def test_disk_map_without_offload_folder_fails_before_calibration(calib_ids, tmp_path, monkeypatch) -> None:
    tiny_llama().save_pretrained(tmp_path / "float")
    calibrated = []
    monkeypatch.setattr("optimum_bc.calibration.calibrator.BlockCalibrator.run", lambda *a: calibrated.append(1))
    with pytest.raises(ValueError, match=r"no offload_folder was given.*Fix: pass offload_folder"):
        AutoModelForCausalLM.from_pretrained(
            tmp_path / "float", quantization_config=_cfg(calib_ids), device_map=DEVICE_MAPS["llama"]
        )
    assert calibrated == []


def test_unwritable_offload_folder_is_named(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"offload_folder .*a_file.* is not writable"):
        check_offload_folder(str(blocker / "offload"), {"model.layers.0": "disk"})
    check_offload_folder(str(tmp_path / "fine"), {"model.layers.0": "disk"})
    assert (tmp_path / "fine").is_dir() and not list((tmp_path / "fine").iterdir())


def test_activation_store_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    from optimum_bc.calibration import streams as calibration

    gpu = torch.device("cuda:0")
    monkeypatch.setattr(calibration, "free_memory", lambda device: 1000)
    assert calibration.activation_store(None, gpu, 501) == torch.device("cpu")  # more than half the free memory
    assert calibration.activation_store(None, gpu, 500) is None
    assert calibration.activation_store(True, gpu, 1) == torch.device("cpu")
    assert calibration.activation_store(False, gpu, 10**12) is None
    assert calibration.activation_store(True, torch.device("cpu"), 10**12) is None  # CPU blocks: nothing to offload
    monkeypatch.setattr(calibration, "free_memory", lambda device: None)
    assert calibration.activation_store(None, gpu, 10**12) is None  # unknown free memory: keep the default
    # 2 streams x (inputs + outputs) x 8 x 128 tokens x 64 channels x 2 bytes
    assert calibration.activation_bytes(8 * 128, 64, torch.float16, 2) == 2 * 2 * 8 * 128 * 64 * 2


def test_batch_to_keeps_hidden_states_on_the_store() -> None:
    from optimum_bc.calibration.block_inputs import _Batch

    batch = _Batch(torch.randn(2, 3, 4), {"mask": torch.ones(2, 3)}, torch.ones(2, 3, dtype=torch.bool))
    moved = batch.to(torch.device("cpu"), torch.device("meta"))
    assert moved.hidden.device.type == "meta"
    assert moved.kwargs["mask"].device.type == "cpu" and moved.valid.device.type == "cpu"
    assert batch.to(torch.device("cpu")) is batch


@pytest.mark.parametrize("value", ["yes", 1])
def test_offload_activations_config_rejects_bad_values(value: object) -> None:
    with pytest.raises(ValueError, match="offload_activations="):
        BCQuantizationConfig(offload_activations=value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_activations_on_gpu_give_the_same_model(calib_ids, monkeypatch: pytest.MonkeyPatch) -> None:
    from optimum_bc import quantize_model
    from optimum_bc.calibration import streams as calibration

    stores = []
    original = calibration.BlockCalibrator.quantize_block

    def spy(self, index, block, h_q, h_fp):  # noqa: ANN001, ANN202
        next_q, next_fp = original(self, index, block, h_q, h_fp)
        stores.append({b.hidden.device.type for b in next_q + (next_fp or [])})
        return next_q, next_fp

    monkeypatch.setattr(calibration.BlockCalibrator, "quantize_block", spy)
    logits = {}
    for offload in (False, True):
        model = tiny_llama().cuda()
        quantize_model(model, _cfg(calib_ids, offload_activations=offload))
        logits[offload] = model(calib_ids[:2].cuda()).logits
    assert stores[:2] == [{"cuda"}, {"cuda"}] and stores[2:] == [{"cpu"}, {"cpu"}]
    torch.testing.assert_close(logits[True], logits[False])


def test_float_copy_shares_or_streams_the_block_weights(tmp_path) -> None:
    """BC's float copy costs no weight memory: it shares a resident block's tensors, and for a block on disk holds
    only meta tensors and loads each module's weights from the offload store for its forward (same outputs)."""
    tiny_llama().save_pretrained(tmp_path / "float")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", device_map=DEVICE_MAPS["llama"], offload_folder=str(tmp_path / "offload")
    )
    placement = OffloadedCalibration(model)
    blocks = model.model.layers
    placement.onload(blocks[0], "model.layers.0.")
    shared = placement.float_copy(blocks[0], "model.layers.0.")
    assert shared is not blocks[0]
    assert [p.data_ptr() for p in shared.parameters()] == [p.data_ptr() for p in blocks[0].parameters()]
    assert shared_float_copy(blocks[0]).mlp.down_proj is not blocks[0].mlp.down_proj
    placement.onload(blocks[1], "model.layers.1.")
    streamed = placement.float_copy(blocks[1], "model.layers.1.")
    assert all(p.device.type == "meta" for p in streamed.parameters())
    x = torch.randn(2, 5, ref.config.hidden_size)
    pos = torch.arange(5).expand(2, 5)
    emb = ref.model.rotary_emb(x, pos)
    with torch.no_grad():
        expected = ref.model.layers[1](x, position_embeddings=emb)
        got = streamed(x, position_embeddings=emb)
    expected = expected[0] if isinstance(expected, tuple) else expected
    got = got[0] if isinstance(got, tuple) else got
    assert torch.equal(got, expected)
    assert all(p.device.type == "meta" for p in streamed.parameters()), "weights are dropped after the forward"
    assert float_copy(blocks[0], None, "model.layers.0.").mlp.up_proj.weight is blocks[0].mlp.up_proj.weight
