"""Every code block of README.md, docs/*.md and CONTRIBUTING.md runs.

Each document's ```python and ```bash blocks run in document order in one fresh process (blocks of a document build on
each other), in an empty working folder, offline. Hub model names map to tiny random local models, Hub and offline
dataset names to a local text file, and calibration / evaluation sizes to tiny ones (num_samples 2, seq_len 16).
``optimum-bc ...`` lines run through ``optimum_bc.cli.main``. Commands that cannot run here (installs, GPU, long
benchmarks, Hub uploads) are listed in ``NOT_RUN`` with the reason; any other command fails the test. ```text blocks
are shown, not run.

Run as a script (``python tests/test_docs.py SPEC.json``) this file is the runner the test starts.
"""

import functools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = ("python", "bash")
SHOWN_LANGUAGES = ("text",)

#: Command prefixes in bash blocks that are not run, with the reason.
NOT_RUN: dict[str, str] = {
    "pip install": "installs packages",
    "python -m pytest": "the test suite itself",
    "ruff ": "lint: CI runs it before the tests",
    "python benchmarks/": "benchmark on the packaged 135M model: minutes to hours",
    "OMP_NUM_THREADS=1 python benchmarks/": "benchmark on the packaged 135M model: minutes to hours",
    "vllm serve": "needs vLLM and a GPU",
    "optimum-bc demo": "quantizes the packaged 135M model (minutes); the slow tests cover it",
    "optimum-bc lm-eval": "lm-eval's task data comes from the Hub",
    "optimum-bc push": "uploads to the Hub",
}
#: Python statements that are not run (the line is replaced by `pass`), with the reason.
NOT_RUN_PYTHON: dict[str, str] = {".push_to_hub(": "uploads to the Hub"}

#: Hub model ids used in the docs -> the tiny local model that stands in for them.
HUB_MODELS: dict[str, str] = {
    "facebook/opt-125m": "opt",
    "meta-llama/Llama-2-7b-hf": "llama",
    "HuggingFaceTB/SmolLM2-135M": "llama",
}
DATASETS = ("wikitext2", "wiki-vital", "c4", "ptb")
NUM_SAMPLES, SEQ_LEN, EVAL_SAMPLES, TRAIN_STEPS = 2, 16, 2, 2


@dataclass(frozen=True)
class Block:
    """One fenced code block: its document, the line of its opening fence, its language and its text."""

    doc: str
    line: int
    language: str
    text: str


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, in order."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if language is None and line.startswith("```"):
            language, start, lines = line[3:].strip(), number, []
        elif language is not None and line.startswith("```"):
            blocks.append(Block(str(path.resolve().relative_to(ROOT)), start, language, "\n".join(lines)))
            language = None
        elif language is not None:
            lines.append(line)
    if language is not None:
        raise ValueError(f"{path}:{start}: code block never closed")
    return blocks


def shell_commands(text: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    commands, current = [], ""
    for raw in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current = (current + line).strip()
        if current:
            commands.append(current)
        current = ""
    return commands


def not_run_reason(command: str) -> str | None:
    """Why ``command`` is not run, or None when it runs."""
    return next((reason for prefix, reason in NOT_RUN.items() if command.startswith(prefix)), None)


def localize(text: str, env: dict[str, str]) -> str:
    """Map Hub models and datasets to the local stand-ins and the sizes to tiny ones (python and shell alike)."""
    for hub_id, local in HUB_MODELS.items():
        text = text.replace(hub_id, env[local])
    names = "|".join(re.escape(name) for name in DATASETS)
    text = re.sub(rf"([\"'])({names})\1", lambda _: repr(env["text"]), text)
    text = re.sub(rf"(--(?:eval-)?dataset) ({names})\b", lambda m: f"{m.group(1)} {env['text']}", text)
    text = re.sub(r"\bnum_samples=\d+", f"num_samples={NUM_SAMPLES}", text)
    text = re.sub(r"\bseq_len=\d+", f"seq_len={SEQ_LEN}", text)
    text = re.sub(r"\bmax_steps=\d+", f"max_steps={TRAIN_STEPS}", text)
    text = re.sub(r"--num-samples \d+", f"--num-samples {NUM_SAMPLES}", text)
    text = re.sub(r"--seq-len \d+", f"--seq-len {SEQ_LEN}", text)
    return re.sub(r"--max-samples \d+", f"--max-samples {EVAL_SAMPLES}", text)


# ---------------------------------------------------------------- runner (a fresh process per document)


def _cli_argv(command: str) -> list[str]:
    """Arguments of an ``optimum-bc`` command for ``cli.main``, with tiny sizes added where the command has none."""
    argv = shlex.split(command)[1:]
    sizes = {
        "quantize": {"--num-samples": NUM_SAMPLES, "--seq-len": SEQ_LEN},
        "eval": {"--seq-len": SEQ_LEN, "--max-samples": EVAL_SAMPLES},
    }
    for flag, value in sizes.get(argv[0] if argv else "", {}).items():
        if flag not in argv:
            argv += [flag, str(value)]
    return argv


def _tiny_config_sizes() -> None:
    """Cap every config's calibration size (also configs built by the CLI or left at their defaults)."""
    from optimum_bc import config

    init = config.BCQuantizationConfig.__init__

    @functools.wraps(init)  # keeps the signature: the CLI generates its flags from it
    def capped(self: config.BCQuantizationConfig, *args: object, **kwargs: object) -> None:
        kwargs["num_samples"], kwargs["seq_len"] = NUM_SAMPLES, SEQ_LEN
        init(self, *args, **kwargs)

    config.BCQuantizationConfig.__init__ = capped


def _python_source(block: Block) -> str:
    """The block's code, lines of ``NOT_RUN_PYTHON`` replaced by ``pass``, padded so tracebacks give doc lines."""
    lines = []
    for line in block.text.splitlines():
        if any(marker in line for marker in NOT_RUN_PYTHON):
            line = line[: len(line) - len(line.lstrip())] + "pass"
        lines.append(line)
    return "\n" * block.line + "\n".join(lines)


def run_document(blocks: list[Block]) -> None:
    """Run one document's blocks in order; raise at the first failure, naming the document line."""
    _tiny_config_sizes()
    from optimum_bc import cli

    namespace: dict[str, object] = {"__name__": "__main__"}
    for block in blocks:
        if block.language == "python":
            print(f"--- {block.doc}:{block.line} python", flush=True)
            exec(compile(_python_source(block), block.doc, "exec"), namespace)
            continue
        for command in shell_commands(block.text):
            reason = not_run_reason(command)
            print(
                f"--- {block.doc}:{block.line} $ {command}" + (f"  [not run: {reason}]" if reason else ""), flush=True
            )
            if reason:
                continue
            if not command.startswith("optimum-bc "):
                raise RuntimeError(f"{block.doc}:{block.line}: `{command}` is neither optimum-bc nor in NOT_RUN")
            code = cli.main(_cli_argv(command))
            if code != 0:
                raise RuntimeError(f"{block.doc}:{block.line}: `{command}` exited with {code}")


# ---------------------------------------------------------------- tests


def _runnable(path: Path) -> list[Block]:
    return [b for b in code_blocks(path) if b.language in RUN_LANGUAGES]


def test_every_block_is_run_or_shown() -> None:
    """A block in another language would silently never run: only python, bash and text are allowed."""
    for path in DOC_FILES:
        for block in code_blocks(path):
            assert block.language in RUN_LANGUAGES + SHOWN_LANGUAGES, f"{block.doc}:{block.line}: ```{block.language}"


def test_every_shell_command_runs_or_is_listed() -> None:
    for path in DOC_FILES:
        for block in _runnable(path):
            if block.language != "bash":
                continue
            for command in shell_commands(block.text):
                assert command.startswith("optimum-bc ") or not_run_reason(command), (
                    f"{block.doc}:{block.line}: {command}"
                )


def test_readme_test_command_is_what_ci_runs() -> None:
    ci_commands = (ROOT / ".ci" / "run").read_text().splitlines()
    readme = [c for b in _runnable(ROOT / "README.md") if b.language == "bash" for c in shell_commands(b.text)]
    assert "python -m pytest -q" in ci_commands and "python -m pytest -q" in readme


def test_links_stay_inside_the_repository() -> None:
    """Relative links resolve to files of this repository; nothing points outside it."""
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"https?://", target):
                continue
            resolved = (path.parent / target.split("#")[0]).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{path.name}: link {target}"


def test_localize_maps_hub_names_and_sizes() -> None:
    env = {"opt": "/tmp/opt", "llama": "/tmp/llama", "text": "/tmp/t.txt"}
    code = 'f("facebook/opt-125m", dataset="wikitext2", num_samples=128, seq_len=2048)'
    assert localize(code, env) == "f(\"/tmp/opt\", dataset='/tmp/t.txt', num_samples=2, seq_len=16)"
    shell = "optimum-bc quantize meta-llama/Llama-2-7b-hf --dataset c4 --seq-len 2048 --eval-dataset wiki-vital"
    assert (
        localize(shell, env)
        == "optimum-bc quantize /tmp/llama --dataset /tmp/t.txt --seq-len 16 --eval-dataset /tmp/t.txt"
    )
    assert _cli_argv("optimum-bc eval out --seq-len 16") == ["eval", "out", "--seq-len", "16", "--max-samples", "2"]


def _doc_env(folder: Path, tokenizer: object) -> dict[str, str]:
    """Tiny random OPT and LLaMA models (widths divisible by 128 and 32) with a tokenizer, and a local text file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    from .conftest import TEXTS, VOCAB

    shape = {"vocab_size": VOCAB, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    torch.manual_seed(0)
    models = {
        "llama": LlamaForCausalLM(
            LlamaConfig(**shape, intermediate_size=256, num_key_value_heads=2, max_position_embeddings=256)
        ),
        "opt": OPTForCausalLM(OPTConfig(**shape, ffn_dim=256, word_embed_proj_dim=128, max_position_embeddings=256)),
    }
    env = {}
    for name, model in models.items():
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        env[name] = str(folder / name)
    (folder / "text.txt").write_text("\n\n".join(TEXTS))
    env["text"] = str(folder / "text.txt")
    return env


def _documents_with_code() -> list[Path]:
    return [p for p in DOC_FILES if _runnable(p)]


@pytest.fixture(scope="module")
def doc_env(tmp_path_factory: pytest.TempPathFactory, word_tokenizer: object) -> dict[str, str]:
    return _doc_env(tmp_path_factory.mktemp("doc_env"), word_tokenizer)


@pytest.mark.parametrize("path", _documents_with_code(), ids=lambda p: p.name)
def test_document_code_runs(path: Path, doc_env: dict[str, str], tmp_path: Path) -> None:
    blocks = [Block(b.doc, b.line, b.language, localize(b.text, doc_env)) for b in _runnable(path)]
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([asdict(b) for b in blocks]))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(spec)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, (
        f"{path.name}: a code block failed\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    )


if __name__ == "__main__":
    run_document([Block(**b) for b in json.loads(Path(sys.argv[1]).read_text())])
