"""BCQuantizationConfig validation and serialization."""

import json

import pytest
import torch

from optimum_bc import BCQuantizationConfig


def test_defaults_and_json_round_trip() -> None:
    cfg = BCQuantizationConfig(bits=3, group_size=64, method="rtn", dataset="wikitext2", num_samples=8, seq_len=64)
    data = cfg.to_dict()
    assert data["quant_method"] == "bc"
    json.dumps(data)
    again = BCQuantizationConfig.from_dict(data)
    assert again.to_dict() == data


def test_to_dict_never_holds_tokenizer_or_raw_text() -> None:
    texts = ["secret calibration text number one " * 20, "another private document " * 20]
    cfg = BCQuantizationConfig(dataset=texts, tokenizer=object(), num_samples=2, seq_len=16)
    data = cfg.to_dict()
    dumped = json.dumps(data)
    assert "tokenizer" not in data
    assert "secret" not in dumped and "private" not in dumped
    assert "2" in data["dataset"]
    assert repr(cfg)


def test_pretokenized_dataset_is_described() -> None:
    cfg = BCQuantizationConfig(dataset=torch.zeros(4, 8, dtype=torch.long), num_samples=4, seq_len=8)
    assert json.loads(json.dumps(cfg.to_dict()))["dataset"].startswith("pretokenized")


def test_unknown_keys_are_refused_naming_the_closest_valid_one() -> None:
    with pytest.raises(ValueError, match="unknown key 'group_szie'; did you mean 'group_size'"):
        BCQuantizationConfig(group_szie=64)
    with pytest.raises(ValueError, match="unknown key 'future_option'"):
        BCQuantizationConfig.from_dict({"quant_method": "bc", "bits": 4, "future_option": 1})
    # keys a newer version wrote come with its higher config_version: the error says to upgrade
    with pytest.raises(ValueError, match="config_version=4 is invalid.*upgrade optimum-bc"):
        BCQuantizationConfig.from_dict({"quant_method": "bc", "future_option": 1, "config_version": 4})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"config_version": "2"}, "config_version='2' is invalid"),
        ({"tokenizer": "gpt2"}, r"tokenizer='gpt2' is invalid.*AutoTokenizer.from_pretrained\('gpt2'\)"),
        ({"erq_lambda": float("inf")}, "erq_lambda=inf is invalid"),
        ({"erq_lambda": float("nan")}, "erq_lambda=nan is invalid"),
        ({"seed": -1}, "seed=-1 is invalid"),
        ({"seed": 2**64}, "seed=18446744073709551616 is invalid"),
        ({"dataset": ""}, "dataset='' is invalid"),
        ({"dataset": [1.5, 2.5]}, "dataset='list' is invalid"),
    ],
)
def test_values_that_crashed_later_are_refused_naming_the_field(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        BCQuantizationConfig(**kwargs)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("bits", 5, r"bits=5 is invalid; allowed: \(2, 3, 4, 6, 8\)"),
        ("bits", True, "bits=True"),
        ("group_size", 0, "group_size=0 is invalid"),
        ("group_size", -2, "group_size=-2"),
        ("sym", "yes", "sym='yes'"),
        ("method", "awq", r"method='awq' is invalid; allowed: \['comq', 'erq', 'gptq', 'rtn'"),
        ("desc_act", 1, "desc_act=1"),
        ("damp_percent", 0.0, "damp_percent=0.0"),
        ("damp_percent", 1.5, "damp_percent=1.5"),
        ("bias_compensation", None, "bias_compensation=None"),
        ("bc_target", "median", r"bc_target='median' is invalid; allowed: \('auto', 'float', 'sequential'\)"),
        ("num_samples", 0, "num_samples=0"),
        ("seq_len", 1, "seq_len=1"),
        ("batch_size", 0, "batch_size=0"),
        ("seed", 1.5, "seed=1.5"),
        ("modules_to_not_convert", "lm_head", "modules_to_not_convert='lm_head'"),
        ("config_version", 99, "config_version=99"),
        ("dataset", 3.14, "dataset='float'"),
    ],
)
def test_each_bad_value_raises_named_error(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        BCQuantizationConfig(**{field: value})
    assert "Fix:" in str(info.value)


def test_bc_layer_requires_bias_compensation() -> None:
    with pytest.raises(ValueError, match="bc_layer=True"):
        BCQuantizationConfig(bias_compensation=False, bc_layer=True)


def test_position_granularity_needs_bc() -> None:
    with pytest.raises(ValueError, match="bc_granularity='position'"):
        BCQuantizationConfig(bias_compensation=False, bc_granularity="position")
    with pytest.raises(ValueError, match="bc_granularity='row'"):
        BCQuantizationConfig(bc_granularity="row")


def test_local_path_is_stored_by_basename(tmp_path) -> None:
    path = tmp_path / "private_corpus.txt"
    path.write_text("text")
    data = BCQuantizationConfig(dataset=str(path)).to_dict()
    assert data["dataset"] == "local:private_corpus.txt"
    assert str(tmp_path) not in json.dumps(data)


# --- GPTQConfig names, the number format's name, update() -------------------------------------------------------


def test_model_seqlen_is_an_alias_of_seq_len() -> None:
    cfg = BCQuantizationConfig(model_seqlen=64)
    assert cfg.seq_len == 64 and "model_seqlen" not in cfg.to_dict()
    assert BCQuantizationConfig(model_seqlen=64, seq_len=64).seq_len == 64
    with pytest.raises(ValueError, match="model_seqlen=64 is invalid.*seq_len=32"):
        BCQuantizationConfig(model_seqlen=64, seq_len=32)
    with pytest.raises(ValueError, match="model_seqlen=1 is invalid|seq_len=1 is invalid"):
        BCQuantizationConfig(model_seqlen=1)


def test_weight_format_and_the_deprecated_format_key() -> None:
    cfg = BCQuantizationConfig(weight_format="MXFP4")
    assert cfg.weight_format == cfg.format == "mxfp4" and cfg.bits == 4 and cfg.group_size == 32
    data = cfg.to_dict()
    assert data["weight_format"] == "mxfp4" and "format" not in data
    assert BCQuantizationConfig.from_dict(data).to_dict() == data
    with pytest.warns(DeprecationWarning, match="weight_format"):
        old_style = BCQuantizationConfig(format="mxint8")
    assert old_style.weight_format == "mxint8" and old_style.bits == 8
    with pytest.raises(ValueError, match=r"format='mxfp4' is invalid.*same value as weight_format='int'"):
        BCQuantizationConfig(format="mxfp4", weight_format="int")


@pytest.mark.parametrize("value", ["gptq", "gptq_v2", "compressed-tensors"])
def test_checkpoint_format_names_are_refused_with_the_save_option(value: str) -> None:
    with pytest.raises(ValueError, match=rf"format='{value}' names a checkpoint layout.*save_format="):
        BCQuantizationConfig(format=value)


@pytest.mark.parametrize("version", [1, 2])
def test_old_config_json_with_format_key_loads_silently(version: int) -> None:
    import warnings

    old = {"quant_method": "bc", "bits": 4, "format": "mxfp4", "group_size": 32, "sym": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = BCQuantizationConfig.from_dict({**old, "config_version": version})
    assert cfg.weight_format == "mxfp4" and cfg.config_version == version
    assert cfg.bc_sink_tokens == (0 if version == 1 else 1)
    assert cfg.to_dict()["weight_format"] == "mxfp4"


def test_update_revalidates_and_leaves_the_config_unchanged_on_error() -> None:
    cfg = BCQuantizationConfig(bits=4, seq_len=64)
    before = cfg.to_dict()
    unused = cfg.update(bits=3, model_seqlen=32, not_a_field=1)
    assert unused == {"not_a_field": 1}
    assert cfg.bits == 3 and cfg.seq_len == 32
    snapshot = cfg.to_dict()
    with pytest.raises(ValueError, match="bits=5 is invalid"):
        cfg.update(bits=5, seq_len=16)
    assert cfg.to_dict() == snapshot  # seq_len was not changed either
    with pytest.raises(ValueError, match="backend='exllama' is invalid"):
        cfg.update(backend="exllama")
    assert cfg.to_dict() == snapshot and before != snapshot
    assert cfg.update(backend="reference") == {} and cfg.backend == "reference"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"backend": "marlin"}, r"backend='marlin' is invalid; allowed: None .*\('auto', 'fast', 'reference'\)"),
        ({"block_name_to_quantize": ["a.layers", "b.layers"]}, "block_name_to_quantize=.* is invalid"),
        ({"block_name_to_quantize": ""}, "block_name_to_quantize='' is invalid"),
        ({"modules_in_block_to_quantize": [["mlp.up_proj"], []]}, "modules_in_block_to_quantize=.* is invalid"),
        ({"modules_in_block_to_quantize": "mlp.up_proj"}, "modules_in_block_to_quantize='mlp.up_proj' is invalid"),
        ({"modules_in_block_to_quantize": [["a"], ["a"]]}, r"each name once"),
    ],
)
def test_gptq_named_fields_are_validated(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match) as info:
        BCQuantizationConfig(**kwargs)
    assert "Fix:" in str(info.value)


def test_gptq_named_fields_round_trip() -> None:
    stages = [["self_attn.q_proj", "self_attn.k_proj"], ["mlp.down_proj"]]
    cfg = BCQuantizationConfig(
        block_name_to_quantize="model.layers", modules_in_block_to_quantize=stages, backend="fast"
    )
    data = json.loads(json.dumps(cfg.to_dict()))
    again = BCQuantizationConfig.from_dict(data)
    assert again.to_dict() == data and again.blocks_path == "model.layers" and again.backend == "fast"
    assert BCQuantizationConfig(block_name_to_quantize=["model.layers"]).blocks_path == "model.layers"


# --- the fields at work on tiny models ---------------------------------------------------------------------------


def _quantized(tmp_path, calib_ids, **options):
    from optimum_bc import quantize_model

    from .conftest import tiny_llama

    model = tiny_llama()
    cfg = BCQuantizationConfig(bits=4, group_size=32, method="rtn", dataset=calib_ids, num_samples=4, seq_len=32)
    cfg.update(**options)
    quantize_model(model, cfg)
    return model


def test_backend_is_per_model_and_survives_a_reload(tmp_path, calib_ids) -> None:
    from transformers import AutoModelForCausalLM

    from optimum_bc.layers import kernels

    if not kernels.HAS_CPU_INT4:
        pytest.skip("torch lacks the CPU int4 kernel")
    exact = _quantized(tmp_path, calib_ids, backend="reference")
    default = _quantized(tmp_path, calib_ids)
    x = torch.randn(1, 4, 160, dtype=torch.bfloat16)
    down = "model.layers.0.mlp.down_proj"
    assert exact.get_submodule(down).kernel_path(x) == kernels.REFERENCE
    assert default.get_submodule(down).kernel_path(x) == kernels.CPU_INT4  # the process default ("auto")
    with kernels.use_backend("reference"):  # a use_backend block wins over every model's choice
        assert default.get_submodule(down).kernel_path(x) == kernels.REFERENCE
    exact.save_pretrained(tmp_path / "exact")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exact")
    assert reloaded.config.quantization_config.backend == "reference"
    with torch.no_grad():  # reloaded biases are trainable Parameters: with autograd on they take the exact path
        assert reloaded.get_submodule(down).kernel_path(x) == kernels.REFERENCE
        assert kernels.set_model_backend(reloaded, None) == 14
        assert reloaded.get_submodule(down).kernel_path(x) == kernels.CPU_INT4


def test_block_name_to_quantize_names_the_blocks(tmp_path, calib_ids) -> None:
    named = _quantized(tmp_path, calib_ids, block_name_to_quantize="model.layers")
    discovered = _quantized(tmp_path, calib_ids)
    ids = calib_ids[:2]
    assert torch.equal(named(ids).logits, discovered(ids).logits)
    with pytest.raises(ValueError, match="no module 'model.blocks'.*block_name_to_quantize"):
        _quantized(tmp_path, calib_ids, block_name_to_quantize="model.blocks")


def test_modules_in_block_to_quantize_quantizes_only_those_in_that_order(tmp_path, calib_ids) -> None:
    from transformers import AutoModelForCausalLM

    from optimum_bc import QuantLinear

    stages = [["mlp.down_proj"], ["self_attn.q_proj", "self_attn.k_proj"]]
    model = _quantized(tmp_path, calib_ids, method="gptq", modules_in_block_to_quantize=stages)
    packed = sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))
    assert packed == [f"model.layers.{i}.{rel}" for i in (0, 1) for rel in sorted(sum(stages, []))]
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    order = [layer.name for layer in model.quantization_report.layers if layer.name.startswith("model.layers.0.")]
    assert order == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]
    model.save_pretrained(tmp_path / "partial")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "partial")
    assert sorted(n for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)) == packed
    ids = calib_ids[:2]
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match=r"names \['mlp.w1'\].*they hold \["):
        _quantized(tmp_path, calib_ids, modules_in_block_to_quantize=[["mlp.w1"]])


def test_from_pretrained_applies_the_gptq_named_fields(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from optimum_bc import QuantLinear

    from .conftest import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "float")
    cfg = BCQuantizationConfig(
        method="rtn",
        bias_compensation=False,
        group_size=32,
        block_name_to_quantize=["model.layers"],
        modules_in_block_to_quantize=[["mlp.down_proj"]],
        backend="reference",
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=cfg)
    packed = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(packed) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert {m.kernel_backend for m in packed.values()} == {"reference"}


def test_gptq_export_config_carries_the_gptq_named_fields() -> None:
    from optimum_bc.export.gptq import gptq_quantization_config

    stages = [["mlp.down_proj"], ["self_attn.o_proj"]]
    cfg = BCQuantizationConfig(sym=True, block_name_to_quantize="model.layers", modules_in_block_to_quantize=stages)
    out = gptq_quantization_config(cfg)
    assert out["block_name_to_quantize"] == "model.layers" and out["modules_in_block_to_quantize"] == stages
    plain = gptq_quantization_config(BCQuantizationConfig(sym=True))
    assert plain.get("block_name_to_quantize") is None and plain.get("modules_in_block_to_quantize") is None


def test_update_of_any_values_validates_or_changes_nothing() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from .test_config_properties import ANY_VALUE, FIELDS

    updatable = [f for f in FIELDS if f not in ("config_version", "tokenizer")]

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(st.sampled_from(updatable), ANY_VALUE, min_size=1, max_size=3))
    def check(values: dict) -> None:
        cfg = BCQuantizationConfig(seq_len=64, num_samples=8)
        before = cfg.to_dict()
        try:
            assert cfg.update(**values) == {}
        except ValueError as err:
            assert any(f"{field}=" in str(err) for field in values) and "Fix:" in str(err)
            assert cfg.to_dict() == before
            return
        assert BCQuantizationConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()

    check()


def test_update_of_the_format_alone_takes_the_formats_own_bits_block_and_symmetry() -> None:
    """As at construction, a format change leaves the fields it fixes to the new format unless given with it (found
    by the property test above: ``update(weight_format="MXINT8")`` refused the default 4 bits)."""
    cfg = BCQuantizationConfig(seq_len=64, num_samples=8)
    assert cfg.update(weight_format="MXINT8") == {}
    assert (cfg.format, cfg.bits, cfg.group_size, cfg.sym) == ("mxint8", 8, 32, True)
    cfg.update(weight_format="int", bits=3)
    assert (cfg.format, cfg.bits, cfg.group_size, cfg.sym) == ("int", 3, 128, False)
    with pytest.raises(ValueError, match="bits=3"):
        cfg.update(weight_format="mxfp4", bits=3)
    assert cfg.format == "int" and cfg.bits == 3
