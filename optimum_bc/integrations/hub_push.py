"""Upload of a saved BC folder to the Hub in one commit, with its card generated for the target repository."""

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .card_folder import _folder_report_and_provenance, _plot, _previous_cards, _read_bc_config, card_for_folder
from .hub_card import is_generated_card
from .metadata import CARD_FILENAME, PLOT_FILENAME


logger = logging.getLogger(__name__)


class PushError(RuntimeError):
    """An upload to the Hub failed; the message says which step, and that nothing local was changed."""


def _folder_files(folder: Path) -> list[Path]:
    """Files to upload: everything under ``folder`` except hidden entries (``.cache``, ``.git``, ...)."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append(path)
    return files


def commit_operations(
    directory: str | os.PathLike[str], repo_id: str, *, tags: Iterable[str] = (), scratch: str | None = None
) -> list[Any]:
    """The ``CommitOperationAdd`` list uploading a saved BC folder, with its card (re)generated for ``repo_id``.

    README.md is generated when missing or when it is an untouched optimum-bc card (so the loading snippet names
    ``repo_id``); a README.md someone wrote or edited is uploaded as it is. ``layer_errors.png`` is rendered into
    ``scratch`` when the card links it and the folder lacks it. The folder itself is never written to.
    """
    from huggingface_hub import CommitOperationAdd

    folder = Path(directory)
    _read_bc_config(folder)
    files = _folder_files(folder)
    if not any(f.suffix == ".safetensors" for f in files):
        raise ValueError(
            f"{os.fspath(folder)!r} holds no .safetensors weights; pass a folder written by save_pretrained"
        )
    ops = {
        f.relative_to(folder).as_posix(): CommitOperationAdd(
            path_in_repo=f.relative_to(folder).as_posix(), path_or_fileobj=str(f)
        )
        for f in files
    }
    readme = folder / CARD_FILENAME
    old = readme.read_text(encoding="utf-8") if readme.is_file() else None
    if old is None or is_generated_card(old):
        has_plot = PLOT_FILENAME in ops
        if not has_plot:
            report, _ = _folder_report_and_provenance(folder)
            target = Path(scratch or tempfile.mkdtemp(prefix="optimum-bc-")) / PLOT_FILENAME
            if _plot(report, target):
                ops[PLOT_FILENAME] = CommitOperationAdd(
                    path_in_repo=PLOT_FILENAME, path_or_fileobj=target.read_bytes()
                )
                has_plot = True
        card = card_for_folder(folder, repo_id=repo_id, tags=tags, kept_cards=_previous_cards(old), has_plot=has_plot)
        ops[CARD_FILENAME] = CommitOperationAdd(
            path_in_repo=CARD_FILENAME, path_or_fileobj=card.content.encode("utf-8")
        )
    else:
        logger.info("optimum-bc: %s was written or edited by hand; uploading it unchanged", readme)
    return list(ops.values())


def push_folder(
    directory: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    tags: Iterable[str] = (),
    api: Any = None,
) -> Any:
    """Upload a saved BC folder to the Hub in one commit; returns the ``CommitInfo``.

    The token comes from ``token``, else ``HF_TOKEN`` or ``hf auth login`` (huggingface_hub's usual lookup). A Hub
    commit is atomic: if any step fails, nothing is committed, the local folder is untouched (it is only read), and
    :class:`PushError` names the failed step. Bad input (not a BC folder) raises ``ValueError`` before any request.
    """
    from huggingface_hub import HfApi

    from ..version import __version__

    api = api or HfApi(library_name="optimum-bc", library_version=__version__)
    with tempfile.TemporaryDirectory(prefix="optimum-bc-push-") as scratch:
        operations = commit_operations(directory, repo_id, tags=tags, scratch=scratch)
        bits = _read_bc_config(Path(directory))["quantization_config"].get("bits")
        message = commit_message or f"Upload {bits}-bit optimum-bc model"
        step = "create the repository"
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
            if revision is not None and not revision.startswith("refs/pr"):
                step = f"create the branch {revision!r}"
                api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
            step = f"commit {len(operations)} files"
            return api.create_commit(
                repo_id,
                operations=operations,
                commit_message=message,
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
                token=token,
            )
        except Exception as err:  # noqa: BLE001 - every failure becomes one PushError naming the step
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise PushError(
                f"upload of {os.fspath(directory)!r} to {repo_id!r} failed while trying to {step}: "
                f"{type(err).__name__}: {detail}. Nothing was committed and the local folder is unchanged."
            ) from err
