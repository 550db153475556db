"""File helpers shared by the caches, checkpoints and run artifacts: hashing, and writes that are
atomic (a temporary file beside the target, then a rename), so no reader ever sees half a file."""

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from safetensors.torch import load_file, save_file


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def partial_path(path: Path) -> Path:
    """A temporary name beside ``path``, unique, so that writers of the same file never collide."""
    return path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, path)


def write_folder(folder: Path, write) -> None:
    """``write(staging)`` fills a new folder beside ``folder``, which then replaces ``folder``: a reader
    sees the old folder or the new one, never half of one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()  # not mkdtemp: its 0700 mode would make the folder private to this user
    try:
        write(staging)
        if folder.exists():  # move the old folder aside first, delete it last
            old = staging.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(folder, old)
            os.replace(staging, folder)
            shutil.rmtree(old)
        else:
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_figure(figure, path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically (a failed write leaves no partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        figure.savefig(partial, format="png", dpi=120)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class StageCache:
    """JSON and safetensors results under ``<cache>/stages/<stage>/<key hash>``, written atomically."""

    def __init__(self, root: Path):
        self.root = Path(root) / "stages"

    def path(self, stage: str, key: dict, suffix: str) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self.root / stage / f"{digest}{suffix}"

    def load_json(self, stage: str, key: dict):
        path = self.path(stage, key, ".json")
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def save_json(self, stage: str, key: dict, value) -> None:
        write_atomic(self.path(stage, key, ".json"), json.dumps(value, indent=1))

    def load_tensors(self, stage: str, key: dict):
        path = self.path(stage, key, ".safetensors")
        return load_file(path) if path.is_file() else None

    def save_tensors(self, stage: str, key: dict, tensors: dict) -> None:
        path = self.path(stage, key, ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(path)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, partial)
        os.replace(partial, path)
