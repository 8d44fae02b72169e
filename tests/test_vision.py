"""Vision transformers (tiny random DINOv2 / ViT built from configs) with weight + activation quantization, image
calibration data, errors before calibration, save/reload; the int8 W8A8 path; the real DINOv2-S conversion (slow)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    ViTConfig,
    ViTForImageClassification,
)

from optimum_bc import BCQuantizationConfig, QuantLinear, kernels, quantize_model
from optimum_bc.formats.activations import ActSpec, range_params
from optimum_bc.layers.int8_path import eligible
from optimum_bc.vision import build_image_calibration, load_images


PROCESSOR = {"size": {"shortest_edge": 32}, "crop_size": {"height": 28, "width": 28}}


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    """Smooth random colour images (a random walk along the rows) of 40 x 48 pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = np.cumsum(rng.random((40, 48, 3)), axis=1) / 48 * 255
        out.append(Image.fromarray(a.astype("uint8")))
    return out


def tiny_dinov2(seed: int = 0) -> Dinov2Model:
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=28, patch_size=7
    )
    return Dinov2Model(config).eval()


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=28,
        patch_size=7,
        num_labels=5,
    )
    return ViTForImageClassification(config).eval()


@pytest.fixture(scope="module")
def data() -> tuple[list, torch.Tensor]:
    processor = BitImageProcessor(**PROCESSOR)
    calib = build_image_calibration(_images(16), processor, 16)
    held = torch.cat([s["pixel_values"] for s in build_image_calibration(_images(8, seed=1), processor, 8)])
    return calib, held


def _error(model: torch.nn.Module, ref: torch.Tensor, pixels: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
    return float((out - ref).square().mean() / ref.square().mean())


def _cfg(**kwargs) -> BCQuantizationConfig:
    options = {"bits": 4, "group_size": -1, "method": "rtn", "act_bits": 4, "num_samples": 16, "batch_size": 4}
    return BCQuantizationConfig(**(options | kwargs))


@pytest.mark.usefixtures("one_thread")
def test_dinov2_blocks_quantized_errors_ordered_and_bc_helps(data) -> None:
    calib, held = data
    with torch.no_grad():
        ref = tiny_dinov2()(pixel_values=held).last_hidden_state
    errors = {}
    for name, kwargs in {
        "w8a8": {"bits": 8, "act_bits": 8},
        "w4a4": {},
        "w4a4_nobc": {"bias_compensation": False},
    }.items():
        model = tiny_dinov2()
        report = quantize_model(model, _cfg(**kwargs), calibration=calib)
        assert len(report.layers) == 2 * 6  # q, k, v, o, fc1, fc2 per block
        assert isinstance(model.encoder.layer[1].mlp.fc2, QuantLinear)
        assert model.encoder.layer[1].mlp.fc2.input_scale.shape == (1,)
        errors[name] = _error(model, ref, held)
    assert errors["w8a8"] < 1e-3
    assert errors["w4a4"] > 10 * errors["w8a8"]
    assert errors["w4a4"] < 0.8 * errors["w4a4_nobc"]


@pytest.mark.usefixtures("one_thread")
def test_erq_beats_gptq_at_w4a4(data) -> None:
    """The methods themselves (BC off: with it, auto races whole models, and on this random tiny backbone the two
    compensated models tie within 1 %)."""
    calib, held = data
    with torch.no_grad():
        ref = tiny_dinov2()(pixel_values=held).last_hidden_state
    errors = {}
    for method in ("gptq", "erq"):
        model = tiny_dinov2()
        quantize_model(model, _cfg(method=method, bias_compensation=False), calibration=calib)
        errors[method] = _error(model, ref, held)
    assert errors["erq"] < errors["gptq"]


@pytest.mark.usefixtures("one_thread")
def test_auto_race_ends_on_the_final_features_cls_included(data) -> None:
    """A backbone's race ends on the features it outputs: the normalised error after the final norm over every token,
    the CLS token included. The winner's score is that error of the finished model on the calibration images."""
    from optimum_bc.algorithms.bc_select import normalized_error

    calib, _ = data
    pixels = torch.cat([s["pixel_values"] for s in calib])
    with torch.no_grad():
        ref = tiny_dinov2()(pixel_values=pixels).last_hidden_state
    model = tiny_dinov2()
    report = quantize_model(model, _cfg(), calibration=calib)
    assert "final norm" in report.bc_summary
    last = report.blocks[-1].bc_scores
    chosen = min(last, key=last.get)
    assert all(b.bc_choice == chosen for b in report.blocks)
    with torch.no_grad():
        out = model(pixel_values=pixels).last_hidden_state
    width = out.shape[-1]
    every_token = float(normalized_error(out.reshape(-1, width), ref.reshape(-1, width)).mean()) / width
    assert every_token == pytest.approx(last[chosen], rel=1e-3)
    patches = normalized_error(out[:, 1:].reshape(-1, width), ref[:, 1:].reshape(-1, width)).mean() / width
    assert float(patches) != pytest.approx(last[chosen], rel=1e-3)  # the CLS token is scored


def test_erq_lambda_default_is_the_image_models_ridge(data) -> None:
    """``erq_lambda=None`` resolves to the image models' ridge when an image model is quantized (text: 0.01)."""
    from optimum_bc.algorithms.erq import TEXT_LAMBDA
    from optimum_bc.vision.calibrate import VISION_ERQ_LAMBDA

    calib, _ = data
    config = _cfg(method="erq", bias_compensation=False)
    assert config.erq_lambda is None
    quantize_model(tiny_dinov2(), config, calibration=calib[:4])
    assert config.erq_lambda == VISION_ERQ_LAMBDA > TEXT_LAMBDA
    assert BCQuantizationConfig.from_dict(config.to_dict()).erq_lambda == VISION_ERQ_LAMBDA


@pytest.mark.usefixtures("one_thread")
def test_position_granularity_is_a_token_table(data) -> None:
    calib, _ = data
    pixels = torch.cat([s["pixel_values"] for s in calib])
    with torch.no_grad():
        ref = tiny_dinov2()(pixel_values=pixels).last_hidden_state
    errors = {}
    for granularity in ("channel", "position"):
        model = tiny_dinov2()
        quantize_model(model, _cfg(bc_granularity=granularity), calibration=calib)
        errors[granularity] = _error(model, ref, pixels)
    assert model.encoder.layer[0].attention.q_proj.position_bias.shape == (17, 64)  # 16 patches + CLS
    # on the images it was fitted on, a bias per (token, channel) cancels more than one per channel
    assert errors["position"] < errors["channel"]


@pytest.mark.usefixtures("one_thread")
def test_cls_token_own_bias_lowers_the_error(data) -> None:
    """Token 0 (CLS) differs from the patch tokens: its own compensation bias (bc_sink_tokens=1) lowers the error of
    the held-out images' features, the CLS features most."""
    calib, held = data
    with torch.no_grad():
        ref = tiny_dinov2()(pixel_values=held).last_hidden_state
    errors = {}
    for sink in (0, 1):
        model = tiny_dinov2()
        quantize_model(model, _cfg(bc_sink_tokens=sink, bc_target="sequential"), calibration=calib)
        with torch.no_grad():
            out = model(pixel_values=held).last_hidden_state
        errors[sink] = [float((out - ref)[:, t].square().mean() / ref[:, t].square().mean()) for t in (slice(None), 0)]
    assert model.encoder.layer[0].mlp.fc1.sink_bias.shape == (1, 256)  # Dinov2 fc1: 4 x hidden
    assert errors[1][0] < errors[0][0], errors
    assert errors[1][1] < 0.9 * errors[0][1], errors


@pytest.mark.usefixtures("one_thread")
def test_vit_classifier_from_pretrained_with_images_save_reload_exact(tmp_path) -> None:
    tiny_vit().save_pretrained(tmp_path / "float")
    BitImageProcessor(**PROCESSOR).save_pretrained(tmp_path / "float")
    config = _cfg(bits=8, act_bits=8, method="gptq", dataset=_images(16))
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "float", quantization_config=config)
    assert isinstance(model.vit.layers[0].mlp.fc1, QuantLinear)
    # the CLS token (position 0) gets its own compensation bias; the reload must publish the positions again
    assert model.config.quantization_config.bc_sink_tokens == 1
    assert model.vit.layers[0].mlp.fc1.sink_bias.shape == (1, 128)
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "q")
    pixels = torch.cat(
        [s["pixel_values"] for s in build_image_calibration(_images(4, 3), BitImageProcessor(**PROCESSOR))]
    )
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


@pytest.mark.usefixtures("one_thread")
def test_dinov2_automodel_folder_of_images(tmp_path) -> None:
    tiny_dinov2().save_pretrained(tmp_path / "float")
    BitImageProcessor(**PROCESSOR).save_pretrained(tmp_path / "float")
    (tmp_path / "images").mkdir()
    for i, img in enumerate(_images(6)):
        img.save(tmp_path / "images" / f"{i}.png")
    config = _cfg(dataset=str(tmp_path / "images"), act_scale="percentile")
    model = AutoModel.from_pretrained(tmp_path / "float", quantization_config=config)
    assert model.quantization_report.calibration_tokens == 6 * 17


def test_bad_images_fail_before_calibration(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image.*Fix"):
        load_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="mode 'I;16'.*Fix"):
        load_images([Image.fromarray(np.zeros((32, 32), dtype=np.uint16))])
    with pytest.raises(ValueError, match="smaller than 16 pixels.*Fix"):
        load_images([Image.new("RGB", (8, 40))])
    with pytest.raises(ValueError, match="PIL image.*Fix"):
        load_images([Image.new("RGB", (32, 32)), np.zeros((32, 32, 3))])
    # a grey image is converted to RGB
    assert load_images([Image.new("L", (32, 32))])[0].mode == "RGB"


def test_vision_refusals_name_the_fix(tmp_path) -> None:
    tiny_dinov2().save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="needs calibration data. Fix.*folder of images"):
        AutoModel.from_pretrained(tmp_path / "float", quantization_config=_cfg())
    with pytest.raises(ValueError, match="bc_layer=True is not available for image models"):
        AutoModel.from_pretrained(tmp_path / "float", quantization_config=_cfg(bc_layer=True, dataset=_images(4)))


def test_int8_path_equals_the_simulated_path() -> None:
    torch.manual_seed(0)
    codes, zeros = torch.randint(0, 256, (48, 64)), torch.randint(100, 150, (48, 1))
    layer = QuantLinear.from_quantized(codes, torch.rand(48, 1) * 0.01, zeros, None, 8, -1, bias=torch.randn(48))
    x = torch.randn(3, 20, 64)
    for spec in (ActSpec(8, False, "tensor", False), ActSpec(8, False, "token", True)):
        params = (None, None) if spec.dynamic else range_params(x.min(), x.max(), spec)
        layer.set_input_quantizer(spec, *params)
        assert eligible(layer, x)
        with torch.no_grad():
            with kernels.use_backend("reference"):
                ref = layer(x)
            out = layer(x)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    layer.set_input_quantizer(ActSpec(4, False, "tensor", True))
    assert not eligible(layer, x)


@pytest.mark.slow
def test_real_dinov2_conversion_matches_onnxruntime() -> None:
    pytest.importorskip("onnxruntime")
    from optimum_bc.vision.dinov2_onnx import load_dinov2, onnxruntime_features

    model = load_dinov2()
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    assert np.abs(ours - onnxruntime_features(pixels.numpy())).max() < 1e-4


def test_hierarchical_swin_is_refused_before_calibration() -> None:
    from transformers import SwinConfig, SwinModel

    model = SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2]))
    calib = [{"pixel_values": torch.randn(1, 3, 32, 32)}]
    with pytest.raises(ValueError, match="model_type 'swin'.*input_dimensions.*Fix: use a plain ViT"):
        quantize_model(model, _cfg(), calibration=calib)


def test_top1_on_a_local_labelled_dataset_like_imagenet() -> None:
    """The ImageNet path's data plumbing (benchmarks/vision.py --imagenet) on a tiny local datasets.Dataset."""
    import datasets

    from optimum_bc.vision.evaluate import top1_accuracy

    model, processor = tiny_vit(), BitImageProcessor(**PROCESSOR)
    images = _images(10, seed=4) + [Image.new("L", (40, 48), 128)]  # a grey image is converted like calibration
    pixels = processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        predicted = model(pixel_values=pixels).logits.argmax(-1)
    labels = [int(p) if i % 3 else (int(p) + 1) % 5 for i, p in enumerate(predicted)]  # every third one wrong
    dataset = datasets.Dataset.from_dict({"image": images, "label": labels}).cast_column("image", datasets.Image())
    assert top1_accuracy(model, dataset, processor, batch_size=4) == pytest.approx(7 / 11)
    with pytest.raises(ValueError, match="no label column 'labels'.*Fix"):
        top1_accuracy(model, dataset, processor, label_column="labels")
