"""Atomic writes and the stage cache: a reader sees the old file or the whole new one, and a failed
write leaves nothing behind."""

import pytest
import torch

from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import StageCache, code_sha256, replaced_on_success, write_atomic, write_folder


def test_write_atomic_replaces_the_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "sub" / "report.json"
    write_atomic(path, "old")
    write_atomic(path, "new")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_partial(tmp_path):
    path = tmp_path / "report.json"
    write_atomic(path, "old")
    with pytest.raises(OSError, match="disk full"):
        with replaced_on_success(path) as partial:
            partial.write_text("half")
            raise OSError("disk full")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_write_folder_swaps_whole_folders(tmp_path):
    folder = tmp_path / "export"
    write_folder(folder, lambda staging: (staging / "ours.json").write_text("1"), "ours.json")
    write_folder(folder, lambda staging: (staging / "ours.json").write_text("2"), "ours.json")
    assert [p.name for p in folder.iterdir()] == ["ours.json"] and (folder / "ours.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]

    def fail(staging):
        (staging / "ours.json").write_text("3")
        raise RuntimeError("write failed")

    with pytest.raises(RuntimeError, match="write failed"):
        write_folder(folder, fail, "ours.json")
    assert (folder / "ours.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_stage_cache_returns_what_was_saved_under_the_same_key_only(tmp_path):
    cache = StageCache(tmp_path)
    key = {"stage": "distill", "steps": 10}
    assert cache.load_json("distill", key) is None and cache.load_tensors("distill", key) is None
    cache.save_json("distill", key, {"after": 0.5})
    cache.save_tensors("distill", key, {"weight": torch.arange(6.0).view(2, 3)})
    assert cache.load_json("distill", {"steps": 10, "stage": "distill"}) == {"after": 0.5}  # key order
    assert torch.equal(cache.load_tensors("distill", key)["weight"], torch.arange(6.0).view(2, 3))
    assert cache.load_json("distill", {**key, "steps": 11}) is None


def test_write_folder_refuses_a_folder_or_file_that_is_not_ours(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(LayerSelError, match=f"{folder} already exists.*no ours.json"):
        write_folder(folder, lambda staging: (staging / "ours.json").write_text("1"), "ours.json")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging folder left either
    file = tmp_path / "a-file"
    file.write_text("keep me too")
    with pytest.raises(LayerSelError, match="a-file already exists"):
        write_folder(file, lambda staging: (staging / "ours.json").write_text("1"), "ours.json")
    assert file.read_text() == "keep me too"


def test_write_folder_fills_an_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    write_folder(folder, lambda staging: (staging / "ours.json").write_text("1"), "ours.json")
    assert [p.name for p in folder.iterdir()] == ["ours.json"]


def test_a_code_hash_changes_with_the_modules_it_names_only(tmp_path):
    hashes = code_sha256.__wrapped__  # the process's cache assumes its code does not change; this test's does
    (tmp_path / "titles.py").write_text("A = 1\n")
    (tmp_path / "model.py").write_text("B = 1\n")
    titles, everything = hashes(("titles",), tmp_path), hashes(package=tmp_path)
    (tmp_path / "model.py").write_text("B = 2\n")
    assert hashes(("titles",), tmp_path) == titles
    assert hashes(package=tmp_path) != everything
    (tmp_path / "titles.py").write_text("A = 2\n")
    assert hashes(("titles",), tmp_path) != titles
    with pytest.raises(LayerSelError, match="no module llm.py"):
        hashes(("titles", "llm"), tmp_path)
