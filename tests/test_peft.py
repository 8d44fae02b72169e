"""PEFT LoRA on BC-quantized models: adapters attach to QuantLinear, Trainer trains them, the packed base stays frozen."""

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.version import Version
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from optimum_bc import BCQuantizationConfig, QuantLinear


peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel  # noqa: E402

from optimum_bc.peft import (  # noqa: E402
    TRAIN_BIAS_MIN_PEFT,
    BCLoraLinear,
    get_peft_model,
    load_adapter,
    trainable_summary,
)

from .conftest import VOCAB, tiny_llama, tiny_opt  # noqa: E402


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_lora.py"
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny matmuls: one thread is ~20x faster than two fighting a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved BC checkpoint (4-bit RTN + BC) of the tiny LLaMA; every test reloads it fresh."""
    src = tmp_path_factory.mktemp("float")
    tiny_llama().save_pretrained(src)
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = BCQuantizationConfig(bits=4, group_size=32, method="rtn", dataset=ids, num_samples=8, seq_len=32)
    out = tmp_path_factory.mktemp("bc")
    AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg).save_pretrained(out)
    return out


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model that is not a LoRA weight (buffers included), cloned."""
    state = model.state_dict()
    return {_strip(k).replace(".base_layer", ""): v.clone() for k, v in state.items() if "lora_" not in k}


def _strip(key: str) -> str:
    return key.removeprefix("base_model.model.")


def _steps(model: torch.nn.Module, n: int = 3, lr: float = 1e-2) -> list[float]:
    ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(n):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_quantizer_is_trainable_but_a_bare_quantized_model_needs_adapters(bc_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(bc_dir)
    assert model.hf_quantizer.is_trainable is True
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lora_wraps_every_quantlinear_and_starts_as_identity(family: str) -> None:
    from optimum_bc import quantize_model

    model = tiny_llama() if family == "llama" else tiny_opt()
    quantize_model(model, BCQuantizationConfig(bits=4, group_size=32, method="rtn", bias_compensation=False))
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        before = model(x).logits
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    wrapped = {n: m for n, m in peft_model.named_modules() if isinstance(m, BCLoraLinear)}
    assert (
        len(wrapped)
        == sum(isinstance(m, QuantLinear) for m in peft_model.modules())
        == (14 if family == "llama" else 12)
    )
    assert all(isinstance(m.get_base_layer(), QuantLinear) for m in wrapped.values())
    assert "lm_head" not in " ".join(wrapped)
    with torch.no_grad():
        assert torch.equal(peft_model(x).logits, before)  # lora_B starts at zero
    counts = trainable_summary(peft_model)
    assert counts["lora"] > 0 and counts["bias"] == 0 and counts["other"] == 0
    assert _steps(peft_model, n=2)[0] > 0  # gradients flow through the packed layers


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


def test_training_leaves_every_base_tensor_unchanged_and_reload_matches(bc_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(bc_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    base = _base_state(peft_model)
    lora_before = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_B" in k}
    losses = _steps(peft_model, n=4, lr=0.05)
    assert losses[-1] < losses[0]
    after = _base_state(peft_model)
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)
    assert any(k.endswith(".qweight") for k in base)
    assert all(not torch.equal(v, peft_model.state_dict()[k]) for k, v in lora_before.items())

    peft_model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and all("lora_" in k for k in keys)  # adapters only, no packed weights
    peft_model.eval()
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        expected = peft_model(x).logits
        reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(bc_dir), str(tmp_path))
        assert isinstance(reloaded, PeftModel)
        torch.testing.assert_close(reloaded(x).logits, expected, rtol=0, atol=1e-6)
    assert trainable_summary(reloaded) == {"lora": 0, "bias": 0, "other": 0}  # loaded for inference


def test_train_bias_tunes_and_saves_the_bc_biases_only(bc_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(bc_dir)
    if Version(peft.__version__) < Version(TRAIN_BIAS_MIN_PEFT):
        with pytest.raises(ValueError, match="needs peft>="):
            get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]), train_bias=True)
        pytest.skip(f"train_bias needs peft>={TRAIN_BIAS_MIN_PEFT}")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "o_proj"]), train_bias=True)
    base = _base_state(peft_model)
    _steps(peft_model, n=3, lr=0.05)
    after = _base_state(peft_model)
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert changed and all(k.endswith((".q_proj.bias", ".o_proj.bias")) for k in changed)
    assert len(changed) == 4  # 2 blocks x (q_proj, o_proj): the packed weights and other biases never move

    peft_model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        bias_keys = {k for k in f.keys() if k.endswith("bias")}
    assert {_strip(k).replace(".base_layer", "") for k in bias_keys} == changed
    x = torch.randint(0, VOCAB, (1, 16))
    peft_model.eval()
    with torch.no_grad():
        reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(bc_dir), str(tmp_path))
        torch.testing.assert_close(reloaded(x).logits, peft_model(x).logits, rtol=0, atol=1e-6)


def test_unsupported_uses_fail_clearly(bc_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(bc_dir)
    with pytest.raises(ValueError, match="DoRA"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model = AutoModelForCausalLM.from_pretrained(bc_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="re-quantization"):
        peft_model.merge_and_unload()
    with pytest.raises(ValueError, match="no QuantLinear"):
        get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="train_bias"):
        get_peft_model(AutoModelForCausalLM.from_pretrained(bc_dir), LoraConfig(r=4, bias="all"), train_bias=True)
