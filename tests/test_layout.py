"""The package layout: floors that import only downward, no import cycles, short modules, old import paths alive.

The floor order is written once, here (and in the docs page on the layout). Each module belongs to the floor named
by its first component under ``optimum_bc`` (a subpackage or a top-level module); a module may import its own floor
or a lower one, never a higher one. Inside a floor the module graph has no cycles.
"""

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parent.parent / "optimum_bc"

#: Bottom to top.
FLOORS = (
    "version",  # the version string
    "_compat",  # the helper the old import paths use
    "distributed",  # torch.distributed helpers: sharding, all-reduce, rank-0 work (imports only torch)
    "formats",  # number formats, scale primitives, int32 bit packing
    "data",  # calibration text, streamed sources, perplexity, packaged offline models
    "algorithms",  # weight quantizers (RTN / GPTQ / COMQ / ERQ) and the closed-form BC bias
    "config_fields",  # checks and aliases of single config fields (GPTQConfig names, backends)
    "config",  # BCQuantizationConfig
    "layers",  # packed layers (QuantLinear, MXLinear), token positions, kernels, dequantization, checkpoint checks
    "calibration",  # model discovery, architectures, the block calibrator, block biases, offload, report, plot
    "vision",  # image models: image calibration data, the vision calibration driver, DINOv2 ONNX conversion
    "api",  # the engine: calibrate a model in place
    "export",  # other tools' checkpoint formats; atomic folder writes
    "integrations",  # transformers quantizer, save / push hooks, model card, provenance, dense, PEFT, lm-eval
    "cli",  # the optimum-bc command
    "__init__",  # the package root: public names, registers quant_method "bc"
)

#: Old module path -> (new module, names users import from the old path today).
OLD_PATHS = {
    "optimum_bc.architectures": ("optimum_bc.calibration.architectures", ["get_blocks", "resolve_spec"]),
    "optimum_bc.atomic": ("optimum_bc.export.atomic", ["atomic_folder", "cleanup_leftovers"]),
    "optimum_bc.block_bias": ("optimum_bc.calibration.block_bias", ["fold_block_bias"]),
    "optimum_bc.block_inputs": ("optimum_bc.calibration.block_inputs", ["capture_block_inputs", "collate"]),
    "optimum_bc.compensation": ("optimum_bc.algorithms.compensation", ["InputMoments", "ResidualMean"]),
    "optimum_bc.dense": ("optimum_bc.integrations.dense", ["BCDenseLinear", "restore_position_biases"]),
    "optimum_bc.dequant": ("optimum_bc.layers.dequant", ["DequantSource"]),
    "optimum_bc.discovery": ("optimum_bc.calibration.discovery", ["candidate_layers", "observe_block"]),
    "optimum_bc.evaluation": ("optimum_bc.data.evaluation", ["evaluate_perplexity"]),
    "optimum_bc.hub": (
        "optimum_bc.integrations.hub",
        ["PLOT_FILENAME", "Provenance", "PushError", "build_model_card", "collect_provenance", "commit_operations"]
        + ["hub_id_of", "is_generated_card", "load_provenance", "push_folder", "record_evaluation"],
    ),
    "optimum_bc.kernels": ("optimum_bc.layers.kernels", ["use_backend", "prepare", "paths"]),
    "optimum_bc.lm_eval_adapter": ("optimum_bc.integrations.lm_eval", ["evaluate_tasks", "format_results"]),
    "optimum_bc.mxlinear": ("optimum_bc.layers.mxlinear", ["MXLinear"]),
    "optimum_bc.offload": ("optimum_bc.calibration.offload", ["check_device_map", "device_for"]),
    "optimum_bc.packaged": ("optimum_bc.data.packaged", ["GGUF_FILE", "PACKAGED_MODEL_NAME", "packaged_model_dir"]),
    "optimum_bc.packed_base": ("optimum_bc.layers.packed_base", ["PackedLinearBase", "packed_layers"]),
    "optimum_bc.packing": ("optimum_bc.formats.packing", ["pack_int32", "packed_width", "unpack_int32"]),
    "optimum_bc.peft": ("optimum_bc.integrations.peft", ["get_peft_model", "load_adapter", "merge_and_unload"]),
    "optimum_bc.plotting": ("optimum_bc.calibration.plotting", ["plot_layer_errors"]),
    "optimum_bc.positions": ("optimum_bc.layers.positions", ["token_positions", "attach_position_hooks"]),
    "optimum_bc.primitives": ("optimum_bc.formats.primitives", ["SCALE_DTYPE", "compute_qparams", "quantize_codes"]),
    "optimum_bc.qlinear": ("optimum_bc.layers.qlinear", ["QuantLinear"]),
    "optimum_bc.quantizer": ("optimum_bc.integrations.quantizer", ["BCHfQuantizer", "quantize_model", "load_report"]),
    "optimum_bc.report": ("optimum_bc.calibration.report", ["QuantizationReport", "LayerReport"]),
    "optimum_bc.text_stream": ("optimum_bc.data.text_stream", ["TextSource", "sample_streamed"]),
    "optimum_bc.validation": ("optimum_bc.layers.validation", ["CheckpointError"]),
}

#: Packages with the dotted name of an old module: the old names import from them without a warning.
SAME_NAME = {
    "optimum_bc.formats": ["MX_ELEMENTS", "e8m0_to_scale", "get_format", "is_mx", "mx_scale", "scale_to_e8m0"],
    "optimum_bc.data": ["DOC_SEPARATOR", "KNOWN_DATASETS", "build_calibration_set", "describe_dataset"]
    + ["load_evaluation_text", "wiki_vital_articles"],
    "optimum_bc.calibration": ["BlockCalibrator", "set_progress_bars", "FLOAT_BIASES_ATTR"],
    "optimum_bc.cli": ["main"],
}

MAX_LINES = 420
#: Modules over MAX_LINES, each with the reason it is not split in this change.
LONG_MODULES: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def _modules() -> dict[str, Path]:
    """Every module of the package except the old-path aliases."""
    found = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: path for name, path in found.items() if name not in OLD_PATHS}


def _imports(name: str, path: Path) -> set[str]:
    """The optimum_bc modules ``name`` imports (at any depth, lazy imports included), with the ``__init__`` of each
    other subpackage it enters (that runs first)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names if a.name.split(".")[0] == "optimum_bc"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "optimum_bc":
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                targets.add(
                    sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() or _is_package(sub) else module
                )
    entered = set()
    for target in targets:
        parts = target.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if not name.startswith(parent + ".") and name != parent:
                entered.add(parent)
    return {t for t in targets | entered if t != name and t != "optimum_bc"}


def _floor(name: str) -> int:
    parts = name.split(".")
    return FLOORS.index(parts[1] if len(parts) > 1 else "__init__")


def _graph() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in _modules().items()}


def test_every_module_is_on_a_floor():
    unknown = sorted(name for name in _modules() if (name.split(".") + ["__init__"])[1] not in FLOORS)
    assert unknown == []


def test_imports_only_go_downward():
    upward = [
        f"{name} ({FLOORS[_floor(name)]}) imports {target} ({FLOORS[_floor(target)]})"
        for name, targets in _graph().items()
        for target in targets
        if target not in OLD_PATHS and _floor(target) > _floor(name)
    ]
    assert upward == []


def test_no_import_cycles():
    graph = _graph()
    assert not [t for targets in graph.values() for t in targets if t in OLD_PATHS], "internal code uses old paths"
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_modules_are_short():
    long = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
        if len(path.read_text().splitlines()) > MAX_LINES
    }
    assert set(long) <= set(LONG_MODULES), long
    assert set(LONG_MODULES) <= set(long), "a module on the exception list is short now: drop it from the list"


def test_old_paths_are_answered_without_files():
    """The finder knows exactly these moves, and no file sits at an old path (git sees every move as a rename)."""
    from optimum_bc._compat import MOVED

    assert MOVED == {old: new for old, (new, _) in OLD_PATHS.items()}
    assert [old for old in OLD_PATHS if (PACKAGE.parent / (old.replace(".", "/") + ".py")).exists()] == []


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_path_warns_and_is_the_new_module(old):
    new, names = OLD_PATHS[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"^{old} moved to {new}; the old path will be removed in 0.3$"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert [n for n in names if not hasattr(module, n)] == []


@pytest.mark.parametrize("package", sorted(SAME_NAME))
def test_same_name_package_keeps_old_names_without_warning(package):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        module = importlib.import_module(package)
        assert [n for n in SAME_NAME[package] if not hasattr(module, n)] == []


def test_old_layers_names_warn():
    import optimum_bc.layers as layers
    from optimum_bc.calibration.skeleton import packed_layer, skeleton_layer

    with pytest.warns(DeprecationWarning, match="optimum_bc.layers.skeleton_layer moved to optimum_bc.calibration"):
        assert layers.skeleton_layer is skeleton_layer
    with pytest.warns(DeprecationWarning, match="optimum_bc.layers.packed_layer moved"):
        assert layers.packed_layer is packed_layer
    with pytest.raises(AttributeError, match="no_such_name"):
        layers.no_such_name  # noqa: B018


def test_own_code_uses_no_old_path():
    """Importing every module by its new path, in a fresh interpreter, raises no deprecation warning of ours."""
    modules = sorted(name for name in _modules() if not name.endswith("__main__"))
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    result = subprocess.run(
        [sys.executable, "-W", "error:optimum_bc:DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]
