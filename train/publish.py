"""Publish a trained model folder (Hub model repo) or an index folder (Hub dataset repo).

    python -m train.publish --model-dir out/lgffem-lung --repo-id ORG/lgffem-lung [--private] [--revision BR]
    python -m train.publish --index-dir indexes/lung --repo-id ORG/lung-index --dry-run

The files to upload are listed first (checkpoints, hidden folders and temporary files are
left out; a model folder must hold every Python file its ``auto_map`` loads); ``--dry-run``
prints that list and stops, otherwise exactly those files are uploaded with
``HfApi.create_repo`` and ``HfApi.upload_folder``. The token comes from ``--token``,
``HF_TOKEN`` or ``huggingface-cli login``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi

logger = logging.getLogger(__name__)

# A folder is only published when it holds what its users need to load it (for a model, also
# the remote code its auto_map names: see code_files).
REQUIRED = {
    "model": ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"),
    "dataset": ("index.faiss", "metadata.parquet", "manifest.json"),
}
# Never uploaded: training state, temporary and hidden files.
EXCLUDED = ("checkpoints/*", "*.tmp", "*.tmp/*", "*.lock", "*.pyc", "__pycache__/*")


@dataclass(frozen=True)
class UploadPlan:
    """What one publish call uploads.

    Attributes:
        folder: the local folder.
        repo_id: ``ORG/NAME`` on the Hub.
        repo_type: ``"model"`` or ``"dataset"``.
        files: paths relative to ``folder`` (POSIX), sorted.
        sizes: bytes of each file, same order.
        private: create the repository as private.
        revision: branch to upload to (``None``: the default branch).
        commit_message: the commit's message.
    """

    folder: Path
    repo_id: str
    repo_type: str
    files: tuple[str, ...]
    sizes: tuple[int, ...]
    private: bool
    revision: Optional[str]
    commit_message: str

    def describe(self) -> str:
        """The exact upload as text (what ``--dry-run`` prints)."""
        lines = [
            f"repo: {self.repo_id} (type {self.repo_type}, {'private' if self.private else 'public'}, "
            f"revision {self.revision or 'main'})",
            f"folder: {self.folder}",
            f"commit message: {self.commit_message}",
            f"files ({len(self.files)}, {_human(sum(self.sizes))}):",
        ]
        lines += [f"  {name}  {size} bytes" for name, size in zip(self.files, self.sizes)]
        return "\n".join(lines)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"


_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


def code_files(folder: str | Path) -> list[str]:
    """The Python files that loading a model folder with ``trust_remote_code`` runs, sorted.

    These are the modules named in the ``auto_map`` of ``config.json`` and
    ``preprocessor_config.json`` (``configuration_lgffem.py``, ``modeling_lgffem.py``,
    ``image_processing_lgffem.py``; a folder saved before December 2026 names only
    ``modeling_lgffem.py``) and, recursively, what they import relatively (``from .x import``).
    Files that are named but absent are listed too; references into other repos (``repo--module``)
    are not.

    Raises:
        ValueError: a JSON file is not a valid JSON object.
    """
    root = Path(folder)
    modules = set()
    for name in ("config.json", "preprocessor_config.json"):
        path = root / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a JSON object")
        auto_map = data.get("auto_map") or {}
        for ref in auto_map.values():
            for target in ref if isinstance(ref, (list, tuple)) else [ref]:
                if isinstance(target, str) and "--" not in target and "." in target:
                    modules.add(target.rsplit(".", 1)[0])
    todo, seen = sorted(modules), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = root / f"{module}.py"
        if path.is_file():
            todo += _RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8"))
    return sorted(f"{module}.py" for module in seen)


def _excluded(rel: str) -> bool:
    parts = rel.split("/")
    if any(p.startswith(".") for p in parts):
        return True
    return any(fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(parts[-1], pattern) for pattern in EXCLUDED)


def plan_upload(
    folder: str | Path,
    repo_id: str,
    repo_type: str,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
) -> UploadPlan:
    """Check ``folder`` and list the files to upload.

    Raises:
        ValueError: bad ``repo_id`` or ``repo_type``, or a required file (for a model, also one
            of its :func:`code_files`) is missing.
        FileNotFoundError: ``folder`` does not exist.
    """
    if repo_type not in REQUIRED:
        raise ValueError(f"repo_type must be 'model' or 'dataset', got {repo_type!r}")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise ValueError(f"repo_id must look like ORG/NAME, got {repo_id!r}")
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"folder not found: {root}")
    missing = [name for name in REQUIRED[repo_type] if not (root / name).is_file()]
    what = "a trained model folder (python -m train)" if repo_type == "model" else "an index (python -m index_build)"
    if missing:
        raise ValueError(f"{root} is not {what}: missing {', '.join(missing)}")
    if repo_type == "model":
        code = code_files(root)
        if not code:
            raise ValueError(f"{root} is not {what}: config.json names no model code (no auto_map)")
        missing = [name for name in code if not (root / name).is_file()]
        if missing:
            raise ValueError(f"{root} is not {what}: missing {', '.join(missing)} (loaded through its auto_map)")
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not _excluded(p.relative_to(root).as_posix())
    )
    kind = "LGFFEM model" if repo_type == "model" else "LGFFEM index"
    return UploadPlan(
        folder=root,
        repo_id=repo_id,
        repo_type=repo_type,
        files=tuple(files),
        sizes=tuple((root / f).stat().st_size for f in files),
        private=private,
        revision=revision,
        commit_message=commit_message or f"Upload {kind} from {root.name}",
    )


def publish(plan: UploadPlan, api: Optional[HfApi] = None, token: Optional[str] = None) -> str:
    """Create the repository (if needed), the branch ``plan.revision`` (if given) and upload the files.

    Returns:
        The URL of the commit.
    """
    api = api if api is not None else HfApi(token=token)
    repo_url = api.create_repo(repo_id=plan.repo_id, repo_type=plan.repo_type, private=plan.private, exist_ok=True)
    logger.info("repository %s", repo_url)
    if plan.revision:
        api.create_branch(repo_id=plan.repo_id, repo_type=plan.repo_type, branch=plan.revision, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(plan.folder),
        repo_id=plan.repo_id,
        repo_type=plan.repo_type,
        revision=plan.revision,
        commit_message=plan.commit_message,
        allow_patterns=list(plan.files),
    )
    url = getattr(commit, "commit_url", None) or str(commit)
    logger.info("uploaded %d files to %s: %s", len(plan.files), plan.repo_id, url)
    return url


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.publish",
        description="Upload a trained LGFFEM folder to a Hub model repo, or an index folder to a Hub dataset repo.",
        allow_abbrev=False,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="folder written by python -m train (model repo)")
    src.add_argument("--index-dir", help="folder written by python -m index_build (dataset repo)")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", default=None, help="branch to upload to (created if missing); default main")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--dry-run", action="store_true", help="print exactly what would be uploaded, upload nothing")
    return p


def main(argv: Optional[Sequence[str]] = None, api: Optional[HfApi] = None) -> int:
    """Entry point of ``python -m train.publish``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder, repo_type = (args.model_dir, "model") if args.model_dir else (args.index_dir, "dataset")
    try:
        plan = plan_upload(folder, args.repo_id, repo_type, args.private, args.revision, args.commit_message)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    print(("DRY RUN, nothing uploaded. Would upload:\n" if args.dry_run else "Uploading:\n") + plan.describe())
    if args.dry_run:
        return 0
    print(publish(plan, api=api, token=args.token))
    return 0


if __name__ == "__main__":
    sys.exit(main())
