"""The quantizer's capability flags are honest: each one is backed by the thing it claims working on a tiny model."""

import pytest
import torch

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc.layers import kernels

from .conftest import VOCAB, tiny_llama


def _packed_model() -> torch.nn.Module:
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = BCQuantizationConfig(bits=4, group_size=32, method="rtn", dataset=[{"input_ids": row} for row in ids])
    quantize_model(model, cfg)
    return model.eval()


def test_flags() -> None:
    quantizer = _packed_model().hf_quantizer
    assert quantizer.is_serializable() is True
    assert quantizer.is_trainable is True
    assert quantizer.is_compileable is True


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_compiled_packed_model_matches_eager(backend: str) -> None:
    """``is_compileable``: torch.compile of a packed model's forward runs and gives the eager logits, on the exact
    path and on the default one (packed CPU kernels where the torch build has them)."""
    model = _packed_model()
    x = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad(), kernels.use_backend(backend):
        eager = model(x).logits
        compiled = torch.compile(model, backend="aot_eager")(x).logits
    assert compiled.shape == eager.shape == (1, 8, VOCAB)
    assert (compiled - eager).abs().max() <= 1e-4 * eager.abs().max()
