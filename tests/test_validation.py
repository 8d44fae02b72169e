"""Loading a damaged or mismatched BC checkpoint fails naming the tensor and the likely cause."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import optimum_bc  # noqa: F401 - registers quant_method="bc"
from optimum_bc import BCQuantizationConfig
from optimum_bc.layers.validation import CheckpointError

from .conftest import VOCAB, tiny_llama


LAYER = "model.layers.0.self_attn.q_proj"


pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized_folder(root: Path, **settings: Any) -> Path:
    src = root / "float"
    if not src.exists():
        tiny_llama().save_pretrained(src)
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    cfg = BCQuantizationConfig(method="rtn", dataset=ids, num_samples=4, seq_len=16, **settings)
    out = root / "-".join(f"{k}{v}" for k, v in settings.items())
    AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _quantized_folder(tmp_path_factory.mktemp("v"), bits=4, group_size=32)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        metadata = f.metadata()
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = value(tensors[key])

    return edit


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.pop(key)


def _nan_at_0(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _with(index: int, value: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[index] = value
        return t

    return change


TENSOR_CASES = {
    "missing qweight": (_drop(f"{LAYER}.qweight"), rf"'{LAYER}.qweight' is missing: the file is incomplete"),
    "missing sink_bias": (_drop(f"{LAYER}.sink_bias"), r"sink_bias' is missing: config.json asks for bc_sink_tokens"),
    "NaN scales": (_set(f"{LAYER}.scales", _nan_at_0), rf"{LAYER}.scales holds 1 NaN or infinite values"),
    "negative g_idx": (
        _set(f"{LAYER}.g_idx", _with(3, -1)),
        r"g_idx holds group indices in \[-1, 1\], outside \[0, 1\]",
    ),
    "g_idx out of range": (_set(f"{LAYER}.g_idx", _with(3, 2)), r"g_idx holds group indices in \[0, 2\], outside"),
    "float32 qweight": (_set(f"{LAYER}.qweight", lambda t: t.float()), r"qweight' has dtype F32, expected I32"),
    "NaN bias": (_set(f"{LAYER}.bias", _nan_at_0), rf"{LAYER}.bias holds 1 NaN"),
    "NaN sink_bias": (_set(f"{LAYER}.sink_bias", _nan_at_0), rf"{LAYER}.sink_bias holds 1 NaN"),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_damaged_tensor_is_refused_naming_it(good: Path, tmp_path: Path, case: str) -> None:
    edit, match = TENSOR_CASES[case]
    folder = _copy(good, tmp_path / "ckpt")
    _edit_tensors(folder, edit)
    with pytest.raises(CheckpointError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)


CONFIG_CASES = {
    "format edited": (
        {"weight_format": "mxfp4", "sym": True},
        r"are not used by the layer .*format='mxfp4'.* was edited",
    ),
    "bits edited": ({"bits": 8}, r"qweight' has shape \[64, 8\], the config expects \[64, 16\]: bits or format"),
    "group edited": ({"group_size": 16}, r"has shape \[64, 2\], the config expects \[64, 4\]: group_size or bits"),
    "sink dropped": ({"bc_sink_tokens": 0}, r"sink_bias'\] are not used .*bc_sink_tokens=0"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_that_no_longer_fits_the_weights_is_refused(good: Path, tmp_path: Path, case: str) -> None:
    changes, match = CONFIG_CASES[case]
    folder = _copy(good, tmp_path / "ckpt")
    _edit_config(folder, **changes)
    with pytest.raises(CheckpointError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)


def test_truncated_file_is_refused(good: Path, tmp_path: Path) -> None:
    folder = _copy(good, tmp_path / "ckpt")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match=r"model.safetensors"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_mx_checkpoint_with_a_nan_scale_code_is_refused(tmp_path: Path) -> None:
    folder = _quantized_folder(tmp_path, format="mxfp4")
    AutoModelForCausalLM.from_pretrained(folder)  # intact: loads
    _edit_tensors(folder, _set(f"{LAYER}.scales", lambda t: torch.full_like(t, 0xFF)))
    with pytest.raises(CheckpointError, match=r"scales holds 128 reserved NaN exponent codes"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_intact_checkpoint_loads_with_the_same_logits(good: Path) -> None:
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    a = AutoModelForCausalLM.from_pretrained(good)(ids).logits
    b = AutoModelForCausalLM.from_pretrained(good)(ids).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- bad inputs


def _quantize(model: Any, **settings: Any) -> Any:
    from optimum_bc.api import quantize_model

    ids = settings.pop("dataset", torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1)))
    settings = {"method": "rtn", "group_size": 32, "num_samples": 2, "seq_len": 16, **settings}
    return quantize_model(model, BCQuantizationConfig(dataset=ids, **settings))


def _no_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any calibration work after the checks would fail the test."""
    from optimum_bc import api

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("calibration started")

    monkeypatch.setattr(api, "capture_block_inputs", fail)


def test_modules_to_not_convert_excluding_everything_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_calibration(monkeypatch)
    with pytest.raises(ValueError, match=r"modules_to_not_convert=\['model'\] leaves no Linear layer to quantize"):
        _quantize(tiny_llama(), modules_to_not_convert=["model"])


def test_an_already_packed_model_is_refused_before_the_work(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    _quantize(model)
    _no_calibration(monkeypatch)
    with pytest.raises(ValueError, match=r"already quantized \('model.layers.0.self_attn.q_proj' is a QuantLinear"):
        _quantize(model)


@pytest.mark.parametrize(
    "value,match",
    [
        (float("nan"), "has 1 NaN or infinite weights"),
        (1e6, "has weights spanning 1e\\+06 in one row: its 4-bit scale would exceed"),
    ],
)
def test_weights_the_int_grid_cannot_store_name_the_layer(value: float, match: str, monkeypatch) -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = value
    _no_calibration(monkeypatch)
    with pytest.raises(ValueError, match=rf"layer 'model.layers.1.mlp.down_proj' {match}"):
        _quantize(model)


def test_token_ids_outside_the_vocabulary_fail_before_the_weights_load(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path)
    ids = torch.full((2, 16), VOCAB + 5)
    cfg = BCQuantizationConfig(method="rtn", dataset=ids, num_samples=2, seq_len=16)
    with pytest.raises(ValueError, match=rf"token id {VOCAB + 5} is outside the model's vocabulary of {VOCAB}"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg)


def test_seq_len_beyond_the_context_is_refused_or_warned_under_rope_scaling(monkeypatch) -> None:
    from .conftest import tiny_opt

    ids = torch.randint(0, VOCAB, (2, 200), generator=torch.Generator().manual_seed(1))
    _no_calibration(monkeypatch)
    for model in (tiny_opt(), tiny_llama()):
        with pytest.raises(ValueError, match=r"seq_len=200 .* beyond the model's max_position_embeddings=128"):
            _quantize(model, dataset=ids, seq_len=200)
    model = tiny_llama()
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.warns(UserWarning, match="extrapolates with rope_type='linear'"), pytest.raises(AssertionError):
        _quantize(model, dataset=ids, seq_len=200)
