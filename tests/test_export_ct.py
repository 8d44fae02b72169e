"""compressed-tensors export: stock transformers (no optimum_bc) loads it and computes our model's logits.

The module fixture quantizes a handful of tiny models (LLaMA, Mistral, Qwen2, OPT; fp32 and bf16; 2/3/4/8 bits;
per group and per channel; sym and asym; per-channel act-order; MXFP4/6/8; with BC), exports each, records our logits with the
exact reference path, then ONE subprocess that never imports optimum_bc loads every folder with
``AutoModelForCausalLM.from_pretrained``, runs them and greedy-generates; its results are compared per case.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc.cli import main
from optimum_bc.export import ExportWarning, export_model
from optimum_bc.layers import kernels

from .conftest import VOCAB, tiny_llama, tiny_opt


#: Allowed max |logit difference| relative to max |logit|: fp32 is exact up to summation order; in bf16 the stock
#: loader holds the scales in bf16 (ours are fp16) and dequantizes in bf16, so bf16 rounding shows (measured: fp32
#: 0.0 for every case, bf16 0.003-0.008).
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
PROBE = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
NEW_TOKENS = 4


def tiny_mistral(sliding_window: int | None = None) -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        sliding_window=sliding_window,
    )
    return MistralForCausalLM(config).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).eval()


BUILDERS = {"llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2, "opt": tiny_opt}
# name -> (family, dtype, config settings)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama-fp32-w4g32-asym": ("llama", "float32", {"bits": 4, "group_size": 32}),
    "llama-bf16-w4g32-sym": ("llama", "bfloat16", {"bits": 4, "group_size": 32, "sym": True}),
    "llama-fp32-w8-channel-asym": ("llama", "float32", {"bits": 8, "group_size": -1}),
    "llama-fp32-w4-channel-actorder": (
        "llama",
        "float32",
        {"bits": 4, "group_size": -1, "method": "gptq", "desc_act": True, "sym": True},
    ),
    "mistral-fp32-w4g32-sym": ("mistral", "float32", {"bits": 4, "group_size": 32, "sym": True}),
    "mistral-bf16-w3g32-asym": ("mistral", "bfloat16", {"bits": 3, "group_size": 32}),
    "qwen2-fp32-w4g64-asym": ("qwen2", "float32", {"bits": 4, "group_size": 64}),
    "qwen2-bf16-w8g32-sym": ("qwen2", "bfloat16", {"bits": 8, "group_size": 32, "sym": True}),
    "opt-fp32-w2g32-asym": ("opt", "float32", {"bits": 2, "group_size": 32}),
    "opt-bf16-w4g32-sym": ("opt", "bfloat16", {"bits": 4, "group_size": 32, "sym": True}),
    "llama-fp32-w4g32-dense-down1": (
        "llama",
        "float32",
        {
            "bits": 4,
            "group_size": 32,
            "sym": True,
            "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.down_proj"],
        },
    ),
    "llama-fp32-mxfp4": ("llama", "float32", {"format": "mxfp4"}),
    "qwen2-bf16-mxfp6": ("qwen2", "bfloat16", {"format": "mxfp6_e2m3"}),
    "opt-fp32-mxfp8": ("opt", "float32", {"format": "mxfp8_e4m3"}),
}
MX_CT = {"mxfp4": "mxfp4-pack-quantized", "mxfp6_e2m3": "mxfp6-pack-quantized", "mxfp8_e4m3": "mxfp8-quantized"}
CALIB = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


def _quantized(family: str, settings: dict[str, Any], model: Any = None) -> Any:
    # bc_target="sequential": every layer gets a bias (auto may choose none for a block), which the checks count
    settings = {"method": "rtn", "bc_sink_tokens": 0, "bc_target": "sequential", **settings}
    model = BUILDERS[family]() if model is None else model
    config = BCQuantizationConfig(**settings, dataset=CALIB, num_samples=8, seq_len=32)
    quantize_model(model, config)
    return model


def _reference(model: Any) -> dict[str, torch.Tensor]:
    with torch.no_grad(), kernels.use_backend("reference"):
        logits = model(PROBE).logits.float()
        generated = model.generate(PROBE[:1], max_new_tokens=NEW_TOKENS, do_sample=False)
    return {"logits": logits, "generated": generated}


LOADER = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    probe = torch.load(sys.argv[2])
    new_tokens = int(sys.argv[3])
    for job in jobs:
        model = AutoModelForCausalLM.from_pretrained(job["path"], dtype="auto")  # config.json's dtype
        with torch.no_grad():
            logits = model(probe).logits.float()
            generated = model.generate(probe[:1], max_new_tokens=new_tokens, do_sample=False)
        dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
        torch.save({"logits": logits, "generated": generated, "class": type(model).__name__, "dtype": dtype}, job["out"])
    assert "optimum_bc" not in sys.modules, "the stock loader must not import optimum_bc"
    print("loaded", len(jobs))
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case exported, the reference logits, and the stock loader's results (one subprocess for all)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ct")
    results: dict[str, Any] = {"root": root, "warnings": {}}
    jobs = []
    for name, (family, dtype, settings) in CASES.items():
        model = _quantized(family, settings).to(getattr(torch, dtype))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_model(model, root / name, "compressed-tensors")
        results["warnings"][name] = [str(w.message) for w in caught if issubclass(w.category, ExportWarning)]
        results[name] = _reference(model)
        jobs.append({"name": name, "path": str(root / name), "dtype": dtype})

    # Sink tokens: refused by default; dropped with a warning when asked; the export equals our model without them.
    model = _quantized("llama", {"bits": 4, "group_size": 32, "bc_sink_tokens": 1})
    with pytest.raises(ValueError, match=r"bc_sink_tokens=1: .* drop_sink_bias=True"):
        export_model(model, root / "llama-sink", "compressed-tensors")
    assert not (root / "llama-sink").exists()
    with pytest.warns(ExportWarning, match=r"sink_bias .* of 14 layers .* bc_sink_tokens=0") as caught:
        export_model(model, root / "llama-sink", "compressed-tensors", drop_sink_bias=True)
    results["sink-warning"] = [str(w.message) for w in caught]
    for module in model.modules():
        if getattr(module, "sink_bias", None) is not None:
            module.sink_bias.zero_()
    results["llama-sink"] = _reference(model)
    jobs.append({"name": "llama-sink", "path": str(root / "llama-sink"), "dtype": "float32"})

    # Mistral with a sliding window has no LLaMA equivalent: its compensation biases are dropped, with their cost.
    model = _quantized("mistral", {"bits": 4, "group_size": 32}, tiny_mistral(sliding_window=8))
    with pytest.warns(
        ExportWarning,
        match=r"14 compensation biases have no place in the stock mistral class.*sliding window \(8\).*Fix",
    ):
        export_model(model, root / "mistral-window", "compressed-tensors")
    for module in model.modules():
        if hasattr(module, "qweight"):
            module.bias.data.zero_()
    results["mistral-window"] = _reference(model)
    jobs.append({"name": "mistral-window", "path": str(root / "mistral-window"), "dtype": "float32"})

    # The CLI: a native checkpoint exported by `optimum-bc export`.
    native = root / "native"
    _quantized("qwen2", {"bits": 4, "group_size": 32}).save_pretrained(native)
    assert main(["export", str(native), str(root / "cli"), "--format", "compressed-tensors", "--quiet"]) == 0
    from transformers import AutoModelForCausalLM

    results["cli"] = _reference(AutoModelForCausalLM.from_pretrained(native))
    jobs.append({"name": "cli", "path": str(root / "cli"), "dtype": "float32"})

    # Sharded: several safetensors files and an index, as transformers writes them.
    model = _quantized("opt", {"bits": 4, "group_size": 32, "bc_sink_tokens": 0})
    model.save_pretrained(root / "sharded", save_format="compressed-tensors", max_shard_size="40KB")
    results["sharded"] = _reference(model)
    jobs.append({"name": "sharded", "path": str(root / "sharded"), "dtype": "float32"})

    for job in jobs:
        job["out"] = str(root / f"{job['name']}.stock.pt")
    torch.save(PROBE, root / "probe.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(jobs), str(root / "probe.pt"), str(NEW_TOKENS)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for job in jobs:
        results[job["name"]]["stock"] = torch.load(job["out"])
    return results


def _assert_same(result: dict[str, Any], dtype: str) -> None:
    assert result["stock"]["dtype"] == dtype
    ours, stock = result["logits"], result["stock"]["logits"]
    error = float((stock - ours).abs().max() / ours.abs().max())
    assert error <= TOLERANCE[dtype], f"relative logit error {error:.3g} > {TOLERANCE[dtype]}"
    if dtype == "float32":
        assert torch.equal(result["generated"], result["stock"]["generated"])
    else:
        assert result["stock"]["generated"].shape == (1, PROBE.shape[1] + NEW_TOKENS)


@pytest.mark.parametrize("name", list(CASES))
def test_stock_transformers_computes_our_logits(exported: dict[str, Any], name: str) -> None:
    family, dtype, settings = CASES[name]
    _assert_same(exported[name], dtype)
    config = json.loads((exported["root"] / name / "config.json").read_text())
    qc = config["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert qc["quant_method"] == "compressed-tensors"
    if "format" in settings:  # MX: E8M0 scales per 32 columns
        assert qc["format"] == MX_CT[settings["format"]] and weights["type"] == "float"
        assert weights["group_size"] == 32
    else:
        assert qc["format"] == "pack-quantized"
        assert weights["num_bits"] == settings["bits"] and weights["symmetric"] == settings.get("sym", False)
        assert weights["strategy"] == ("channel" if settings["group_size"] == -1 else "group")
    assert qc["optimum_bc"]["source_model_type"] == family
    # Qwen2 and Mistral have no bias flag for every compensated Linear: they are written as the equivalent LLaMA.
    expected_class = {"mistral": "LlamaForCausalLM", "qwen2": "LlamaForCausalLM"}.get(family)
    if expected_class:
        assert exported[name]["stock"]["class"] == expected_class
    assert exported["warnings"][name] == []  # every compensation bias carried
    assert "lm_head" in qc["ignore"]
    for name in settings.get("modules_to_not_convert", []):  # kept dense: compressed-tensors' ignore list
        assert name in qc["ignore"]


def test_compensation_biases_are_in_the_checkpoint(exported: dict[str, Any]) -> None:
    """The export carries BC: a Mistral q_proj (no bias in the float model) gets its compensation bias."""
    path = exported["root"] / "mistral-fp32-w4g32-sym" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        bias = f.get_tensor("model.layers.0.self_attn.q_proj.bias")
    assert {"model.layers.0.mlp.down_proj.weight_packed", "model.layers.0.mlp.down_proj.weight_scale"} <= keys
    assert "model.layers.0.mlp.down_proj.weight_zero_point" not in keys  # symmetric: no zero point
    assert bias.abs().max() > 0


def test_sink_bias_is_dropped_with_a_warning_and_the_rest_is_exact(exported: dict[str, Any]) -> None:
    _assert_same(exported["llama-sink"], "float32")
    config = json.loads((exported["root"] / "llama-sink" / "config.json").read_text())
    assert config["quantization_config"]["optimum_bc"]["dropped_sink_bias_layers"] == 14


def test_biases_without_a_stock_slot_are_dropped_with_their_cost(exported: dict[str, Any]) -> None:
    _assert_same(exported["mistral-window"], "float32")
    assert exported["mistral-window"]["stock"]["class"] == "MistralForCausalLM"
    config = json.loads((exported["root"] / "mistral-window" / "config.json").read_text())
    assert len(config["quantization_config"]["optimum_bc"]["dropped_biases"]) == 14


def test_sharded_export_loads(exported: dict[str, Any]) -> None:
    _assert_same(exported["sharded"], "float32")
    folder = exported["root"] / "sharded"
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert "optimum_bc.provenance" in dict(safe_open(str(shards[-1]), "pt").metadata())


def test_cli_export_of_a_native_checkpoint(exported: dict[str, Any]) -> None:
    _assert_same(exported["cli"], "float32")
    folder = exported["root"] / "cli"
    assert (folder / "README.md").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".cli.")]  # no temporary folder left


# --------------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small() -> Any:
    torch.set_num_threads(1)
    return _quantized("llama", {"bits": 4, "group_size": 32})


def test_existing_target_is_refused_unless_overwrite(small: Any, tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("saved before")
    with pytest.raises(ValueError, match="already exists.*overwrite=True"):
        export_model(small, target, "compressed-tensors")
    assert (target / "keep.txt").read_text() == "saved before"
    export_model(small, target, "compressed-tensors", overwrite=True)
    assert (target / "model.safetensors").is_file() and not (target / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_write_leaves_nothing_half_written(small: Any, tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch

    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("saved before")

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_model(small, target, "compressed-tensors", overwrite=True)
    assert (target / "keep.txt").read_text() == "saved before"
    with pytest.raises(OSError, match="disk full"):
        export_model(small, tmp_path / "new", "compressed-tensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"bits": 4, "group_size": 32, "method": "gptq", "desc_act": True}, r"desc_act=True with group_size=32.*Fix"),
        ({"bits": 4, "group_size": 32, "bc_granularity": "position"}, r"bc_granularity='position'.*Fix"),
        ({"format": "mxint4"}, r"format='mxint4'.*Fix: quantize with format='mxfp4'"),
        (
            {"bits": 4, "group_size": 64},
            r"down_proj: group_size=64 does not divide its in_features=160.*group_size=32",
        ),
    ],
)
def test_unexpressible_settings_are_refused_before_writing(settings: dict, message: str, tmp_path: Path) -> None:
    model = _quantized("llama", settings)
    with pytest.raises(ValueError, match=message):
        export_model(model, tmp_path / "out", "compressed-tensors")
    assert not any(tmp_path.iterdir())


def test_a_float_model_and_an_unknown_format_are_refused(small: Any, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not BC-quantized"):
        export_model(tiny_llama(), tmp_path / "out", "compressed-tensors")
    with pytest.raises(ValueError, match=r"save_format='onnx' is not supported.*compressed-tensors"):
        export_model(small, tmp_path / "out", "onnx")
    assert not any(tmp_path.iterdir())


def test_save_pretrained_save_format_writes_the_layout_and_the_card(small: Any, tmp_path: Path) -> None:
    small.save_pretrained(tmp_path / "ct", save_format="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    card = (tmp_path / "ct" / "README.md").read_text()
    assert "`compressed-tensors` layout" in card and "without optimum-bc" in card
    assert "import optimum_bc" not in card
    with pytest.raises(ValueError, match=r"not \['state_dict'\]"):
        small.save_pretrained(tmp_path / "ct2", save_format="compressed-tensors", state_dict={})
    with pytest.raises(ValueError, match="save_format='onnx' is not supported"):
        small.save_pretrained(tmp_path / "ct2", save_format="onnx")
    assert not (tmp_path / "ct2").exists()


def test_cli_bad_input_exits_2_with_one_line(small: Any, tmp_path: Path, capsys) -> None:
    native = tmp_path / "native"
    small.save_pretrained(native)
    (tmp_path / "taken").mkdir()
    assert main(["export", str(native), str(tmp_path / "taken"), "--format", "compressed-tensors"]) == 2
    assert "already exists" in capsys.readouterr().err
    float_dir = tmp_path / "float"
    tiny_llama().save_pretrained(float_dir)
    assert main(["export", str(float_dir), str(tmp_path / "x"), "--format", "compressed-tensors"]) == 2
    assert "not an optimum-bc checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "x"), "--format", "compressed-tensors"]) == 2
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------- CLI and GPTQ


def test_cli_quantize_save_format_and_its_early_refusal(tmp_path: Path, word_tokenizer, capsys, monkeypatch) -> None:
    from .conftest import TEXTS

    source = tmp_path / "float"
    tiny_llama().save_pretrained(source)
    word_tokenizer.save_pretrained(source)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXTS * 3))
    out = tmp_path / "q"
    argv = ["quantize", str(source), "--output", str(out), "--bits", "4", "--group-size", "32", "--method", "rtn"]
    argv += ["--dataset", str(text), "--num-samples", "4", "--seq-len", "16", "--quiet", "--bc-sink-tokens", "0"]
    # Without --bc-sink-tokens a stock-layout export takes the export-friendly 0; an explicit 1 is refused early.
    assert main([*argv[:-2], "--save-format", "compressed-tensors"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["optimum_bc"]["bc_config"]["bc_sink_tokens"] == 0
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()
    capsys.readouterr()
    sink = [*argv[:-1], "1", "--save-format", "gptq"]
    sink[3] = str(tmp_path / "q-sink")
    assert main(sink) == 2
    assert "--drop-sink-bias" in capsys.readouterr().err and not (tmp_path / "q-sink").exists()
    bad = [*argv[:-2], "--save-format", "compressed-tensors", "--method", "gptq", "--desc-act"]
    bad[3] = str(tmp_path / "q2")
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "desc_act=True with group_size=32" in err and err.count("\n") == 1
    import optimum_bc.integrations.quantizer

    def no_calibration(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the refusal must come before quantization")

    monkeypatch.setattr(optimum_bc.integrations.quantizer, "quantize_model", no_calibration)
    bad = [*argv, "--save-format", "compressed-tensors"]
    bad[3], bad[7] = str(tmp_path / "q2"), "64"  # the MLP input width 160 is no multiple of 64
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "down_proj: group_size=64 does not divide its in_features=160" in err
    assert not (tmp_path / "q2").exists()


def test_save_format_gptq_writes_gptq_tensors_and_config(tmp_path: Path) -> None:
    model = _quantized("opt", {"bits": 4, "group_size": 32, "sym": True})
    model.save_pretrained(tmp_path / "gptq", save_format="gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["quantization_config"]["bits"] == 4
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        bias = f.get_tensor("model.decoder.layers.0.fc1.bias")
    prefix = "model.decoder.layers.0.fc1."
    assert {prefix + k for k in ("qweight", "qzeros", "scales", "g_idx", "bias")} <= keys
    assert bias.abs().max() > 0  # the compensation bias travels
    with pytest.raises(ValueError, match="bc_sink_tokens"):
        export_model(_quantized("opt", {"bits": 4, "group_size": 32, "bc_sink_tokens": 1}), tmp_path / "x", "gptq")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7, 8])
@pytest.mark.parametrize(("group_size", "sym"), [(32, False), (-1, True)])
def test_every_packed_width_decompresses_to_our_weight(bits: int, group_size: int, sym: bool) -> None:
    """compressed-tensors' own decompressor turns our exported tensors back into ``dequantize_weight`` exactly."""
    from compressed_tensors.compressors import BaseCompressor

    from optimum_bc import QuantLinear
    from optimum_bc.export.compressed_tensors import ct_layer_tensors, ct_scheme

    g = torch.Generator().manual_seed(bits)
    out_features, in_features = 48, 96
    groups = 1 if group_size == -1 else in_features // group_size
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=g)
    zeros = torch.full((out_features, groups), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (48, groups))
    scales = torch.rand(out_features, groups, generator=g) * 0.01 + 0.001
    layer = QuantLinear.from_quantized(codes, scales, zeros, None, bits, group_size, bias=torch.randn(out_features))
    config = BCQuantizationConfig(bits=4, group_size=group_size, sym=sym)
    config.bits = bits  # our quantizer offers 2/3/4/8; the layer and compressed-tensors hold 2..8
    tensors = ct_layer_tensors(layer, config)
    assert tensors["weight_packed"].shape == (out_features, -(-in_features * bits // 32))
    assert ("weight_zero_point" in tensors) is not sym
    state = {k: v for k, v in tensors.items() if k != "bias"}
    weight = BaseCompressor.get_value_from_registry("pack-quantized").decompress(state, ct_scheme(config))["weight"]
    assert torch.equal(weight.float(), layer.dequantize_weight(torch.float32))


def test_a_model_with_peft_adapters_is_refused(tmp_path: Path) -> None:
    from peft import LoraConfig

    from optimum_bc.integrations.peft import get_peft_model

    model = get_peft_model(
        _quantized("llama", {"bits": 4, "group_size": 32}), LoraConfig(r=4, target_modules=["q_proj"])
    )
    with pytest.raises(ValueError, match="PEFT adapters.*Fix"):
        export_model(model.base_model.model, tmp_path / "out", "compressed-tensors")
    assert not any(tmp_path.iterdir())
