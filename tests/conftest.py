"""Shared fixtures: tiny RecBole atomic datasets written by the tests themselves."""

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def write_atomic_dataset(folder: Path, name: str, *, n_users=12, n_items=15, per_user=8,
                         item_header="item_id:token\ttitle:token_seq\tprice:float",
                         item_row=lambda i: f"{i}\tItem number {i}\t{i}.5"):
    """A small sequential dataset: every user interacts with `per_user` items in time order."""
    path = folder / name
    path.mkdir(parents=True)
    rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(n_users):
        for step in range(per_user):
            rows.append(f"{user}\t{(user + 3 * step) % n_items}\t{1000 * user + step}")
    (path / f"{name}.inter").write_text("\n".join(rows) + "\n")
    items = [item_header] + [item_row(i) for i in range(n_items)]
    (path / f"{name}.item").write_text("\n".join(items) + "\n")
    return path


@pytest.fixture
def tiny_dataset(tmp_path):
    write_atomic_dataset(tmp_path / "data", "tiny")
    return tmp_path / "data"


@pytest.fixture
def argv(monkeypatch):
    """RecBole's Config reads sys.argv; give each test a clean command line."""
    monkeypatch.setattr(sys, "argv", ["pytest"])
    return sys.argv


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny tensors gain nothing from a thread pool, and on a busy 2-core machine a spinning pool costs
    seconds per call; real-model tests keep every core."""
    if request.node.get_closest_marker("real_model"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
