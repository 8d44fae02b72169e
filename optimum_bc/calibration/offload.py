"""Calibrate a model dispatched by Accelerate (``device_map`` with several devices, ``"cpu"`` or ``"disk"``).

The calibration walks the blocks in order; each block is onloaded to its execution device only while it is
calibrated, then its (quantized and packed) tensors go back where the device map put them: kept on a GPU, moved to
the CPU, or written to the offload folder (``accelerate.utils.offload_weight``) and left on ``meta``. Offloaded float
weights are read through the Accelerate weights map the hooks were using (``OffloadedWeightsLoader``), and at the end
the model is dispatched again (``accelerate.dispatch_model``) with ``offload_buffers=True`` so the packed buffers of
offloaded blocks stay in the offload store, never all resident at once.
"""

import copy
import ctypes
import ctypes.util
import functools
import gc
import itertools
import os
from collections.abc import Iterator, Mapping

import torch
from accelerate import dispatch_model
from accelerate.hooks import (
    AlignDevicesHook,
    add_hook_to_module,
    attach_align_device_hook,
    remove_hook_from_submodules,
)
from accelerate.utils import (
    OffloadedWeightsLoader,
    PrefixedDataset,
    named_module_tensors,
    offload_weight,
    save_offload_index,
    set_module_tensor_to_device,
)
from torch import nn


Device = int | str | torch.device


def is_dispatched(model: nn.Module) -> bool:
    """Whether Accelerate hooks are attached (the device map had several devices, ``"cpu"`` offload or ``"disk"``)."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def device_for(device_map: Mapping[str, Device], name: str) -> Device:
    """Device the map gives to the tensor or module ``name``: its longest matching prefix (``""`` matches all)."""
    best, found = -1, "cpu"
    for key, device in device_map.items():
        if (key == "" or name == key or name.startswith(key + ".")) and len(key) > best:
            best, found = len(key), device
    return found


def main_device(device_map: Mapping[str, Device]) -> torch.device:
    """Where offloaded modules run: the first accelerator of the map, else the CPU (as ``dispatch_model`` picks)."""
    for device in device_map.values():
        if device not in ("cpu", "disk", "meta"):
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return torch.device("cpu")


def _weights_loader(model: nn.Module) -> OffloadedWeightsLoader | None:
    """The ``OffloadedWeightsLoader`` behind the Accelerate hooks of ``model`` (None if nothing is offloaded)."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):
            weights_map = getattr(h, "weights_map", None)
            if isinstance(weights_map, PrefixedDataset):
                weights_map = weights_map.dataset
            if isinstance(weights_map, OffloadedWeightsLoader):
                return weights_map
    return None


def check_offload_folder(folder: str | None, device_map: Mapping[str, Device]) -> None:
    """Raise if the map offloads to disk but no writable folder receives the packed weights."""
    if "disk" not in set(device_map.values()):
        return
    if folder is None:
        raise ValueError(
            "the device_map offloads modules to 'disk' but no offload_folder was given: optimum-bc writes the packed "
            "weights of disk-offloaded blocks there. Fix: pass offload_folder='<a writable folder>' to from_pretrained."
        )
    probe = os.path.join(folder, ".optimum_bc_write_test")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0")
        os.remove(probe)
    except OSError as err:
        raise ValueError(
            f"offload_folder {folder!r} is not writable ({err}); optimum-bc writes the packed weights of "
            "disk-offloaded blocks there. Fix: pass offload_folder='<a writable folder>' to from_pretrained."
        ) from err


_PLACEMENTS = ("cpu", "disk", "meta")


def check_device(device: Device) -> None:
    """Raise a ValueError naming ``device`` if this machine has no such device (placements cpu/disk included)."""
    if isinstance(device, str) and device in _PLACEMENTS:
        return
    try:
        dev = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device_map names {device!r}, which is not a device. Fix: use 'cpu', 'disk', a GPU index or 'cuda:N'."
        ) from err
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None)
    available = bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())
    count = backend.device_count() if available and hasattr(backend, "device_count") else 0
    if not available or (dev.index is not None and dev.index >= count):
        raise ValueError(
            f"device_map names {device!r} but this machine has {count} {dev.type} device(s). Fix: map modules to "
            "existing devices ('cpu', 'disk', or a GPU index below the count), or use device_map='auto'."
        )


def check_device_map(device_map: object) -> None:
    """Check every device a ``from_pretrained`` device map names exists (strings like ``"auto"`` pass)."""
    if isinstance(device_map, dict):
        for device in device_map.values():
            check_device(device)
    elif isinstance(device_map, int | torch.device) or (
        isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential")
    ):
        check_device(device_map)


class OffloadedCalibration:
    """Onloads and offloads parts of a dispatched model during calibration, then dispatches it again.

    Creating it removes the Accelerate hooks (which puts CPU-offloaded tensors back on the CPU; disk-offloaded ones
    stay on ``meta`` and are read from the hooks' weights map when their module is onloaded).
    """

    def __init__(self, model: nn.Module, offload_folder: str | None = None) -> None:
        self.model = model
        self.device_map: dict[str, Device] = dict(model.hf_device_map)
        self.execution_device = main_device(self.device_map)
        loader = _weights_loader(model)
        self.loader = loader
        self.folder = offload_folder if offload_folder is not None else getattr(loader, "save_folder", None)
        self.index: dict[str, dict] = dict(loader.index) if loader is not None else {}
        check_offload_folder(self.folder, self.device_map)
        bound_heap_growth()
        remove_hook_from_submodules(model)

    def _device(self, name: str) -> torch.device:
        device = device_for(self.device_map, name)
        if device in ("cpu", "disk"):
            return self.execution_device
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)

    def _tensors(self, module: nn.Module, prefix: str, skip: tuple[str, ...]) -> Iterator[tuple[str, str]]:
        for name, _ in list(named_module_tensors(module, include_buffers=True, recurse=True)):
            full = f"{prefix}{name}"
            if not any((full + ".").startswith(s + ".") for s in skip):
                yield name, full

    def onload(self, module: nn.Module, prefix: str = "", skip: tuple[str, ...] = (), copy: bool = True) -> None:
        """Bring the tensors of ``module`` (named ``prefix`` + name in the model; not under ``skip``) on device.

        ``copy``: tensors read from the offload store are copied, because the loader's tensor maps the whole
        safetensors file and that mapping would outlive the module. A module onloaded only for a moment (the
        embeddings, for the input capture) and offloaded again takes the loader's tensors as they are: a copy would
        double its bytes while it is made (the mapped pages and the copy).
        """
        for name, full in self._tensors(module, prefix, skip):
            tensor = module.get_parameter(name) if _is_param(module, name) else module.get_buffer(name)
            device = self._device(full)
            if tensor.device.type == "meta":
                if self.loader is None or full not in self.loader:
                    raise ValueError(f"{full} is on the meta device and no Accelerate weights map holds it")
                value = self.loader[full]
                set_module_tensor_to_device(module, name, device, value=value.clone() if copy else value)
            elif tensor.device != device:
                set_module_tensor_to_device(module, name, device)

    def offload(self, module: nn.Module, prefix: str = "", skip: tuple[str, ...] = (), write: bool = True) -> None:
        """Return every tensor of ``module`` where the device map puts it; ``write`` stores disk ones anew.

        Derived caches (the dense weight a ``QuantLinear`` keeps) are dropped first: they would keep the block resident.
        """
        drop_dense_caches(module)
        transient = {
            f"{m}.{b}".lstrip(".") for m, sub in module.named_modules() for b in sub._non_persistent_buffers_set
        }
        for name, full in self._tensors(module, prefix, skip):
            target = device_for(self.device_map, full)
            tensor = module.get_parameter(name) if _is_param(module, name) else module.get_buffer(name)
            if tensor is None or tensor.device.type == "meta":
                continue
            if name in transient:  # e.g. rotary inv_freq: Accelerate never offloads non-persistent buffers
                set_module_tensor_to_device(module, name, self._device(full))
            elif target == "disk":
                if write or full not in self.index:
                    offload_weight(tensor.detach().cpu(), full, self.folder, index=self.index)
                set_module_tensor_to_device(module, name, "meta")
            else:
                set_module_tensor_to_device(module, name, target)
        _return_freed_memory()

    def release(self) -> None:
        """Free what calibration no longer references (the float Linears a stage replaced sit in reference cycles)
        and return the freed heap pages to the OS, so that the next stage's working memory does not add to them."""
        _return_freed_memory()

    def float_copy(self, block: nn.Module, prefix: str) -> nn.Module:
        """The float copy of ``block`` (named ``prefix`` in the model) that bias compensation runs beside it.

        A block on ``"disk"`` gets a copy that streams its weights from the offload store: each module loads its
        tensors for its forward and drops them after (Accelerate's offloading hook), so the copy holds about one
        Linear at a time and the quantized block's replaced float Linears are freed as soon as they are packed.
        Any other block gets :func:`shared_float_copy`.
        """
        names = [prefix + name for name, _ in block.named_parameters()]
        on_disk = device_for(self.device_map, prefix.rstrip(".")) == "disk"
        if not on_disk or self.loader is None or not all(name in self.loader for name in names):
            return shared_float_copy(block)
        memo: dict[int, object] = {id(b): b for b in block.buffers()}
        for p in block.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        fblock = copy.deepcopy(block, memo)
        attach_align_device_hook(
            fblock, self.execution_device, offload=True, weights_map=self.loader, module_name=prefix.rstrip(".")
        )
        return fblock

    def dispatch(self) -> None:
        """Attach fresh Accelerate hooks with the original device map; packed buffers stay offloaded too."""
        live = set(self.model.state_dict())
        self.index = {k: v for k, v in self.index.items() if k in live}
        if self.folder is not None and any(v.get("safetensors_file") is None for v in self.index.values()):
            save_offload_index({k: v for k, v in self.index.items() if v.get("safetensors_file") is None}, self.folder)
        dispatch_model(
            self.model,
            device_map=self.device_map,
            main_device=str(self.execution_device),
            offload_dir=self.folder,
            offload_index=self.index or None,
            offload_buffers=True,
        )
        for module in self.model.modules():
            hook = getattr(module, "_hf_hook", None)
            if hasattr(module, "reset_cache") and isinstance(hook, AlignDevicesHook) and hook.offload:
                add_hook_to_module(module, OffloadedCacheHook.like(hook))


def shared_float_copy(block: nn.Module) -> nn.Module:
    """A copy of ``block``'s modules that shares its tensors: a float copy that costs no weight memory.

    Calibration replaces the block's Linears by new packed modules and never writes the float tensors in place, so
    the copy keeps computing the float block. The replaced float weights live on in it until it is freed, beside the
    packed layers' dense caches: it saves a deep copy's bytes only until those caches build up.
    """
    memo: dict[int, object] = {id(t): t for t in itertools.chain(block.parameters(), block.buffers())}
    return copy.deepcopy(block, memo)


def float_copy(block: nn.Module, placement: "OffloadedCalibration | None", prefix: str) -> nn.Module:
    """The float copy of ``block`` for the float stream: streamed from the offload store for a block on disk
    (:meth:`OffloadedCalibration.float_copy`), else sharing the block's tensors (:func:`shared_float_copy`)."""
    return placement.float_copy(block, prefix) if placement is not None else shared_float_copy(block)


class OffloadedCacheHook(AlignDevicesHook):
    """Accelerate's offloading hook that also drops the module's derived dense cache after each forward.

    A packed layer caches its dequantized weight; on an offloaded module that cache would keep the weight resident
    after the hook has put the packed buffers back on ``meta``. (Accelerate hooks each module that holds tensors
    itself, so every offloaded packed layer gets its own hook.)
    """

    @classmethod
    def like(cls, hook: AlignDevicesHook) -> "OffloadedCacheHook":
        """The same hook (devices, weights map, options) with the cache dropping added."""
        return cls(
            execution_device=hook.execution_device,
            offload=hook.offload,
            io_same_device=hook.io_same_device,
            weights_map=hook.weights_map,
            offload_buffers=hook.offload_buffers,
            place_submodules=hook.place_submodules,
            skip_keys=hook.skip_keys,
            tied_params_map=hook.tied_params_map,
        )

    def post_forward(self, module: nn.Module, output: object) -> object:
        output = super().post_forward(module, output)
        module.reset_cache()
        return output


#: glibc ``mallopt`` parameter numbers (malloc.h).
_M_MMAP_THRESHOLD = -3
#: Allocations at least this large get their own mapping, returned to the OS on free.
MMAP_THRESHOLD = 1 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def bound_heap_growth() -> None:
    """Make glibc serve allocations of 1 MiB and more from their own mappings, returned to the OS when freed.

    An offloaded model loads each block's tensors and dense weights for every forward and frees them after. glibc's
    default raises its mmap threshold after the first large free (up to 32 MiB), so later allocations of that size
    come from the heap, whose freed pages are kept: after a few forward passes the process holds as much memory as the
    whole dense model. A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic adjustment off)
    keeps the resident memory bounded by one block. It is a process-wide setting; it has no effect off glibc.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _return_freed_memory() -> None:
    """Free the calibrated block now and hand the heap pages back to the OS, so RSS stays bounded by one block.

    The replaced float Linears sit in reference cycles that Python's collector would reach only much later, and glibc
    keeps freed pages in its heap.
    """
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def drop_dense_caches(module: nn.Module) -> None:
    """Drop the cached dense weight of every packed layer in ``module``."""
    for sub in module.modules():
        if hasattr(sub, "reset_cache"):
            sub.reset_cache()


def _is_param(module: nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return leaf in owner._parameters
