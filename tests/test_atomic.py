"""atomic_folder: the target is the old folder or the new one, complete, whatever happens to the writer."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from optimum_bc.export import atomic
from optimum_bc.export.atomic import atomic_folder, cleanup_leftovers


def _write(folder: Path, **files: str) -> None:
    for name, text in files.items():
        (folder / name).write_text(text)


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def test_creates_a_new_folder_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_folder(target, overwrite=False) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not target.exists()
        _write(tmp, **{"a.txt": "new"})
    assert _contents(target) == {"a.txt": "new"}
    assert _siblings(target) == []


def test_replaces_an_existing_folder_whole(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    _write(target, **{"model.safetensors": "old", "config.json": "old"})
    with atomic_folder(target, overwrite=True) as tmp:
        _write(tmp, **{"config.json": "new", "model-00001-of-00002.safetensors": "new"})
        assert _contents(target) == {"config.json": "old", "model.safetensors": "old"}  # untouched until the swap
    assert _contents(target) == {"config.json": "new", "model-00001-of-00002.safetensors": "new"}
    assert _siblings(target) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replace_without_renameat2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: False)
    target = tmp_path / "out"
    target.mkdir()
    _write(target, **{"x": "old"})
    with atomic_folder(target, overwrite=True) as tmp:
        _write(tmp, **{"y": "new"})
    assert _contents(target) == {"y": "new"}
    assert _siblings(target) == []


def test_an_exception_leaves_the_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    _write(target, **{"x": "old"})
    with pytest.raises(RuntimeError, match="boom"), atomic_folder(target, overwrite=True) as tmp:
        _write(tmp, **{"x": "half"})
        raise RuntimeError("boom")
    assert _contents(target) == {"x": "old"}
    assert _siblings(target) == []


def test_refuses_a_non_empty_target_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    with atomic_folder(target, overwrite=False) as tmp:  # an empty folder may be filled
        _write(tmp, **{"x": "1"})
    with pytest.raises(ValueError, match=r"'.*out' exists and is not empty; choose a new folder"):
        with atomic_folder(target, overwrite=False):
            raise AssertionError("the block must not run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        with atomic_folder(tmp_path / "file", overwrite=True):
            raise AssertionError("the block must not run")


def test_concurrent_writers_get_their_own_folders_and_a_late_one_fails(tmp_path: Path) -> None:
    target = tmp_path / "out"
    first, second = atomic_folder(target, overwrite=False), atomic_folder(target, overwrite=False)
    tmp1, tmp2 = first.__enter__(), second.__enter__()
    assert tmp1 != tmp2
    _write(tmp1, **{"bits": "4"})
    _write(tmp2, **{"bits": "8"})
    cleanup_leftovers(target)  # a third writer starting now must not touch live folders
    assert tmp1.is_dir() and tmp2.is_dir()
    first.__exit__(None, None, None)
    with pytest.raises(ValueError, match="exists and is not empty"):
        second.__exit__(None, None, None)
    assert _contents(target) == {"bits": "4"}
    assert _siblings(target) == []


def _run_killed(script: str) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_a_killed_writer_leaves_the_old_folder_and_its_leftovers_are_cleaned(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    _write(target, **{"x": "old"})
    _run_killed(
        f"""
        import os, signal
        from optimum_bc.export.atomic import atomic_folder
        with atomic_folder({str(target)!r}, overwrite=True) as tmp:
            (tmp / "x").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert _contents(target) == {"x": "old"}
    assert len(_siblings(target)) == 2  # the dead writer's folder and lock
    with atomic_folder(target, overwrite=True) as tmp:
        _write(tmp, **{"x": "new"})
    assert _contents(target) == {"x": "new"}
    assert _siblings(target) == []


def test_a_writer_killed_between_the_fallback_renames_gets_its_old_folder_back(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    _write(target, **{"x": "old"})
    _run_killed(
        f"""
        import os, signal
        from optimum_bc.export import atomic
        atomic._renameat2 = lambda src, dst, flags: False
        real_rename = os.rename
        def rename(src, dst):
            real_rename(src, dst)
            name = os.path.basename(str(dst))
            if name.startswith(".out.optimum-bc-old.") and not name.endswith(".lock"):
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = rename
        with atomic.atomic_folder({str(target)!r}, overwrite=True) as tmp:
            (tmp / "x").write_text("new")
        """
    )
    assert not target.exists()  # readers see no folder, never a mix
    cleanup_leftovers(target)
    assert _contents(target) == {"x": "old"}
    assert _siblings(target) == []


def test_writes_into_a_missing_parent(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    with atomic_folder(os.fspath(target), overwrite=False) as tmp:
        _write(tmp, **{"x": "1"})
    assert _contents(target) == {"x": "1"}


def test_a_target_that_is_a_link_is_replaced_and_what_it_points_to_kept(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    _write(real, **{"x": "old"})
    target = tmp_path / "out"
    target.symlink_to(real)
    with atomic_folder(target, overwrite=True) as tmp:
        _write(tmp, **{"x": "new"})
    assert not target.is_symlink() and _contents(target) == {"x": "new"}
    assert _contents(real) == {"x": "old"}
    assert _siblings(target) == ["real"]
