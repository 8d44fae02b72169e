"""Plain PEFT on BC models: stock ``peft`` / transformers adapters wrap the packed layers, the packed base stays frozen."""

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.version import Version
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from optimum_bc import BCQuantizationConfig, MXLinear, QuantLinear, quantize_model
from optimum_bc.layers import kernels
from optimum_bc.layers.packed_base import PackedLinearBase


peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training  # noqa: E402
from peft import get_peft_model as peft_get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as LoraLinear  # noqa: E402

from optimum_bc.integrations.peft import (  # noqa: E402
    TRAIN_BIAS_MIN_PEFT,
    checkpoint_positions,
    get_peft_model,
    merge_and_unload,
    trainable_summary,
)

from .conftest import VOCAB, tiny_llama, tiny_opt  # noqa: E402


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_lora.py"
PACKED = ("qweight", "qzeros", "scales", "g_idx", "bias", "sink_bias", "position_bias")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved BC checkpoint (4-bit RTN + BC, one sink token) of the tiny LLaMA; every test reloads it fresh."""
    src = tmp_path_factory.mktemp("float")
    tiny_llama().save_pretrained(src)
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = BCQuantizationConfig(bits=4, group_size=32, method="rtn", dataset=ids, num_samples=8, seq_len=32)
    out = tmp_path_factory.mktemp("bc")
    AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg).save_pretrained(out)
    return out


def _in_memory(family: str, **options: Any) -> torch.nn.Module:
    model = tiny_llama() if family == "llama" else tiny_opt()
    grid = {} if "format" in options else {"bits": 4, "group_size": 32}
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    quantize_model(
        model, BCQuantizationConfig(method="rtn", dataset=ids, num_samples=8, seq_len=32, **grid, **options)
    )
    return model


def _packed_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of every packed layer (codes, zeros, scales, g_idx, BC biases), cloned, by layer path."""
    return {
        f"{name.removeprefix('base_model.model.').replace('.base_layer', '')}.{key}": tensor.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, PackedLinearBase)
        for key, tensor in module.state_dict().items()
        if key in PACKED
    }


def _steps(model: torch.nn.Module, n: int = 4, lr: float = 1e-2) -> list[float]:
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(n):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def test_quantizer_is_trainable_but_a_bare_quantized_model_needs_adapters(bc_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(bc_dir)
    assert model.hf_quantizer.is_trainable is True
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))


@pytest.mark.parametrize(
    ("family", "options", "layer_type"),
    [("llama", {}, QuantLinear), ("opt", {}, QuantLinear), ("llama", {"format": "mxfp4"}, MXLinear)],
)
def test_plain_peft_all_linear_wraps_every_packed_layer(
    family: str, options: dict[str, Any], layer_type: type
) -> None:
    model = _in_memory(family, **options)
    x = torch.randint(0, VOCAB, (2, 12))
    before = _logits(model, x)
    packed = _packed_state(model)
    peft_model = peft_get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    wrapped = {n: m for n, m in peft_model.named_modules() if isinstance(m, LoraLinear)}
    assert len(wrapped) == (14 if family == "llama" else 12)
    assert all(type(m.get_base_layer()) is layer_type for m in wrapped.values())
    assert "lm_head" not in " ".join(wrapped)  # PEFT's all-linear skips the output embedding
    torch.testing.assert_close(_logits(peft_model, x), before, rtol=0, atol=0)  # lora_B starts at zero
    counts = trainable_summary(peft_model)
    assert counts["lora"] > 0 and counts["bias"] == 0 and counts["other"] == 0
    losses = _steps(peft_model, n=4)
    assert losses[-1] < losses[0] - 0.05
    after = _packed_state(peft_model)
    assert after.keys() == packed.keys() and all(torch.equal(after[k], packed[k]) for k in packed)


def test_reloaded_model_trains_base_frozen_and_adapter_round_trips(bc_dir: Path, tmp_path: Path) -> None:
    peft_model = peft_get_peft_model(AutoModelForCausalLM.from_pretrained(bc_dir), LoraConfig(r=4, lora_alpha=8))
    # target_modules=None: PEFT's per-architecture default (LLaMA: q_proj, v_proj), matched on the packed layers.
    assert len([m for m in peft_model.modules() if isinstance(m, LoraLinear)]) == 4
    peft_model = peft_get_peft_model(
        AutoModelForCausalLM.from_pretrained(bc_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    packed = _packed_state(peft_model)
    assert any(k.endswith(".sink_bias") for k in packed) and any(k.endswith(".g_idx") for k in packed)
    lora_b = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_B" in k}
    losses = _steps(peft_model, n=4, lr=0.05)
    assert losses[-1] < losses[0] - 0.05
    after = _packed_state(peft_model)
    assert after.keys() == packed.keys() and all(torch.equal(after[k], packed[k]) for k in packed)
    assert all(not torch.equal(v, peft_model.state_dict()[k]) for k, v in lora_b.items())

    peft_model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys) == 28 and all("lora_" in k for k in keys)  # adapters only, no packed weights
    x = torch.randint(0, VOCAB, (2, 16))
    expected = _logits(peft_model, x)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bc_dir), str(tmp_path))
    torch.testing.assert_close(_logits(reloaded, x), expected, rtol=0, atol=1e-6)
    assert trainable_summary(reloaded) == {"lora": 0, "bias": 0, "other": 0}  # loaded for inference


def test_transformers_add_adapter_and_load_adapter(bc_dir: Path, tmp_path: Path) -> None:
    from transformers.integrations.peft import MIN_PEFT_VERSION

    if Version(peft.__version__) < Version(MIN_PEFT_VERSION):
        pytest.skip(f"transformers' add_adapter/load_adapter need peft>={MIN_PEFT_VERSION}, have {peft.__version__}")
    model = AutoModelForCausalLM.from_pretrained(bc_dir)
    model.add_adapter(LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 14
    x = torch.randint(0, VOCAB, (2, 16))
    expected = _logits(model, x)
    assert (expected - _logits(AutoModelForCausalLM.from_pretrained(bc_dir), x)).abs().max() > 1e-3
    model.save_pretrained(tmp_path)  # an adapter-only save
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "model.safetensors").exists()

    fresh = AutoModelForCausalLM.from_pretrained(bc_dir)
    fresh.load_adapter(str(tmp_path))
    torch.testing.assert_close(_logits(fresh, x), expected, rtol=0, atol=1e-6)


def test_lora_on_the_float_lm_head_next_to_packed_layers(bc_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(bc_dir)
    peft_model = peft_get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    head = peft_model.get_base_model().lm_head
    assert isinstance(head, LoraLinear) and type(head.get_base_layer()) is torch.nn.Linear
    assert type(peft_model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()) is QuantLinear
    head_b = head.lora_B["default"].weight.detach().clone()
    losses = _steps(peft_model, n=4)
    assert losses[-1] < losses[0] - 0.05
    assert not torch.equal(head.lora_B["default"].weight, head_b)


def test_bf16_kbit_preparation_and_gradient_checkpointing_train(bc_dir: Path) -> None:
    """The usual QLoRA recipe: bf16 load (packed int4 kernel forward), kbit preparation, gradient checkpointing."""
    model = AutoModelForCausalLM.from_pretrained(bc_dir, dtype=torch.bfloat16)
    packed = _packed_state(model)
    model = prepare_model_for_kbit_training(model)  # freezes and upcasts; its checkpointing keys on bnb/GPTQ flags
    replay = {"use_reentrant": False, "context_fn": checkpoint_positions}  # the sink biases need positions in replay
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=replay)
    peft_model = peft_get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert peft_model.get_base_model().is_activation_checkpointing
    losses = _steps(peft_model, n=4)
    assert losses[-1] < losses[0] - 0.05
    after = _packed_state(peft_model)  # the kbit preparation upcasts the bf16 biases to float32, losslessly
    assert after.keys() == packed.keys() and all(torch.equal(after[k].to(packed[k].dtype), packed[k]) for k in packed)


def test_gradient_checkpointing_replays_blocks_with_their_positions(bc_dir: Path) -> None:
    """The sink biases read token positions; a checkpointed block's backward replay needs checkpoint_positions."""
    model = AutoModelForCausalLM.from_pretrained(bc_dir)
    peft_model = peft_get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))

    def grads() -> dict[str, torch.Tensor]:
        peft_model.train()
        peft_model.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    # Exact path throughout: checkpointing makes the embeddings' output require grad (transformers'
    # enable_input_require_grads), which moves the first block's frozen layers from the bf16 kernels to the exact path.
    with kernels.use_backend("reference"):
        expected = grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with pytest.raises(RuntimeError, match="no token positions were published"):
            grads()
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_positions}
        )
        replayed = grads()
    assert replayed.keys() == expected.keys() and len(expected) == 28
    for name, grad in expected.items():
        torch.testing.assert_close(replayed[name], grad, rtol=0, atol=1e-6)


def test_trainer_lowers_the_loss_base_frozen_adapter_reloads(tmp_path: Path) -> None:
    """The example script: quantize, LoRA via Trainer, save, reload onto a fresh BC model."""
    spec = importlib.util.spec_from_file_location("finetune_lora", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--tiny", "--steps", "10", "--output", str(tmp_path / "adapter")])
    losses = result["losses"]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    assert result["frozen"] and result["reload_matches"] and result["quantized_layers"] == 14
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_train_bias_tunes_and_saves_the_bc_biases_only(bc_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(bc_dir)
    if Version(peft.__version__) < Version(TRAIN_BIAS_MIN_PEFT):
        with pytest.raises(ValueError, match="needs peft>="):
            get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]), train_bias=True)
        pytest.skip(f"train_bias needs peft>={TRAIN_BIAS_MIN_PEFT}")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "o_proj"]), train_bias=True)
    base = _packed_state(peft_model)
    _steps(peft_model, n=3, lr=0.05)
    after = _packed_state(peft_model)
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert changed and all(k.endswith((".q_proj.bias", ".o_proj.bias")) for k in changed)
    assert len(changed) == 4  # 2 blocks x (q_proj, o_proj): the packed weights and other biases never move

    peft_model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        bias_keys = {k for k in f.keys() if k.endswith("bias")}
    assert {k.removeprefix("base_model.model.").replace(".base_layer", "") for k in bias_keys} == changed
    x = torch.randint(0, VOCAB, (1, 16))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bc_dir), str(tmp_path))
    torch.testing.assert_close(_logits(reloaded, x), _logits(peft_model, x), rtol=0, atol=1e-6)


def test_merge_needs_dense_weights_and_merges_exactly_after_dequantize(bc_dir: Path) -> None:
    peft_model = peft_get_peft_model(
        AutoModelForCausalLM.from_pretrained(bc_dir), LoraConfig(r=4, target_modules="all-linear")
    )
    _steps(peft_model, n=2, lr=0.05)
    x = torch.randint(0, VOCAB, (2, 16))
    with kernels.use_backend("reference"):  # the exact path: the merge is compared with float32 arithmetic
        expected = _logits(peft_model, x)
    with pytest.raises(AttributeError):  # PEFT adds B @ A to base_layer.weight, which packed layers do not have
        peft_model.merge_and_unload()
    merged = merge_and_unload(peft_model)
    assert not any(isinstance(m, PackedLinearBase | LoraLinear) for m in merged.modules())
    assert getattr(merged, "hf_quantizer", None) is None
    # float32: the merged weight W + B @ A * s rounds differently from W x + (x A^T) B^T * s
    torch.testing.assert_close(_logits(merged, x), expected, rtol=0, atol=1e-5)


def test_unsupported_uses_fail_clearly(bc_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(bc_dir)
    with pytest.raises(ValueError, match=r"use_dora=True\) needs the dense base weight"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="no QuantLinear/MXLinear"):
        get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="train_bias"):
        get_peft_model(model, LoraConfig(r=4, bias="all"), train_bias=True)
    with pytest.raises(ValueError, match="re-initialized"):
        model.model.layers[0].self_attn.q_proj.reset_parameters()
