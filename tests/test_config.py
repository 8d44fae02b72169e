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
    with pytest.raises(ValueError, match="config_version=3 is invalid.*upgrade optimum-bc"):
        BCQuantizationConfig.from_dict({"quant_method": "bc", "future_option": 1, "config_version": 3})


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
        ("bc_target", "median", r"bc_target='median' is invalid; allowed: \('float', 'sequential'\)"),
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
