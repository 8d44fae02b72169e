"""Shared fixtures: tiny random-weight OPT and LLaMA models built from configs (no Hub access needed)."""

from collections.abc import Iterator

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast


VOCAB = 128


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """``n`` inputs of width ``d`` with correlated channels of growing scale: where Hessian-aware methods beat RTN."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix * torch.linspace(0.2, 3.0, d)


def gram(A: torch.Tensor, B: torch.Tensor | None = None) -> torch.Tensor:
    """``2 AᵀB / N`` (``B = A`` by default): the GPTQ Hessian / COMQ Gram matrix, or ERQ's cross term."""
    return 2 * A.T @ (A if B is None else B) / A.shape[0]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls: one torch thread is much faster than two fighting a busy machine (opt in with usefixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, intermediate_size: int = 160) -> LlamaForCausalLM:
    """2-layer LLaMA with grouped-query attention and tied embeddings."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_opt(seed: int = 0, pre_ln: bool = True) -> OPTForCausalLM:
    """2-layer OPT (pre-LayerNorm like OPT-125M, or post-LayerNorm like OPT-350M)."""
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
        do_layer_norm_before=pre_ln,
    )
    return OPTForCausalLM(config).eval()


@pytest.fixture(params=["llama", "opt"])
def tiny_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved tiny float model of each family."""
    model = tiny_llama() if request.param == "llama" else tiny_opt()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture
def calib_ids() -> torch.Tensor:
    """Pre-tokenized calibration windows (16 x 32 random tokens)."""
    return torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(1))


TEXTS = [f"sentence {i} tells how the quick brown fox jumps over {i % 7} lazy dogs near the river." for i in range(60)]


@pytest.fixture(scope="session")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained in memory on ``TEXTS`` (ids < VOCAB): offline and a real HF tokenizer."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(TEXTS, trainer=trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
