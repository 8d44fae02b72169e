"""Model card + Hub upload: cards parsed back with ModelCard.load, uploads sent to a local fake Hub.

The Hub is unreachable from CI, so the public ``huggingface_hub`` client talks to a small HTTP server started in the
test (``huggingface_hub.constants.ENDPOINT`` points at it), which records every request and decodes the NDJSON commit.
"""

import base64
import copy
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import CommitOperationAdd, ModelCard
from transformers import AutoModelForCausalLM

from optimum_bc import BCQuantizationConfig
from optimum_bc.cli import main
from optimum_bc.integrations.hub import (
    PLOT_FILENAME,
    Provenance,
    PushError,
    commit_operations,
    hub_id_of,
    is_generated_card,
    load_provenance,
    push_folder,
    record_evaluation,
)

from .conftest import TEXTS, VOCAB, tiny_llama, tiny_opt


BASE_ID = "tiny-org/tiny-llama"
BASE_CARD = """---
license: apache-2.0
language:
- en
tags:
- tiny
---
# Tiny LLaMA

A random two-layer model for tests.

## Usage

```python
# a comment, not a heading
print("hi")
```
"""


# --------------------------------------------------------------------------------------------------- fake Hub


class FakeHub:
    """Records requests; answers like the Hub for create_repo, branch, validate-yaml, preupload and commit."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.commits: list[dict[str, Any]] = []
        self.fail_commit = False
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                hub.requests.append(
                    {"method": "POST", "path": path, "query": self.path.partition("?")[2], "body": body,
                     "auth": self.headers.get("Authorization")}
                )  # fmt: skip
                if path == "/api/repos/create":
                    data = json.loads(body)
                    repo = f"{data['organization']}/{data['name']}"
                    return self._json(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})
                if path == "/api/validate-yaml":
                    front = json.loads(body)["content"].split("---")[1]
                    yaml.safe_load(front)  # raises -> 500 if our card's YAML were invalid
                    return self._json(200, {})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
                if match and match.group(2) == "preupload":
                    files = json.loads(body)["files"]
                    answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._json(200, {"files": answer})
                if match and match.group(2) == "branch":
                    return self._json(200, {})
                if match and match.group(2) == "commit":
                    if hub.fail_commit:
                        return self._json(500, {"error": "storage backend unavailable"})
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    files = {
                        x["value"]["path"]: base64.b64decode(x["value"]["content"])
                        for x in lines
                        if x["key"] == "file"
                    }
                    header = next(x["value"] for x in lines if x["key"] == "header")
                    hub.commits.append(
                        {"repo": match.group(1), "revision": match.group(3), "files": files, "header": header}
                    )
                    return self._json(200, {"commitUrl": f"{hub.url}/{match.group(1)}/commit/{'a' * 40}",
                                            "commitOid": "a" * 40, "pullRequestUrl": None})  # fmt: skip
                return self._json(404, {"error": f"not faked: {path}"})

            def do_GET(self) -> None:  # noqa: N802
                hub.requests.append({"method": "GET", "path": self.path, "body": b"", "auth": None})
                self._json(404, {"error": "not faked"})

            def _json(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    from huggingface_hub import constants

    hub = FakeHub()
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    yield hub
    hub.server.shutdown()


# --------------------------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float model in huggingface_hub's cache layout (so its Hub id is known) with a model card."""
    path = tmp_path_factory.mktemp("cache") / f"models--{BASE_ID.replace('/', '--')}" / "snapshots" / "0123abcd"
    tiny_llama().save_pretrained(path)
    (path / "README.md").write_text(BASE_CARD)
    return path


@pytest.fixture(scope="module")
def quantized(base_dir: Path) -> Any:
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = BCQuantizationConfig(
        bits=3, group_size=32, method="rtn", dataset=ids, num_samples=8, seq_len=32, seed=7, bc_target="sequential"
    )
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=cfg)
    record_evaluation(model, "wikitext2", 23.456789, seq_len=32, max_samples=4)
    return model


@pytest.fixture(scope="module")
def saved(quantized: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "tiny-llama-bc-3bit"
    quantized.save_pretrained(path)
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------------- card


def test_provenance_recorded_at_quantization(quantized: Any) -> None:
    prov = quantized.quantization_provenance
    assert prov.base_model == BASE_ID
    assert prov.base_model_card == BASE_CARD
    assert set(prov.versions) >= {"optimum-bc", "transformers", "torch", "huggingface_hub"}
    assert prov.quantized_at and prov.evaluations[0]["value"] == pytest.approx(23.456789)


def test_save_pretrained_writes_a_valid_card_with_every_field(quantized: Any, saved: Path) -> None:
    readme = (saved / "README.md").read_text()
    assert is_generated_card(readme)
    front = yaml.safe_load(readme.split("---")[1])  # plain YAML, independent of huggingface_hub
    card = ModelCard.load(saved / "README.md")
    data = card.data
    assert front == data.to_dict()
    assert data.base_model == BASE_ID
    assert data.base_model_relation == "quantized"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.license == "apache-2.0" and data.language == ["en"]  # carried over from the base card
    assert data.tags[:5] == ["optimum-bc", "bias-compensation", "rtn", "3-bit", "quantized"]
    assert data.datasets is None  # pre-tokenized calibration ids have no Hub dataset
    assert data.model_name == "tiny-llama-bc-3bit"
    (result,) = data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_config, result.dataset_split) == (
        "text-generation",
        "Salesforce/wikitext",
        "wikitext-2-raw-v1",
        "test",
    )
    assert (result.metric_type, result.metric_value, result.metric_args) == (
        "perplexity",
        23.4568,
        {"seq_len": 32, "max_samples": 4},
    )
    text = card.text
    assert 'import optimum_bc  # registers quant_method="bc"' in text
    assert 'from_pretrained("tiny-llama-bc-3bit")' in text
    for row in (
        '| `method` | `"rtn"` |',
        "| `bits` | `3` |",
        "| `group_size` | `32` |",
        f'| `bc_target` | `"{quantized.config.quantization_config.bc_target}"` |',
    ):
        assert row in text
    for row in ("| dataset | `pretokenized:8` |", "| samples | 8 windows of 32 tokens |", "| seed | 7 |"):
        assert row in text
    assert "| tokens seen | 256 |" in text
    assert f"transformers {quantized.quantization_provenance.versions['transformers']}" in text
    assert (
        "| `wikitext2` (WikiText-2, Salesforce/wikitext/wikitext-2-raw-v1) | perplexity | 23.4568 | 32 | 4 |" in text
    )
    for layer in quantized.quantization_report.layers:
        assert f"| `{layer.name}` | {layer.block} |" in text
    assert "| `q_proj` | 2 |" in text and "BC lowered the error of 14 of 14" in text
    assert f"]({PLOT_FILENAME})" in text
    assert (saved / PLOT_FILENAME).read_bytes().startswith(b"\x89PNG")
    # the base model's card is kept as a section, headings nested under ours, code comments untouched
    assert f"## Original model card ({BASE_ID})" in text
    assert "### Tiny LLaMA" in text and "#### Usage" in text and "# a comment, not a heading" in text
    assert "license: apache-2.0" not in text  # its front matter merged into ours, not pasted


def test_reload_restores_report_and_provenance_and_resaves_the_same_card(
    quantized: Any, saved: Path, tmp_path: Path
) -> None:
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    assert reloaded.quantization_provenance == quantized.quantization_provenance
    assert reloaded.quantization_report.to_dict() == quantized.quantization_report.to_dict()
    assert load_provenance(saved) == quantized.quantization_provenance
    again = tmp_path / saved.name
    reloaded.save_pretrained(again)
    assert (again / "README.md").read_text() == (saved / "README.md").read_text()


def test_foreign_readme_is_kept_once_and_an_edited_card_is_not_lost(quantized: Any, tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# My notes\n\nkeep me\n")
    quantized.save_pretrained(tmp_path)
    quantized.save_pretrained(tmp_path)  # a second save must not nest the kept card twice
    text = (tmp_path / "README.md").read_text()
    assert text.count("keep me") == 1 and "## Earlier README.md of this folder" in text
    edited = text.replace("## How to load", "## How to load\n\nEdited by hand.")
    (tmp_path / "README.md").write_text(edited)
    assert not is_generated_card(edited)
    quantized.save_pretrained(tmp_path)
    assert "Edited by hand." in (tmp_path / "README.md").read_text()


def test_card_without_bc_and_without_base_model(calib_ids, tmp_path: Path) -> None:
    model = tiny_opt()
    from optimum_bc import quantize_model

    quantize_model(model, BCQuantizationConfig(bits=4, group_size=32, method="rtn", bias_compensation=False))
    assert model.quantization_provenance.base_model is None
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model is None and getattr(card.data, "base_model_relation", None) is None
    assert card.data.eval_results is None and "model-index" not in (tmp_path / "README.md").read_text()
    assert "bias compensation was off" in card.text and "without bias compensation" in card.text
    assert not (tmp_path / PLOT_FILENAME).exists() and PLOT_FILENAME not in card.text
    assert "Original model card" not in card.text


def test_user_can_set_base_model_for_a_local_path(calib_ids, tmp_path: Path) -> None:
    from optimum_bc import quantize_model

    model = tiny_llama()
    quantize_model(model, BCQuantizationConfig(bits=4, group_size=32, method="rtn", bias_compensation=False))
    model.quantization_provenance.base_model = "someone/llama-tiny"
    clone = copy.deepcopy(model)  # the card-writing methods follow the copy, not the original
    assert clone.save_pretrained.__self__ is clone and clone.push_to_hub.__self__ is clone
    clone.save_pretrained(tmp_path)
    assert ModelCard.load(tmp_path / "README.md").data.base_model == "someone/llama-tiny"


@pytest.mark.parametrize(
    "value,expected",
    [
        ("facebook/opt-125m", "facebook/opt-125m"),
        ("gpt2", "gpt2"),
        ("", None),
        (None, None),
        ("./local/folder", None),
        ("/abs/path/model", None),
        ("a/b/c", None),
    ],
)
def test_hub_id_of(value: Any, expected: Any) -> None:
    assert hub_id_of(value) == expected


def test_hub_id_of_existing_folders(tmp_path: Path) -> None:
    snapshot = tmp_path / "models--org--name" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    assert hub_id_of(snapshot) == "org/name"
    assert hub_id_of(tmp_path) is None


def test_base_card_of_a_hub_id_comes_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from optimum_bc.integrations.provenance import collect_provenance

    repo = tmp_path / "models--org--m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "README.md").write_text(BASE_CARD)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # only the cache may answer
    prov = collect_provenance("org/m")
    assert prov.base_model == "org/m" and prov.base_model_card == BASE_CARD
    assert collect_provenance("org/other").base_model_card is None


def test_record_evaluation_validates_and_replaces(tmp_path: Path) -> None:
    class Model:
        pass

    model = Model()
    with pytest.raises(ValueError, match="finite positive"):
        record_evaluation(model, "c4", float("nan"))
    record_evaluation(model, "c4", 10.0, seq_len=16)
    record_evaluation(model, "c4", 11.0, seq_len=16)
    record_evaluation(model, str(tmp_path / "eval.txt"), 9.0, seq_len=16)
    assert [(e["dataset"], e["value"]) for e in model.quantization_provenance.evaluations] == [
        ("c4", 11.0),
        ("eval.txt", 9.0),  # a local path keeps only its file name
    ]
    assert Provenance.from_dict({**model.quantization_provenance.to_dict(), "future_key": 1}).evaluations


# --------------------------------------------------------------------------------------------------- upload


def test_push_to_hub_uploads_our_card_in_one_commit(quantized: Any, fake_hub: FakeHub) -> None:
    info = quantized.push_to_hub("alice/tiny-bc", private=True, tags=["my-tag"], commit_message="first")
    assert info.oid == "a" * 40
    create = next(r for r in fake_hub.requests if r["path"] == "/api/repos/create")
    assert json.loads(create["body"])["visibility"] == "private"
    posts = [r for r in fake_hub.requests if r["method"] == "POST"]
    assert [r["path"] for r in posts] == [
        "/api/repos/create",
        "/api/validate-yaml",
        "/api/models/alice/tiny-bc/preupload/main",
        "/api/models/alice/tiny-bc/commit/main",
    ]
    assert all(r["auth"] == "Bearer hf_fake_token_for_tests" for r in posts)  # token from HF_TOKEN
    (commit,) = fake_hub.commits
    assert commit["repo"] == "alice/tiny-bc" and commit["revision"] == "main"
    assert commit["header"]["summary"] == "first"
    files = commit["files"]
    assert set(files) == {"README.md", "config.json", "generation_config.json", "model.safetensors", PLOT_FILENAME}
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == BASE_ID and "my-tag" in card.data.tags
    assert 'from_pretrained("alice/tiny-bc")' in card.text
    assert "automatically generated" not in card.text  # not transformers' stub card
    assert card.data.eval_results[0].metric_value == 23.4568


def test_save_pretrained_push_to_hub_true_uploads_our_card(quantized: Any, fake_hub: FakeHub, tmp_path: Path) -> None:
    quantized.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="alice/tiny-bc2")
    (commit,) = fake_hub.commits
    assert commit["repo"] == "alice/tiny-bc2"
    assert is_generated_card(commit["files"]["README.md"].decode())
    assert 'from_pretrained("alice/tiny-bc2")' in commit["files"]["README.md"].decode()


def test_cli_push_with_revision_and_folder_untouched(saved: Path, fake_hub: FakeHub, capsys) -> None:
    before = _digest(saved)
    assert main(["push", str(saved), "alice/tiny-bc", "--revision", "dev", "--private", "--quiet"]) == 0
    assert "/api/models/alice/tiny-bc/branch/dev" in fake_hub.paths()
    (commit,) = fake_hub.commits
    assert commit["revision"] == "dev"
    assert commit["files"]["model.safetensors"] == (saved / "model.safetensors").read_bytes()
    assert commit["files"][PLOT_FILENAME] == (saved / PLOT_FILENAME).read_bytes()
    assert 'from_pretrained("alice/tiny-bc")' in commit["files"]["README.md"].decode()  # card made for the repo
    assert _digest(saved) == before
    assert "commit/" + "a" * 40 in capsys.readouterr().out


def test_failed_upload_exits_1_names_the_step_and_leaves_folder_untouched(
    saved: Path, fake_hub: FakeHub, capsys
) -> None:
    fake_hub.fail_commit = True
    before = _digest(saved)
    assert main(["push", str(saved), "alice/tiny-bc"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("optimum-bc push: failed: PushError:")
    assert "commit 5 files" in err and "Nothing was committed" in err and "500" in err
    assert fake_hub.commits == [] and _digest(saved) == before
    with pytest.raises(PushError, match="create the repository"):
        fake_hub.server.shutdown()
        fake_hub.server.server_close()
        push_folder(saved, "alice/tiny-bc")


def test_cli_push_rejects_a_float_folder_with_exit_2(tmp_path: Path, capsys) -> None:
    tiny_llama().save_pretrained(tmp_path)
    assert main(["push", str(tmp_path), "alice/x"]) == 2
    assert "not an optimum-bc checkpoint" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "missing"), "alice/x"]) == 2


def test_exact_commit_operations_handed_to_create_commit(saved: Path, tmp_path: Path) -> None:
    class RecordingApi:
        def __init__(self) -> None:
            self.calls: list[tuple[str, dict]] = []

        def create_repo(self, repo_id: str, **kwargs: Any) -> Any:
            self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return type("Url", (), {"repo_id": repo_id})()

        def create_branch(self, repo_id: str, **kwargs: Any) -> None:
            self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

        def create_commit(self, repo_id: str, **kwargs: Any) -> str:
            self.calls.append(("create_commit", {"repo_id": repo_id, **kwargs}))
            return "ok"

    api = RecordingApi()
    assert push_folder(saved, "bob/m", create_pr=True, revision="refs/pr/3", api=api) == "ok"
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]  # no branch for a PR ref
    commit = api.calls[1][1]
    assert commit["create_pr"] is True and commit["revision"] == "refs/pr/3"
    assert commit["commit_message"] == "Upload 3-bit optimum-bc model"
    ops = commit["operations"]
    assert all(isinstance(op, CommitOperationAdd) for op in ops)
    assert sorted(op.path_in_repo for op in ops) == sorted(_digest(saved))
    by_path = {op.path_in_repo: op for op in ops}
    assert by_path["model.safetensors"].path_or_fileobj == str(saved / "model.safetensors")
    assert b'from_pretrained("bob/m")' in by_path["README.md"].path_or_fileobj

    # A README.md written or edited by hand is uploaded as it is; a missing plot is rendered, not written locally.
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((saved / name).read_bytes())
    (folder / ".cache").mkdir()
    (folder / ".cache" / "junk").write_text("x")
    ops = {op.path_in_repo: op for op in commit_operations(folder, "bob/m", scratch=str(tmp_path))}
    assert set(ops) == {"config.json", "model.safetensors", "README.md", PLOT_FILENAME}
    assert sorted(p.name for p in folder.iterdir()) == [".cache", "config.json", "model.safetensors"]
    (folder / "README.md").write_text("# hand written\n")
    ops = {op.path_in_repo: op for op in commit_operations(folder, "bob/m", scratch=str(tmp_path))}
    assert ops["README.md"].path_or_fileobj == str(folder / "README.md")


def test_cli_quantize_eval_dataset_lands_in_the_card(tmp_path: Path, word_tokenizer, capsys) -> None:
    src = tmp_path / "float"
    tiny_llama().save_pretrained(src)
    word_tokenizer.save_pretrained(src)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXTS * 3))
    out = tmp_path / "q"
    argv = ["quantize", str(src), "--output", str(out), "--method", "rtn", "--bits", "4", "--group-size", "32"]
    argv += ["--dataset", str(text), "--num-samples", "4", "--seq-len", "16", "--quiet", "--eval-dataset", str(text)]
    argv += ["--eval-max-samples", "2"]
    assert main(argv) == 0
    ppl = float(capsys.readouterr().out.strip().split()[-1])
    card = ModelCard.load(out / "README.md")
    (result,) = card.data.eval_results
    assert result.dataset_name == "text.txt" and result.metric_value == pytest.approx(ppl, abs=1e-3)
    assert result.metric_args == {"seq_len": 16, "max_samples": 2}
    assert 'AutoTokenizer.from_pretrained("q")' in card.text  # the tokenizer was saved beside the weights
    assert "| dataset | local text `text.txt` |" in card.text
