"""File helpers shared by the caches, checkpoints and run artifacts: hashing, and writes that are
atomic (a temporary file beside the target, then a rename), so no reader ever sees half a file."""

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path

from safetensors.torch import load_file, save_file

from recbole_layersel.errors import LayerSelError


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(tensors: dict) -> str:
    """One hash of named tensors: their names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # numpy has no bfloat16: hash floats as float64, which holds every float dtype exactly
        digest.update((tensor.double() if tensor.is_floating_point() else tensor).numpy().tobytes())
    return digest.hexdigest()


@cache
def code_sha256(modules: tuple[str, ...] = (), package: Path = Path(__file__).parent) -> str:
    """One hash of the source of this package's ``modules`` (e.g. ``("titles", "llm")``), or of all of it:
    a cached result is reused only by the code that computed it."""
    paths = [package / f"{name}.py" for name in modules] or sorted(package.glob("*.py"))
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise LayerSelError(f"code_sha256: no module {', '.join(missing)} in {package}; name this "
                            "package's modules without the .py, e.g. ('titles', 'llm').")
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@contextmanager
def replaced_on_success(path: Path):
    """Yields a unique temporary name beside ``path`` to write to: when the block succeeds it replaces
    ``path``, when it fails it is removed. Unique, so that writers of the same file never collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial)
        else:
            partial.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    with replaced_on_success(path) as partial:
        partial.write_text(text + "\n", encoding="utf-8")


def write_folder(folder: Path, write, marker: str) -> None:
    """``write(staging)`` fills a new folder beside ``folder``, which then replaces ``folder``: a reader
    sees the old folder or the new one, never half of one. ``marker`` names the file that every folder
    we write holds (``write`` must create it): an existing ``folder`` without it is not ours, and is
    refused rather than replaced."""
    check_replaceable(folder, marker)
    old = None
    with replaced_on_success(folder) as staging:
        staging.mkdir()  # not mkdtemp: its 0700 mode would make the folder private to this user
        write(staging)
        if not (staging / marker).is_file():
            raise RuntimeError(f"write_folder: the writer did not create the marker file {marker!r}")
        if folder.exists():  # os.replace cannot replace a folder: move the old one aside, delete it last
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(folder, old)
    if old is not None:
        shutil.rmtree(old)


def check_replaceable(folder: Path, marker: str) -> None:
    """Refuse, naming the folder, to replace anything at ``folder`` that we did not write (an empty
    folder holds nothing to lose and may be replaced)."""
    if not (folder.exists() or folder.is_symlink()):
        return
    ours_or_empty = (folder / marker).is_file() or not any(folder.iterdir()) if folder.is_dir() else False
    if ours_or_empty and not folder.is_symlink():
        return
    raise LayerSelError(
        f"{folder} already exists and was not written by recbole_layersel (it has no {marker}), so it is "
        "left untouched. Give a path that does not exist yet, an empty folder, or one of our earlier "
        "outputs, or move that one away first."
    )


def save_figure(figure, path: Path) -> None:
    """A matplotlib figure as a PNG, written atomically (a failed write leaves no partial file)."""
    with replaced_on_success(path) as partial:
        figure.savefig(partial, format="png", dpi=120)


@dataclass(frozen=True)
class StageSettings:
    """The config values one stage reads, and the only way it reads them: the fields are part of the
    stage's cache key, so no setting that changes a result can be left out of it."""

    @classmethod
    def from_config(cls, config):
        return cls(**{field.name: config[field.name] for field in fields(cls)})


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
        with replaced_on_success(self.path(stage, key, ".safetensors")) as partial:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, partial)
