"""Tests for optimum_bc.data: calibration sources, the wiki-vital split, determinism and error messages."""

import logging
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from optimum_bc.data import calibration_data as data
from optimum_bc.data import hub_text
from optimum_bc.data.calibration_data import (
    KNOWN_DATASETS,
    build_calibration_set,
    describe_dataset,
    load_evaluation_text,
    wiki_vital_articles,
)


DOCS = [f"document {i} says the quick brown fox jumps over the lazy dog {i} times." for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained in memory: fast, offline, and a real transformers tokenizer."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=200, special_tokens=["[UNK]", "[PAD]"])
    backend.train_from_iterator(DOCS + ["the of and in a is was to"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def assert_samples(samples: list[dict[str, torch.Tensor]], num_samples: int, seq_len: int) -> None:
    """Every sample is a [1, seq_len] LongTensor pair with a full attention mask."""
    assert len(samples) == num_samples
    for sample in samples:
        assert set(sample) == {"input_ids", "attention_mask"}
        assert sample["input_ids"].shape == (1, seq_len)
        assert sample["input_ids"].dtype == torch.long
        assert torch.equal(sample["attention_mask"], torch.ones(1, seq_len, dtype=torch.long))


def test_known_datasets_include_offline_corpus() -> None:
    assert "wiki-vital" in KNOWN_DATASETS
    assert {"wikitext2", "c4", "ptb"} <= set(KNOWN_DATASETS)


def test_wiki_vital_calibration_shapes(tokenizer: PreTrainedTokenizerFast) -> None:
    samples = build_calibration_set("wiki-vital", tokenizer, num_samples=4, seq_len=64, seed=0)
    assert_samples(samples, 4, 64)
    # the text is real: most words are not the unknown token of this tiny vocabulary, but ids stay in range
    assert all(int(s["input_ids"].max()) < len(tokenizer) for s in samples)


def test_wiki_vital_split_is_disjoint_and_deterministic() -> None:
    calibration = wiki_vital_articles("calibration")
    evaluation = wiki_vital_articles("evaluation")
    assert not set(calibration) & set(evaluation)
    assert len(calibration) + len(evaluation) == 10033
    assert len(calibration) == int(0.8 * 10033)
    titles = list(calibration) + list(evaluation)
    assert titles == sorted(titles)
    assert load_evaluation_text("wiki-vital") == "\n\n".join(evaluation.values())
    source = data._calibration_source("wiki-vital")
    calibration_text = source.read(0, source.size)
    assert not any(extract in calibration_text for extract in list(evaluation.values())[::20])


def test_sampling_is_deterministic(tokenizer: PreTrainedTokenizerFast) -> None:
    def windows(seed: int) -> list[list[int]]:
        samples = build_calibration_set(DOCS, tokenizer, num_samples=8, seq_len=16, seed=seed)
        return [s["input_ids"][0].tolist() for s in samples]

    assert windows(0) == windows(0)
    assert windows(0) != windows(1)


def test_windows_come_from_the_token_stream(tokenizer: PreTrainedTokenizerFast) -> None:
    stream = tokenizer("\n\n".join(DOCS), add_special_tokens=False)["input_ids"]
    samples = build_calibration_set(DOCS, tokenizer, num_samples=5, seq_len=12, seed=3)
    assert_samples(samples, 5, 12)
    for sample in samples:
        window = sample["input_ids"][0].tolist()
        assert any(stream[i : i + 12] == window for i in range(len(stream) - 11))


def test_text_exactly_seq_len_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    samples = build_calibration_set(["a b c d"], tokenizer, num_samples=2, seq_len=4)
    assert_samples(samples, 2, 4)


def test_local_file_and_folder(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    (tmp_path / "a.txt").write_text("\n".join(DOCS[:20]), encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(DOCS[20:]), encoding="utf-8")
    (tmp_path / "ignored.json").write_text("{}", encoding="utf-8")
    from_file = build_calibration_set(str(tmp_path / "a.txt"), tokenizer, num_samples=3, seq_len=20)
    from_folder = build_calibration_set(tmp_path, tokenizer, num_samples=3, seq_len=20)
    assert_samples(from_file, 3, 20)
    assert_samples(from_folder, 3, 20)
    assert load_evaluation_text(tmp_path) == "\n".join(DOCS[:20]) + "\n\n" + "\n".join(DOCS[20:])
    assert describe_dataset(str(tmp_path / "a.txt")) == "local:a.txt"
    assert describe_dataset(str(tmp_path) + "/") == f"local:{tmp_path.name}"


def test_list_of_strings_and_hf_dataset(tokenizer: PreTrainedTokenizerFast) -> None:
    import datasets

    from_list = build_calibration_set(DOCS, tokenizer, num_samples=3, seq_len=10, seed=5)
    from_dataset = build_calibration_set(
        datasets.Dataset.from_dict({"text": DOCS}), tokenizer, num_samples=3, seq_len=10, seed=5
    )
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(from_list, from_dataset, strict=True))
    assert describe_dataset(datasets.Dataset.from_dict({"text": DOCS})) == "datasets.Dataset:40"
    with pytest.raises(ValueError, match="no 'text' column"):
        build_calibration_set(datasets.Dataset.from_dict({"body": DOCS}), tokenizer, num_samples=1, seq_len=4)


def test_describe_list_never_holds_text() -> None:
    description = describe_dataset(["secret text one", "secret two"])
    assert description.startswith("list[str]:2 texts:sha256=")
    assert len(description.split("sha256=")[1]) == 12
    assert "secret" not in description
    assert description != describe_dataset(["secret text one", "secret three"])
    assert describe_dataset("WIKI-VITAL") == "wiki-vital"
    assert describe_dataset(torch.zeros(3, 5, dtype=torch.long)) == "pretokenized:3"


def test_pretokenized_tensor_and_lists() -> None:
    ids = torch.arange(40).reshape(4, 10)
    samples = build_calibration_set(ids, None, num_samples=2, seq_len=6)
    assert len(samples) == 2
    assert torch.equal(samples[1]["input_ids"], ids[1:2, :6])
    assert torch.equal(samples[1]["attention_mask"], torch.ones(1, 6, dtype=torch.long))
    lists = build_calibration_set([[1, 2, 3], [4, 5, 6, 7]], None, num_samples=2, seq_len=8)
    assert [s["input_ids"][0].tolist() for s in lists] == [[1, 2, 3], [4, 5, 6, 7]]


def test_pretokenized_padding_kept(caplog: pytest.LogCaptureFixture) -> None:
    right = {"input_ids": [5, 6, 7, 0, 0], "attention_mask": [1, 1, 1, 0, 0]}
    left = {"input_ids": torch.tensor([[0, 0, 5, 6, 7]]), "attention_mask": torch.tensor([[0, 0, 1, 1, 1]])}
    with caplog.at_level(logging.WARNING, logger="optimum_bc.data"):
        samples = build_calibration_set([right, left], None, num_samples=3, seq_len=5)
    assert "Only 2 pre-tokenized samples" in caplog.text
    assert samples[0]["attention_mask"].tolist() == [[1, 1, 1, 0, 0]]
    assert samples[1]["input_ids"].tolist() == [[0, 0, 5, 6, 7]]
    truncated = build_calibration_set([right, left], None, num_samples=2, seq_len=3)
    assert truncated[0]["input_ids"].tolist() == [[5, 6, 7]]
    assert truncated[1]["input_ids"].tolist() == [[5, 6, 7]]
    assert truncated[1]["attention_mask"].tolist() == [[1, 1, 1]]


@pytest.mark.parametrize(
    ("dataset", "match"),
    [
        ("no/such/folder", "no such file or folder"),
        ("missing.txt", "no such file or folder"),
        ("wikitext103", "unknown dataset name 'wikitext103'; known names: wikitext2"),
        ([""], "empty"),
        (["   "], "empty"),
        ([], "empty list"),
        (42, "unsupported dataset type int"),
        (torch.arange(5), r"shape \[N, T\]"),
        (torch.ones(2, 3), "integer token ids"),
        ([{"ids": [1, 2]}], "no 'input_ids'"),
        ([{"input_ids": [1, 2], "attention_mask": [0, 0]}], "all padding"),
    ],
    ids=[
        "bad-path",
        "bad-txt",
        "unknown-name",
        "empty",
        "blank",
        "empty-list",
        "wrong-type",
        "1d-tensor",
        "float-tensor",
        "no-input-ids",
        "all-padding",
    ],
)
def test_bad_sources_raise(dataset: object, match: str, tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=match):
        build_calibration_set(dataset, tokenizer, num_samples=1, seq_len=4)


def test_empty_folder_raises(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="no .txt files"):
        build_calibration_set(tmp_path, tokenizer, num_samples=1, seq_len=4)


def test_too_short_text_names_token_count(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="only 3 tokens, fewer than seq_len=8"):
        build_calibration_set(["the lazy dog"], tokenizer, num_samples=1, seq_len=8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0, "seq_len": 8}, "num_samples must be an int >= 1"),
        ({"num_samples": 2.0, "seq_len": 8}, "num_samples must be an int >= 1"),
        ({"num_samples": 1, "seq_len": 1}, "seq_len must be an int >= 2"),
    ],
    ids=["zero-samples", "float-samples", "seq-len-1"],
)
def test_bad_sizes_raise(kwargs: dict[str, object], match: str, tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=match):
        build_calibration_set(DOCS, tokenizer, **kwargs)


def test_text_source_needs_tokenizer() -> None:
    with pytest.raises(ValueError, match=r"pass tokenizer=\.\.\."):
        build_calibration_set(DOCS, None, num_samples=1, seq_len=4)


@pytest.mark.parametrize("name", ["wikitext2", "c4", "ptb"])
def test_hub_name_fails_fast_offline(
    name: str, monkeypatch: pytest.MonkeyPatch, tokenizer: PreTrainedTokenizerFast
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_text, "hub_reachable", lambda: pytest.fail("offline mode must not probe the Hub"))
    start = time.monotonic()
    with pytest.raises(ValueError, match="wiki-vital"):
        build_calibration_set(name, tokenizer, num_samples=1, seq_len=8)
    with pytest.raises(ValueError, match="wiki-vital"):
        load_evaluation_text(name)
    assert time.monotonic() - start < 10


def test_unreachable_hub_probe_skips_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without offline mode, an unreachable Hub is detected by one probe and only the cache is tried."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_text, "hub_reachable", lambda: False)
    with pytest.raises(ValueError, match="Hub is unreachable.*wiki-vital"):
        load_evaluation_text("wikitext2")


@pytest.mark.slow
def test_wiki_vital_with_smollm2_tokenizer() -> None:
    from transformers import AutoTokenizer

    from optimum_bc.data.packaged import packaged_model_dir

    smol = AutoTokenizer.from_pretrained(packaged_model_dir())
    samples = build_calibration_set("wiki-vital", smol, num_samples=8, seq_len=512, seed=0)
    assert_samples(samples, 8, 512)
    again = build_calibration_set("wiki-vital", smol, num_samples=8, seq_len=512, seed=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(samples, again, strict=True))
    text = smol.decode(samples[0]["input_ids"][0])
    assert len(text.split()) > 200  # real English prose, not unknown tokens


class _CountingTokenizer:
    """Wraps a tokenizer and counts the characters it was asked to tokenize."""

    def __init__(self, inner: PreTrainedTokenizerFast) -> None:
        self.inner, self.chars, self.calls = inner, 0, 0

    def __call__(self, text: str, **kwargs: object) -> object:
        self.chars, self.calls = self.chars + len(text), self.calls + 1
        return self.inner(text, **kwargs)


def test_large_text_is_read_and_tokenized_only_around_the_windows(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(DOCS * 200), encoding="utf-8")  # ~500 KB
    monkeypatch.setattr(data, "STREAM_THRESHOLD", 10_000)
    counting = _CountingTokenizer(tokenizer)
    samples = build_calibration_set(str(path), counting, num_samples=6, seq_len=24, seed=4)
    assert_samples(samples, 6, 24)
    assert counting.chars < path.stat().st_size / 50  # a few spans, not the corpus
    stream = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
    text_of = {tuple(stream[i : i + 24]) for i in range(len(stream) - 23)}
    assert all(tuple(s["input_ids"][0].tolist()) in text_of for s in samples)  # real windows of the text
    again = build_calibration_set(str(path), tokenizer, num_samples=6, seq_len=24, seed=4)
    other = build_calibration_set(str(path), tokenizer, num_samples=6, seq_len=24, seed=5)
    assert [s["input_ids"].tolist() for s in samples] == [s["input_ids"].tolist() for s in again]
    assert [s["input_ids"].tolist() for s in samples] != [s["input_ids"].tolist() for s in other]
    assert len({tuple(s["input_ids"][0].tolist()) for s in samples}) == 6  # no duplicates


def test_more_windows_than_the_text_holds_warns(
    tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="optimum_bc.data"):
        build_calibration_set(DOCS[:2], tokenizer, num_samples=8, seq_len=10)
    assert "num_samples=8 windows of seq_len=10 tokens need 80 tokens but the text holds 30" in caplog.text


def test_non_utf8_file_is_named(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait ".encode("latin-1") * 10)
    with pytest.raises(ValueError, match=r"dataset='.*latin1.txt': '.*latin1.txt' is not UTF-8 text"):
        build_calibration_set(str(path), tokenizer, num_samples=1, seq_len=4)


def test_dataset_errors_name_the_argument(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=r"^dataset='wikitext103': unknown dataset name"):
        build_calibration_set("wikitext103", tokenizer, num_samples=1, seq_len=4)
    with pytest.raises(ValueError, match=r"^dataset=<list of 0>: the calibration dataset is an empty list"):
        build_calibration_set([], tokenizer, num_samples=1, seq_len=4)
