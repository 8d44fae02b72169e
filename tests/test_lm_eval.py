"""lm-eval adapter: lm-eval's scores of our (quantized) models equal a direct computation; CLI and bad input."""

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from optimum_bc import BCQuantizationConfig, quantize_model
from optimum_bc.cli import main
from optimum_bc.integrations.lm_eval import evaluate_tasks, format_results, lm_eval_model

from .conftest import TEXTS, VOCAB, tiny_llama


pytest.importorskip("lm_eval")

TASK = "tiny_cloze"
DOCS = [
    {"context": f"sentence {i} tells how the quick brown", "choices": ["fox", "dogs", "river"], "label": i % 3}
    for i in range(6)
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer with an eos token (lm-eval scores continuations after it)."""
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]", "</s>"])
    backend.train_from_iterator(TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A multiple-choice lm-eval task defined in YAML over a local JSON-lines file (offline)."""
    path = tmp_path_factory.mktemp("tasks")
    (path / "data.jsonl").write_text("\n".join(json.dumps(d) for d in DOCS))
    (path / "tiny_cloze.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {path / 'data.jsonl'}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return str(path)


def direct_logliks(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, doc: dict) -> list[float]:
    """Sum of log p(choice tokens | context) for each choice, computed directly from the logits."""
    context = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
    scores = []
    for choice in doc["choices"]:
        cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        scores.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(cont)))
    return scores


@pytest.fixture(scope="module")
def quantized(tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    model = tiny_llama()
    calibration = [
        {"input_ids": torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(i))} for i in range(8)
    ]
    quantize_model(model, BCQuantizationConfig(bits=3, method="gptq", num_samples=8, seq_len=32), calibration)
    return model


def test_scores_of_quantized_model_equal_direct_computation(quantized, tokenizer, task_dir):
    results = evaluate_tasks(quantized, tokenizer, [TASK], include_path=task_dir, log_samples=True)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    correct = 0
    for sample, doc in zip(samples, DOCS, strict=True):
        got = [float(r[0]) for r in sample["filtered_resps"]]
        expected = direct_logliks(quantized, tokenizer, doc)
        assert got == pytest.approx(expected, abs=1e-4)
        correct += int(max(range(3), key=lambda i: expected[i]) == doc["label"])
    assert results["results"][TASK]["acc,none"] == pytest.approx(correct / len(DOCS))
    assert TASK in format_results(results)


def test_limit_scores_only_first_documents(quantized, tokenizer, task_dir):
    results = evaluate_tasks(quantized, tokenizer, [TASK], include_path=task_dir, limit=2, log_samples=True)
    assert len(results["samples"][TASK]) == 2


def test_cli_lm_eval_on_saved_quantized_folder(quantized, tokenizer, task_dir, tmp_path, capsys):
    folder = tmp_path / "q"
    quantized.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "results.json"
    code = main(["lm-eval", str(folder), "--tasks", TASK, "--include-path", task_dir, "--output", str(out), "--quiet"])
    assert code == 0
    assert "acc" in capsys.readouterr().out
    reloaded = json.loads(out.read_text())["results"][TASK]["acc,none"]
    expected = evaluate_tasks(quantized, tokenizer, [TASK], include_path=task_dir)["results"][TASK]["acc,none"]
    assert reloaded == pytest.approx(expected)


def test_unknown_task_and_missing_folder_fail_before_scoring(quantized, tokenizer, task_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        evaluate_tasks(quantized, tokenizer, ["no_such_task_xyz"], include_path=task_dir)
    with pytest.raises(ValueError, match="not a folder"):
        evaluate_tasks(quantized, tokenizer, [TASK], include_path=os.path.join(tmp_path, "missing"))
    with pytest.raises(ValueError, match="no lm-eval task"):
        evaluate_tasks(quantized, tokenizer, [])


def test_tokenizer_without_eos_or_bos_is_refused(quantized):
    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="neither an eos nor a bos"):
        lm_eval_model(quantized, bare)


def test_cli_lm_eval_argument_errors(tmp_path, capsys):
    assert main(["lm-eval", str(tmp_path), "--tasks", " , "]) == 2
    assert "--tasks is empty" in capsys.readouterr().err
    assert main(["lm-eval", str(tmp_path), "--tasks", TASK, "--limit", "0"]) == 2
    assert main(["lm-eval", str(tmp_path), "--tasks", TASK, "--include-path", str(tmp_path / "nope")]) == 2
    assert main(["lm-eval", str(tmp_path)]) == 2
