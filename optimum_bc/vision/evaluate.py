"""Top-1 accuracy of an image classifier on a labelled ``datasets.Dataset`` (e.g. the imagenet-1k validation split),
and the fidelity of a quantized backbone's features to the float model's (for data without labels)."""

import math
from typing import Any

import torch

from .data import _image_column, load_images


def _label_column(dataset: Any, label_column: str) -> str:
    if label_column not in dataset.column_names:
        raise ValueError(
            f"dataset: no label column {label_column!r} among {dataset.column_names}. Fix: pass label_column= the "
            "column holding the class indices"
        )
    return label_column


@torch.no_grad()
def top1_accuracy(
    model: torch.nn.Module, dataset: Any, processor: Any, batch_size: int = 32, label_column: str = "label"
) -> float:
    """Fraction of ``dataset``'s images whose arg-max logit is their label (images checked and converted to RGB as
    for calibration; the labels index the model's classes)."""
    column = _image_column(dataset)
    label_column = _label_column(dataset, label_column)
    if column is None or len(dataset) == 0:
        raise ValueError(
            f"dataset: no images (columns {dataset.column_names}). Fix: pass a dataset with an image column"
        )
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(dataset), batch_size):
        part = dataset[start : start + batch_size]
        images = load_images(list(part[column]))
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device, model.dtype)
        predicted = model(pixel_values=pixels).logits.argmax(-1).cpu()
        correct += int((predicted == torch.as_tensor(part[label_column])).sum())
    return correct / len(dataset)


def fidelity(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Closeness of features ``out`` to the float model's ``ref`` (both ``[images, tokens, dim]``): mean cosine of
    the CLS features, SQNR (dB) of all token features, and the fraction of images whose nearest neighbour (cosine of
    CLS features, among the other images) is the same."""
    cls_ref, cls_out = ref[:, 0].float(), out[:, 0].float()
    cos = torch.nn.functional.cosine_similarity(cls_ref, cls_out, dim=-1).mean()
    sqnr = 10 * math.log10(float(ref.float().square().sum() / (out.float() - ref.float()).square().sum()))

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x, dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-2)
        return sim.argmax(-1)

    agree = (neighbours(cls_ref) == neighbours(cls_out)).float().mean()
    return {"cos": round(float(cos), 5), "sqnr_db": round(sqnr, 2), "nn_agree": round(float(agree), 4)}
