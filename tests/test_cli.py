"""The optimum-bc CLI, called in-process through main(argv)."""

import os
import re

import pytest
from transformers import AutoModelForCausalLM

from optimum_bc import QuantLinear
from optimum_bc.cli import main

from .conftest import TEXTS, tiny_llama


@pytest.fixture
def model_with_tokenizer(tmp_path, word_tokenizer) -> str:
    path = tmp_path / "float"
    tiny_llama().save_pretrained(path)
    word_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def text_file(tmp_path) -> str:
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(TEXTS * 3))
    return str(path)


def test_help_reads_well(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("quantize", "eval", "report", "demo"):
        assert command in out
    assert main(["quantize", "--help"]) == 0
    assert "--group-size" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["quantize", "m"], "--output"),
        (["quantize", "m", "--output", "o", "--bits", "5"], "invalid choice"),
        (["quantize", "m", "--output", "o", "--group-size", "0"], "group_size=0"),
        (["quantize", "m", "--output", "o", "--method", "awq"], "--method: invalid choice: 'awq'"),
        (["demo", "--settings", "rtn,awq"], "unknown"),
        (["nope"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, match, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err
    assert "Traceback" not in err


def test_failure_exits_1_without_traceback_unless_debug(capsys, tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")  # a damaged model folder: a failure, not a usage error
    (tmp_path / "tokenizer.json").write_text("{}")
    argv = ["eval", str(tmp_path)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("optimum-bc eval: failed:") and "Traceback" not in err
    assert main([*argv, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_report_on_folder_without_weights_exits_2(capsys, tmp_path) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no .safetensors" in capsys.readouterr().err


def test_quantize_eval_report_round_trip(model_with_tokenizer, text_file, tmp_path, capsys) -> None:
    out = str(tmp_path / "q")
    argv = ["quantize", model_with_tokenizer, "--output", out, "--bits", "3", "--group-size", "32"]
    argv += ["--dataset", text_file, "--num-samples", "4", "--seq-len", "16", "--bc-layer", "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "saved 14 quantized layers" in captured.out
    assert "optimum-bc model.layers" not in captured.err  # --quiet hides the progress bars
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert not os.path.exists(out + ".partial")
    assert main(argv) == 2  # refuses to overwrite
    assert "not empty" in capsys.readouterr().err

    assert main(["eval", out, "--dataset", text_file, "--seq-len", "16", "--quiet"]) == 0
    ppl = float(capsys.readouterr().out.strip().split()[-1])
    assert ppl > 1

    assert main(["report", out]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "layer-level BC" in text
    assert os.path.getsize(os.path.join(out, "layer_errors.png")) > 1000


@pytest.mark.slow
def test_demo_on_packaged_model(capsys) -> None:
    argv = ["demo", "--settings", "rtn,rtn+bc", "--num-samples", "4", "--seq-len", "128", "--eval-windows", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "SHORT held-out slice" in out
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.startswith(("fp32", "rtn"))}
    assert set(rows) == {"fp32", "rtn", "rtn+bc"}
    assert rows["fp32"] < rows["rtn"]


@pytest.mark.slow
def test_quantize_gguf_file_end_to_end(tmp_path, capsys) -> None:
    from optimum_bc.data.packaged import GGUF_FILE, _gguf_dir

    out = str(tmp_path / "q")
    argv = ["quantize", str(_gguf_dir()), "--gguf-file", GGUF_FILE, "--output", out, "--method", "rtn", "--no-bc"]
    assert main([*argv, "--quiet", "--eval-dataset", "wiki-vital", "--seq-len", "128", "--eval-max-samples", "4"]) == 0
    text = capsys.readouterr().out
    assert "saved 210 quantized layers" in text
    assert float(text.strip().splitlines()[-1].split()[-1]) < 100


def _quantize_argv(model: str, out: str, text: str, bits: int) -> list[str]:
    argv = ["quantize", model, "--output", out, "--method", "rtn", "--bits", str(bits), "--group-size", "32"]
    return argv + ["--dataset", text, "--num-samples", "2", "--seq-len", "16", "--quiet"]


def test_two_runs_with_one_output_never_claim_each_others_folder(
    model_with_tokenizer, text_file, tmp_path, capsys, monkeypatch
) -> None:
    """A second run finishing while the first is saving: the first fails (exit 2) instead of reporting a save."""
    import json

    from transformers import PreTrainedTokenizerFast

    out = tmp_path / "q"
    partial = tmp_path / "q.partial"  # a folder of that name belongs to somebody else: never deleted
    partial.mkdir()
    (partial / "keep.txt").write_text("mine")
    real_save = PreTrainedTokenizerFast.save_pretrained
    inner: list[int] = []

    def save_and_race(self, *args, **kwargs):
        if not inner:  # the 8-bit run starts and finishes while the 4-bit run is saving
            inner.append(-1)
            inner[0] = main(_quantize_argv(model_with_tokenizer, str(out), text_file, 8))
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", save_and_race)
    assert main(_quantize_argv(model_with_tokenizer, str(out), text_file, 4)) == 2
    captured = capsys.readouterr()
    assert inner == [0] and captured.out.count("saved ") == 1
    assert "exists and is not empty" in captured.err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert (partial / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["float", "text.txt", "q", "q.partial"])


@pytest.mark.parametrize(
    "case",
    ["missing-model", "empty-folder", "no-tokenizer", "bad-dataset", "bad-eval-dataset", "non-utf8-dataset"],
)
def test_bad_inputs_exit_2_before_any_work_naming_the_option(
    case, model_with_tokenizer, text_file, tmp_path, capsys, monkeypatch
) -> None:
    from optimum_bc import cli

    monkeypatch.setattr(cli, "_load_float", lambda *a: pytest.fail("the model was loaded"))
    model, out = model_with_tokenizer, str(tmp_path / "q")
    extra: list[str] = []
    match = {
        "missing-model": r"MODEL '.*no-such-model': no such folder",
        "empty-folder": r"MODEL '.*empty' holds no config.json",
        "no-tokenizer": r"MODEL '.*bare' holds no tokenizer",
        "bad-dataset": r"--dataset 'wikitext103': unknown dataset name",
        "bad-eval-dataset": r"--eval-dataset '.*missing.txt': no such file or folder",
        "non-utf8-dataset": r"--dataset '.*latin1.txt': '.*latin1.txt' is not UTF-8 text",
    }[case]
    if case == "missing-model":
        model = str(tmp_path / "no-such-model")
    elif case == "empty-folder":
        model = str(tmp_path / "empty")
        os.mkdir(model)
    elif case == "no-tokenizer":
        model = str(tmp_path / "bare")
        tiny_llama().save_pretrained(model)
    elif case == "bad-dataset":
        text_file = "wikitext103"
    elif case == "bad-eval-dataset":
        extra = ["--eval-dataset", str(tmp_path / "missing.txt")]
    else:
        text_file = str(tmp_path / "latin1.txt")
        (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    assert main([*_quantize_argv(model, out, text_file, 4), *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert not os.path.exists(out)


def test_report_plot_into_a_missing_folder_exits_2_before_printing(model_with_tokenizer, text_file, tmp_path, capsys):
    out = str(tmp_path / "q")
    assert main(_quantize_argv(model_with_tokenizer, out, text_file, 4)) == 0
    capsys.readouterr()
    assert main(["report", out, "--plot", str(tmp_path / "missing" / "x.png")]) == 2
    captured = capsys.readouterr()
    assert "does not exist or is not writable" in captured.err and captured.out == ""


# --- flags generated from the config, loading options, checks before loading, exit codes -------------------------


def test_every_config_parameter_has_a_flag(capsys) -> None:
    import inspect

    from optimum_bc import BCQuantizationConfig

    assert main(["quantize", "--help"]) == 0
    text = capsys.readouterr().out
    params = set(inspect.signature(BCQuantizationConfig.__init__).parameters) - {"self", "tokenizer", "kwargs"}
    params.discard("config_version")
    missing = [p for p in sorted(params) if "--" + p.replace("_", "-") not in text]
    assert not missing and len(params) >= 25
    assert "{2,3,4,6,8}" in text  # --bits follows SUPPORTED_BITS
    assert "--no-sym" in text and "--no-bias-compensation" in text and "--weight-format" in text


def test_generated_flags_parse_to_config_values() -> None:
    from optimum_bc.cli import _build_parser
    from optimum_bc.cli.args import config_kwargs

    argv = ["quantize", "m", "--output", "o", "--format", "MXFP4", "--no-bc", "--offload-activations"]
    argv += ["--modules-to-not-convert", "lm_head", "model.layers.0.mlp.down_proj", "--erq-lambda", "0.5"]
    argv += ["--modules-in-block-to-quantize", '[["mlp.down_proj"], ["self_attn.o_proj"]]', "--no-sym"]
    argv += ["--block-name-to-quantize", "model.layers", "--backend", "reference", "--seq-len", "64"]
    kwargs = config_kwargs(_build_parser().parse_args(argv))
    assert kwargs == {
        "dataset": "wiki-vital",
        "weight_format": "mxfp4",
        "bias_compensation": False,
        "offload_activations": True,
        "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.down_proj"],
        "erq_lambda": 0.5,
        "modules_in_block_to_quantize": [["mlp.down_proj"], ["self_attn.o_proj"]],
        "sym": False,
        "block_name_to_quantize": "model.layers",
        "backend": "reference",
        "seq_len": 64,
    }


def test_version(capsys) -> None:
    import optimum_bc

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"optimum-bc {optimum_bc.__version__} (transformers ")


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--bits", "5"], "--bits: invalid choice: 5"),
        (["--weight-format", "fp4"], r"weight_format='fp4' is invalid; allowed: \['int', 'mxfp8_e4m3'"),
        (["--backend", "marlin"], "--backend: invalid choice: 'marlin'"),
        (["--modules-in-block-to-quantize", "mlp.down_proj"], "--modules-in-block-to-quantize: .*not JSON"),
        (["--device", "cpu", "--device-map", "auto"], "not allowed with argument --device"),
        (["--device", "nonsense"], "--device 'nonsense'"),
        (["--device-map", "{bad json"], "--device-map: not valid JSON"),
        (["--max-memory", "0=20GiB"], "--max-memory only applies with --device-map auto"),
        (["--device-map", "auto", "--max-memory", "lots"], "--max-memory 'lots': expected JSON or DEVICE=SIZE"),
        (["--dtype", "float64"], "--dtype: invalid choice"),
        (["-q", "-v"], "not allowed with argument"),
        (["--seq-len", "256"], "--seq-len 256 exceeds the model's max_position_embeddings=128"),
        (["--block-name-to-quantize", "model.blocks"], "no module 'model.blocks' in LlamaForCausalLM"),
        (["--modules-in-block-to-quantize", '[["mlp.w1"]]'], r"names \['mlp.w1'\].*they hold"),
        (["--save-format", "compressed-tensors", "--group-size", "64"], "group_size=64|160"),
        (["--group-size", "-2"], "group_size=-2 is invalid"),
        (["--bc-sink-tokens", "16"], "bc_sink_tokens=16 is invalid.*seq_len=16"),
    ],
)
def test_bad_settings_exit_2_before_the_weights_load(
    extra, match, model_with_tokenizer, text_file, tmp_path, capsys, monkeypatch
) -> None:
    from optimum_bc import cli

    monkeypatch.setattr(cli, "_load_float", lambda *a: pytest.fail("the model was loaded"))
    assert main([*_quantize_argv(model_with_tokenizer, str(tmp_path / "q"), text_file, 4), *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "q")


def test_mx_width_checked_before_the_weights_load(word_tokenizer, text_file, tmp_path, capsys, monkeypatch) -> None:
    from optimum_bc import cli

    path = tmp_path / "float100"
    tiny_llama(intermediate_size=100).save_pretrained(path)
    word_tokenizer.save_pretrained(path)
    monkeypatch.setattr(cli, "_load_float", lambda *a: pytest.fail("the model was loaded"))
    argv = ["quantize", str(path), "--output", str(tmp_path / "q"), "--weight-format", "mxfp4", "--method", "rtn"]
    assert main([*argv, "--dataset", text_file, "--seq-len", "16", "--num-samples", "2"]) == 2
    assert re.search(r"mlp.down_proj.*100", capsys.readouterr().err)


def test_failure_during_the_work_exits_1_and_verbose_shows_the_traceback(
    model_with_tokenizer, text_file, tmp_path, capsys, monkeypatch
) -> None:
    from optimum_bc import quantizer

    def broken(*args, **kwargs):
        raise ValueError("calibration diverged\nsecond line")

    monkeypatch.setattr(quantizer, "quantize_model", broken)
    argv = _quantize_argv(model_with_tokenizer, str(tmp_path / "q"), text_file, 4)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == "optimum-bc quantize: failed: ValueError: calibration diverged\n"
    assert main([*[a for a in argv if a != "--quiet"], "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_quiet_hides_info_logs(model_with_tokenizer, text_file, tmp_path, caplog, monkeypatch) -> None:
    import logging

    from optimum_bc import cli

    monkeypatch.setattr(cli, "_load_float", lambda *a: pytest.fail("the model was loaded"))
    argv = _quantize_argv(model_with_tokenizer, str(tmp_path / "q"), text_file, 4)
    argv = [a for a in argv if a != "--quiet"] + ["--save-format", "gptq", "--seq-len", "256"]

    def infos() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "optimum_bc" and r.levelno == logging.INFO]

    assert main(argv) == 2 and any("--bc-sink-tokens 0" in m for m in infos())
    caplog.clear()
    assert main([*argv, "-q"]) == 2 and infos() == []


def test_generated_flags_reach_the_saved_model(model_with_tokenizer, text_file, tmp_path, capsys) -> None:
    import json

    import torch

    out = tmp_path / "q"
    argv = _quantize_argv(model_with_tokenizer, str(out), text_file, 4)
    argv += ["--device", "cpu", "--dtype", "bfloat16", "--backend", "reference", "--model-seqlen", "16"]
    argv += ["--modules-in-block-to-quantize", '[["mlp.down_proj"], ["self_attn.o_proj"]]']
    assert main(argv) == 0
    assert "saved 4 quantized layers" in capsys.readouterr().out
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["backend"] == "reference" and qc["modules_in_block_to_quantize"] == [
        ["mlp.down_proj"],
        ["self_attn.o_proj"],
    ]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model.model.layers[1].self_attn.o_proj, QuantLinear)
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16


def test_eval_checks_seq_len_and_device_before_loading(model_with_tokenizer, text_file, capsys, monkeypatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM as Auto

    monkeypatch.setattr(Auto, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["eval", model_with_tokenizer, "--dataset", text_file]
    assert main([*argv, "--seq-len", "256"]) == 2
    assert "--seq-len 256 exceeds the model's max_position_embeddings=128" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*argv, "--seq-len", "16", "--device", "cuda"]) == 2
        assert "--device 'cuda': no cuda device is available here" in capsys.readouterr().err
