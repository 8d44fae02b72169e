"""The calibration progress bar: transformers' tqdm (its switches hide it), one bar, labelled with the block being
worked on (set before its work) while the counter shows the blocks done."""

import re
from collections.abc import Iterator

import pytest
import torch
from transformers.utils import logging as hf_logging

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc.calibration import calibrator

from .conftest import VOCAB, tiny_llama


def _quantize() -> int:
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(
        model, BCQuantizationConfig(bits=4, group_size=32, method="rtn", dataset=[{"input_ids": r} for r in ids])
    )
    return model.config.num_hidden_layers


@pytest.fixture
def bars_on() -> Iterator[None]:
    was_on, ours = hf_logging.is_progress_bar_enabled(), calibrator._progress_bars
    hf_logging.enable_progress_bar()
    calibrator.set_progress_bars(True)
    yield
    calibrator.set_progress_bars(ours)
    if not was_on:
        hf_logging.disable_progress_bar()


def test_one_bar_labelled_with_the_block_in_progress(bars_on, capsys: pytest.CaptureFixture) -> None:
    blocks = _quantize()
    frames = [f for f in re.split(r"[\r\n]", capsys.readouterr().err) if "optimum-bc" in f]
    labelled = [(int(m.group(1)), int(m.group(2))) for f in frames if (m := re.search(r"layers\.(\d+):.*?(\d+)/", f))]
    assert {block for block, _ in labelled} == set(range(blocks))
    # the label names a block from before its work starts (counter = blocks done) until it is counted
    assert {block for block, done in labelled if done == block} == set(range(blocks))
    assert all(done in (block, block + 1) for block, done in labelled)
    assert re.search(rf"\b{blocks}/{blocks}\b", frames[-1])
    assert all(re.search(r"\d+/(\d+)", f).group(1) == str(blocks) for f in frames)  # one bar, one total


def test_transformers_switch_hides_the_bar(bars_on, capsys: pytest.CaptureFixture) -> None:
    hf_logging.disable_progress_bar()
    _quantize()
    assert "optimum-bc" not in capsys.readouterr().err
