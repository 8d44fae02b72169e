"""End to end through transformers: from_pretrained(quantization_config=...) -> save_pretrained -> from_pretrained."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from optimum_bc import BCQuantizationConfig, QuantLinear, load_report, quantize_model

from .conftest import TEXTS, VOCAB, tiny_llama, tiny_opt


def _cfg(ids: torch.Tensor, **kw: object) -> BCQuantizationConfig:
    base = {"bits": 3, "group_size": 32, "dataset": ids, "num_samples": 16, "seq_len": 32, "batch_size": 4}
    base.update(kw)
    return BCQuantizationConfig(**base)


def _quantized_linears(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize(
    "options",
    [
        {"method": "gptq", "bc_target": "float"},
        {"method": "gptq", "bc_target": "sequential", "bc_layer": True, "desc_act": True},
        {"method": "rtn", "bc_target": "float", "bc_layer": True, "bits": 4, "group_size": -1},
        {"method": "gptq", "bias_compensation": False, "bits": 2, "sym": True, "true_sequential": False},
    ],
    ids=["gptq-float", "gptq-seq-layer-actorder", "rtn-float-layer", "gptq-nobc-2bit"],
)
def test_quantize_save_reload_logits_identical(tiny_model_dir: str, calib_ids, tmp_path, options) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=_cfg(calib_ids, **options))
    qlinears = _quantized_linears(model)
    assert len(qlinears) in (12, 14)  # OPT: 6 per block, LLaMA: 7 per block
    assert not any(type(m) is torch.nn.Linear and "layers" in n for n, m in model.named_modules())
    report = model.quantization_report
    assert len(report.layers) == len(qlinears) and len(report.blocks) == 2
    for row in report.layers:
        if model.config.quantization_config.bias_compensation:
            assert row.mse_after <= row.mse_before
        else:
            assert row.mse_before is None
    x = torch.randint(0, VOCAB, (2, 20))
    logits = model(x).logits
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(_quantized_linears(reloaded)) == set(qlinears)
    assert torch.equal(reloaded(x).logits, logits)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bc" and saved["dataset"].startswith("pretokenized")


def test_bc_lowers_layer_error_and_changes_output(tiny_model_dir: str, calib_ids) -> None:
    with_bc = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=_cfg(calib_ids, method="rtn"))
    without = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=_cfg(calib_ids, method="rtn", bias_compensation=False)
    )
    rows = with_bc.quantization_report.layers
    assert sum(r.mse_after for r in rows) < sum(r.mse_before for r in rows)
    a, b = _quantized_linears(with_bc), _quantized_linears(without)
    for name in a:
        assert torch.equal(a[name].qweight, b[name].qweight)  # BC never touches the weights
    assert any(not torch.equal(a[n].bias, b[n].bias) for n in a)


def test_llama_bias_flags_saved_so_biases_survive(calib_ids, tmp_path) -> None:
    src = tmp_path / "float"
    tiny_llama().save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=_cfg(calib_ids, method="rtn"))
    assert model.config.attention_bias is True and model.config.mlp_bias is True
    out = tmp_path / "q"
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        bias = f.get_tensor("model.layers.0.self_attn.q_proj.bias")
    assert bias.abs().sum() > 0


def test_sharded_save_reloads(calib_ids, tmp_path) -> None:
    src = tmp_path / "float"
    tiny_opt().save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=_cfg(calib_ids))
    model.save_pretrained(tmp_path / "q", max_shard_size="50KB")
    assert len(list((tmp_path / "q").glob("*.safetensors"))) > 1
    x = torch.randint(0, VOCAB, (1, 16))
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(x).logits, model(x).logits)


def test_post_ln_opt_layer_bc_folds_into_final_layer_norm(calib_ids, tmp_path) -> None:
    model = tiny_opt(pre_ln=False)
    before = model.model.decoder.layers[0].final_layer_norm.bias.clone()
    cfg = _cfg(calib_ids, method="rtn", bc_layer=True)
    report = quantize_model(model, cfg)
    assert not torch.equal(model.model.decoder.layers[0].final_layer_norm.bias, before)
    assert all(b.mse_after <= b.mse_before for b in report.blocks)


def test_4bit_checkpoint_is_at_least_3_5x_smaller_than_fp16(calib_ids, tmp_path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    float_model = LlamaForCausalLM(config)
    quantized_bytes = 0
    fp16_bytes = 0
    quantize_model(float_model, BCQuantizationConfig(bits=4, group_size=128, method="rtn", bias_compensation=False))
    float_model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".layers." in key and key.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                t = f.get_tensor(key)
                quantized_bytes += t.numel() * t.element_size()
    for m in _quantized_linears(float_model).values():
        fp16_bytes += m.in_features * m.out_features * 2
    assert fp16_bytes / quantized_bytes >= 3.5


def test_padding_never_enters_statistics() -> None:
    torch.manual_seed(0)
    lengths = [32, 20, 27, 9, 32, 15, 30, 24]
    clean = [{"input_ids": torch.randint(0, VOCAB, (1, n))} for n in lengths]
    padded = []
    for s in clean:
        n = s["input_ids"].shape[1]
        ids = torch.randint(0, VOCAB, (1, 32))  # junk in the padding positions
        ids[0, :n] = s["input_ids"][0]
        mask = torch.zeros(1, 32, dtype=torch.long)
        mask[0, :n] = 1
        padded.append({"input_ids": ids, "attention_mask": mask})
    biases = []
    for data, batch in ((clean, 1), (padded, 4)):
        model = tiny_llama()
        cfg = BCQuantizationConfig(bits=3, group_size=32, method="rtn", dataset=data, num_samples=8, seq_len=32)
        cfg.batch_size = batch
        quantize_model(model, cfg, calibration=data)
        biases.append({n: m.bias.clone() for n, m in _quantized_linears(model).items()})
    for name in biases[0]:
        torch.testing.assert_close(biases[0][name], biases[1][name], rtol=1e-4, atol=1e-5)


def test_missing_dataset_fails_before_loading(tiny_model_dir: str) -> None:
    with pytest.raises(ValueError, match="dataset=None but method='gptq'"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=BCQuantizationConfig(method="gptq"))


def test_rtn_without_bc_needs_no_data(tiny_model_dir: str) -> None:
    cfg = BCQuantizationConfig(bits=4, group_size=32, method="rtn", bias_compensation=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=cfg)
    assert _quantized_linears(model)
    assert model.quantization_report.calibration_tokens == 0


def test_modules_to_not_convert_default_and_custom(tiny_model_dir: str, calib_ids) -> None:
    cfg = _cfg(calib_ids, method="rtn", modules_to_not_convert=["fc2", "down_proj"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=cfg)
    names = set(_quantized_linears(model))
    assert not any(n.endswith(("fc2", "down_proj")) for n in names)
    assert model.config.quantization_config.modules_to_not_convert == ["fc2", "down_proj"]
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)
    default = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=_cfg(calib_ids, method="rtn"))
    assert "lm_head" in default.config.quantization_config.modules_to_not_convert


def test_reload_without_plugin_is_documented(tmp_path) -> None:
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert "import optimum_bc" in readme and "random weights" in readme


@pytest.mark.parametrize("source", ["list", "file"])
def test_text_dataset_through_from_pretrained(tiny_model_dir: str, word_tokenizer, tmp_path, source: str) -> None:
    if source == "file":
        path = tmp_path / "calib.txt"
        path.write_text("\n\n".join(TEXTS))
        dataset = str(path)
    else:
        dataset = TEXTS
    cfg = BCQuantizationConfig(
        bits=4, group_size=32, dataset=dataset, tokenizer=word_tokenizer, num_samples=4, seq_len=24
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=cfg)
    assert model.quantization_report.calibration_tokens == 4 * 24
    assert "sentence" not in json.dumps(model.config.quantization_config.to_dict())


def test_too_short_text_fails_before_loading(tiny_model_dir: str, word_tokenizer) -> None:
    cfg = BCQuantizationConfig(dataset=TEXTS[:1], tokenizer=word_tokenizer, num_samples=4, seq_len=512)
    with pytest.raises(ValueError, match="seq_len"):
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=cfg)


def test_quantize_model_in_memory_saves_reloadable_checkpoint_with_report(calib_ids, tmp_path) -> None:
    model = tiny_llama()
    report = quantize_model(model, _cfg(calib_ids, bc_layer=True))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "bc"
    x = torch.randint(0, VOCAB, (1, 12))
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(x).logits, model(x).logits)
    assert load_report(str(tmp_path)).to_dict() == report.to_dict()
    with pytest.raises(ValueError, match="already carries"):
        quantize_model(model, _cfg(calib_ids))


def test_position_granularity_is_stored_reloaded_and_refuses_longer_inputs(calib_ids, tmp_path) -> None:
    src = tmp_path / "float"
    tiny_llama().save_pretrained(src)
    cfg = _cfg(calib_ids, method="rtn", bc_granularity="position")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.position_bias.shape == (32, layer.out_features)
    assert torch.count_nonzero(layer.bias) == 0  # nothing folded: the table is the compensation
    assert all(r.mse_after <= r.mse_before for r in model.quantization_report.layers)
    x = torch.randint(0, VOCAB, (2, 32))
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(reloaded(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="calibrated for 32 positions but got position 32"):
        reloaded(torch.randint(0, VOCAB, (1, 33)))


def test_position_granularity_works_for_opt(calib_ids, tmp_path) -> None:
    """OPT's MLP sees flattened tokens; the position table applies by row order (the paper's LLM setting)."""
    tiny_opt().save_pretrained(tmp_path / "float")
    cfg = _cfg(calib_ids, bc_granularity="position", bc_target="float")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg)
    assert all(m.position_bias is not None for m in _quantized_linears(model).values())
    x = torch.randint(0, VOCAB, (2, 20))
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(reloaded(x).logits, model(x).logits)


def test_desc_act_reaches_gptq_and_reloads(calib_ids, tmp_path) -> None:
    tiny_llama().save_pretrained(tmp_path / "float")
    cfg = _cfg(calib_ids, method="gptq", desc_act=True, bias_compensation=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg)
    g_idx = [m.g_idx for m in _quantized_linears(model).values()]
    assert any(bool((g[1:] < g[:-1]).any()) for g in g_idx)  # act-order groups: not in column order
    x = torch.randint(0, VOCAB, (2, 20))
    model.save_pretrained(tmp_path / "q")
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(x).logits, model(x).logits)
