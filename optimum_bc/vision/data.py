"""Image calibration data: a folder of images, a list of PIL images or a ``datasets.Dataset`` with an image column,
turned into ``pixel_values`` by the model's image processor.

Every image is checked before any model runs: 8-bit modes (RGB, RGBA, L, LA, P, CMYK, YCbCr) are converted to RGB;
high-bit-depth or binary modes, images smaller than ``MIN_SIDE`` pixels and empty sources are refused with the fix.
"""

import os
import random
from pathlib import Path
from typing import Any

import torch


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
#: Modes converted to RGB; others (16-bit "I;16", 32-bit "I" / "F", binary "1") need the user's own scaling.
CONVERTIBLE_MODES = ("RGB", "RGBA", "L", "LA", "P", "CMYK", "YCbCr")
MIN_SIDE = 16
#: The image processor used when the model folder has none: DINOv2's (resize the short side to 256 bicubic, centre
#: crop 224, ImageNet mean and std).
DEFAULT_PROCESSOR = {
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


def _is_pil(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def is_image_source(source: Any) -> bool:
    """Whether ``source`` is an image calibration source (a folder holding images, PIL images, an image dataset)."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        return path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
    if isinstance(source, list | tuple):
        return bool(source) and all(_is_pil(x) for x in source)
    return hasattr(source, "column_names") and _image_column(source) is not None


def _image_column(dataset: Any) -> str | None:
    features = getattr(dataset, "features", None) or {}
    for name in dataset.column_names:
        if type(features.get(name)).__name__ == "Image":
            return name
    for name in ("image", "img", "pixel_values"):
        if name in dataset.column_names:
            return name
    return None


def _checked(image: Any, where: str) -> Any:
    if not _is_pil(image):
        raise ValueError(f"{where}: expected a PIL image, got {type(image).__name__}. Fix: pass PIL.Image objects")
    if image.mode not in CONVERTIBLE_MODES:
        raise ValueError(
            f"{where}: image mode {image.mode!r} is not an 8-bit colour or grey mode ({', '.join(CONVERTIBLE_MODES)})."
            " Fix: scale it to 8 bits and convert it, e.g. Image.fromarray((a / a.max() * 255).astype('uint8'))"
            ".convert('RGB')"
        )
    if min(image.size) < MIN_SIDE:
        raise ValueError(
            f"{where}: image of {image.size[0]}x{image.size[1]} pixels is smaller than {MIN_SIDE} pixels on a side. "
            "Fix: leave out thumbnails and icons, or upscale them first"
        )
    return image.convert("RGB")


def load_images(source: Any) -> list:
    """RGB PIL images of ``source`` (folder sorted by name, list, or dataset image column), each checked."""
    from PIL import Image

    if isinstance(source, str | os.PathLike):
        folder = Path(source)
        if not folder.is_dir():
            raise ValueError(f"dataset={os.fspath(source)!r}: no such folder. Fix: pass a folder of images")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(
                f"dataset={os.fspath(source)!r}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)}). Fix: put "
                "calibration images in it or pass another folder"
            )
        images = []
        for f in files:
            with Image.open(f) as img:
                img.load()
                images.append(_checked(img, str(f)))
        return images
    if isinstance(source, list | tuple):
        if not source:
            raise ValueError("dataset=[]: no calibration images. Fix: pass at least one PIL image")
        return [_checked(img, f"dataset[{i}]") for i, img in enumerate(source)]
    if hasattr(source, "column_names"):
        column = _image_column(source)
        if column is None:
            raise ValueError(
                f"dataset: no image column among {source.column_names}. Fix: cast one with "
                "dataset.cast_column(name, datasets.Image())"
            )
        if len(source) == 0:
            raise ValueError("dataset: the datasets.Dataset is empty. Fix: pass a dataset with images")
        return [_checked(img, f"dataset[{i}][{column!r}]") for i, img in enumerate(source[column])]
    raise ValueError(
        f"dataset of type {type(source).__name__} is not an image source. Fix: pass a folder of images, a list of "
        "PIL images or a datasets.Dataset with an image column"
    )


def image_processor(name_or_path: str | None) -> Any:
    """The model folder's image processor, else :data:`DEFAULT_PROCESSOR` (a ``BitImageProcessor``)."""
    from transformers import AutoImageProcessor, BitImageProcessor

    if name_or_path:
        try:
            return AutoImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError):
            pass
    return BitImageProcessor(**DEFAULT_PROCESSOR)


def build_image_calibration(
    source: Any, processor: Any = None, num_samples: int = 128, seed: int = 0, name_or_path: str | None = None
) -> list[dict[str, torch.Tensor]]:
    """Up to ``num_samples`` images of ``source`` (a seeded random choice when there are more), one
    ``{"pixel_values": [1, 3, H, W]}`` each."""
    images = load_images(source)
    if len(images) > num_samples:
        images = random.Random(seed).sample(images, num_samples)
    processor = processor if processor is not None else image_processor(name_or_path)
    return [{"pixel_values": processor(images=img, return_tensors="pt")["pixel_values"]} for img in images]
