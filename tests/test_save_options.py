"""``save_pretrained(write_card=..., write_plot=...)``: README.md and layer_errors.png are written by default and each
can be left out; the weights reload the same either way."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc.integrations.metadata import CARD_FILENAME, PLOT_FILENAME

from .conftest import VOCAB, tiny_llama


pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(
        model, BCQuantizationConfig(bits=4, group_size=32, method="rtn", dataset=[{"input_ids": r} for r in ids])
    )
    return model.eval()


@pytest.mark.parametrize(
    ("options", "card", "plot"),
    [({}, True, True), ({"write_plot": False}, True, False), ({"write_card": False}, False, True)]
    + [({"write_card": False, "write_plot": False}, False, False)],
)
def test_card_and_plot_switches(model, tmp_path: Path, options: dict, card: bool, plot: bool) -> None:
    model.save_pretrained(tmp_path / "m", **options)
    folder = tmp_path / "m"
    assert (folder / CARD_FILENAME).is_file() is card
    assert (folder / PLOT_FILENAME).is_file() is plot
    if card:
        assert (PLOT_FILENAME in (folder / CARD_FILENAME).read_text()) is plot  # the card links only a plot it has
    x = torch.randint(0, VOCAB, (1, 8))
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
