"""Property-based tests: any config value is accepted and round-trips, or is refused by a ValueError naming it."""

import inspect
import json
import math
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimum_bc import BCQuantizationConfig
from optimum_bc.data.calibration_data import build_calibration_set


FIELDS = sorted(set(inspect.signature(BCQuantizationConfig.__init__).parameters) - {"self", "kwargs"})

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-2, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1),
    st.text(max_size=12),
    st.sampled_from(["int", "mxfp4", "MXINT8", "rtn", "gptq", "comq", "erq", "channel", "position", "float", "2"]),
    st.sampled_from(["sequential", "wikitext2", "wiki-vital", "lm_head", "gpt2", "local:x.txt"]),
    st.lists(st.text(max_size=5), max_size=3),
    st.lists(st.integers(min_value=-3, max_value=300), max_size=3),
    st.lists(st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _round_trips(config: BCQuantizationConfig) -> None:
    data = config.to_dict()
    text = json.dumps(data)  # JSON types only
    again = BCQuantizationConfig.from_dict(json.loads(text))
    assert again.to_dict() == data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, min_size=1, max_size=3))
def test_any_field_values_are_accepted_and_round_trip_or_refused_naming_a_field(values: dict[str, Any]) -> None:
    try:
        config = BCQuantizationConfig(**values)
    except ValueError as err:
        message = str(err)
        assert any(f"{field}=" in message for field in values), message
        assert "Fix:" in message, message
        return
    _round_trips(config)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), st.integers(), min_size=1, max_size=2))
def test_unknown_keys_are_refused_naming_them(values: dict[str, Any]) -> None:
    accepted = ("quant_method", "self", "format", "model_seqlen")  # the last two: old / GPTQConfig names
    unknown = {k: v for k, v in values.items() if k not in FIELDS and k not in accepted}
    if not unknown:
        return
    try:
        BCQuantizationConfig(**unknown)
    except ValueError as err:
        assert f"unknown key {sorted(unknown)[0]!r}" in str(err)
    else:
        raise AssertionError(f"{unknown} accepted")


class _CharTokenizer:
    """One id per character (ids 0..127): a real, deterministic tokenizer for any text."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 128 for c in text]}


DATASETS = st.one_of(
    st.lists(st.text(max_size=60), max_size=4),
    st.lists(st.lists(st.integers(min_value=-2, max_value=200), max_size=20), max_size=4),
    st.lists(st.integers(), max_size=3),
    st.text(max_size=10),
    st.integers(),
    st.none(),
    st.builds(lambda n, t: torch.randint(0, 100, (n, t)), st.integers(0, 3), st.integers(0, 20)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    DATASETS,
    st.integers(min_value=-1, max_value=6),
    st.integers(min_value=0, max_value=24),
    st.integers(min_value=-1, max_value=3),
)
def test_calibration_loader_returns_windows_or_refuses_naming_the_argument(
    dataset: Any, num_samples: int, seq_len: int, seed: int
) -> None:
    kwargs = {"num_samples": num_samples, "seq_len": seq_len, "seed": seed}
    try:
        samples = build_calibration_set(dataset, _CharTokenizer(), **kwargs)
    except ValueError as err:
        message = str(err)
        assert any(f"{name}=" in message for name in ("dataset", *kwargs)), message
        return
    assert 1 <= len(samples) <= num_samples
    for sample in samples:
        ids = sample["input_ids"]
        assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == 1 and 1 <= ids.shape[1] <= seq_len
        assert sample["attention_mask"].shape == ids.shape
        assert int(ids.min()) >= 0
    again = build_calibration_set(dataset, _CharTokenizer(), **kwargs)  # deterministic per seed
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, again, strict=True))
    assert not math.isnan(float(len(samples)))
