"""Data parallelism with 2 CPU processes (gloo) against a single process, on tiny models: the
importance and distillation passes directly, the hooks under `accelerate launch`, and RecBole's own
DDP (`--nproc`) training LayerSelLLM."""

import json
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from transformers import AutoModel

from recbole_layersel import distributed
from recbole_layersel.backbone import CompactBackbone
from recbole_layersel.distill import distill_bridges
from recbole_layersel.importance import compute_importance
from recbole_layersel.quick_start import run
from tests.conftest import REPO_ROOT, write_atomic_dataset
from tests.test_quick_start import HOOKS_SMALL
from tests.tiny_models import CONFIGS, HIDDEN, NUM_LAYERS, save_tiny_llm

ROWS, SEQ, BATCH = 10, 6, 3  # 4 mini-batches of 3, 3, 3, 1 rows: rank 0 gets two, rank 1 two


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def importance_and_distillation() -> dict:
    """Importance of a tiny Llama's 6 layers, then 8 distillation steps of a 3-layer compact model."""
    torch.manual_seed(0)
    config = CONFIGS["llama"]()
    config.initializer_range = 0.1
    model = AutoModel.from_config(config).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(ROWS, SEQ, HIDDEN, generator=generator)
    mask = (torch.arange(SEQ) < torch.randint(1, SEQ + 1, (ROWS,), generator=generator)[:, None]).long()
    targets = torch.randint(0, 5, (ROWS,), generator=generator)
    head = torch.randn(HIDDEN, 5, generator=generator)

    def rec_loss(states, rows):
        last_states = states[torch.arange(len(states)), mask[rows].sum(1) - 1]
        return torch.nn.functional.cross_entropy(last_states @ head, targets[rows])

    full = CompactBackbone(model, list(range(NUM_LAYERS)))
    result, teacher = compute_importance(full, inputs, mask, lambda _: rec_loss, batch_size=BATCH)
    compact = CompactBackbone(AutoModel.from_config(config).eval(), [0, 3, 5], bridge_rank=4)
    torch.manual_seed(2)  # the same bridge initialisation in every process
    for bridge in compact.bridges:
        torch.nn.init.normal_(bridge.up.weight, std=0.01)
    # 7 training rows in batches of 3, 3, 1: on the last, the second process has no row.
    report = distill_bridges(compact, inputs, mask, teacher["last"], steps=8, lr=0.01, batch_size=3,
                             heldout_fraction=0.3)
    return {"raw": result.raw, "ranking": result.ranking, "teacher": teacher["last"],
            "report": report.to_json(), "bridges": compact.bridges.state_dict()}


def _worker(rank: int, world: int, port: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert distributed.active() and distributed.rank_and_world() == (rank, world)
        torch.save(importance_and_distillation(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_batches_are_shared_out_round_robin_and_are_all_mine_alone():
    assert distributed.my_batches(10, 3) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert not distributed.active() and distributed.all_reduce_sum(torch.ones(2)).tolist() == [1, 1]


def test_importance_and_distillation_in_two_processes_match_one(tmp_path):
    single = importance_and_distillation()
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    for rank in range(2):
        parallel = torch.load(f"{out}.{rank}")
        assert parallel["ranking"] == single["ranking"]
        for criterion, values in single["raw"].items():
            assert parallel["raw"][criterion] == pytest.approx(values, rel=1e-4, abs=1e-6), criterion
        torch.testing.assert_close(parallel["teacher"], single["teacher"])
        assert parallel["report"]["losses"] == pytest.approx(single["report"]["losses"], rel=1e-4)
        assert parallel["report"]["after"] == pytest.approx(single["report"]["after"], rel=1e-4)
        for name, weight in single["bridges"].items():
            torch.testing.assert_close(parallel["bridges"][name], weight, rtol=1e-4, atol=1e-6)
    assert single["report"]["losses"][-1] < single["report"]["losses"][0]  # it did train


def write_run_config(tmp_path, **settings) -> str:
    """A yaml config for the tiny dataset and a tiny Llama (the command line cannot carry load_col)."""
    write_atomic_dataset(tmp_path / "data", "tiny")
    save_tiny_llm(tmp_path / "llm", CONFIGS["llama"]())
    config = {"data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "saved"),
              "llm_path": str(tmp_path / "llm"), "llm_cache_dir": str(tmp_path / "cache"),
              "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
              "title_field": "title", "embedding_size": 8, "title_max_tokens": 6, "num_layers": 3,
              "show_progress": False, "importance_batch_size": 2, "use_gpu": False, **HOOKS_SMALL, **settings}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def hooks_artifacts(folder) -> dict:
    """The hooks' reports in ``folder``; distillation.json only when the kept layers have bridges."""
    return {name: json.loads((folder / f"{name}.json").read_text())
            for name in ("importance", "selection", "distillation") if (folder / f"{name}.json").exists()}


def test_hooks_under_accelerate_launch_match_one_process(tmp_path):
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    command = [str(REPO_ROOT / "run_recbole.py"), "--model=LayerSelLLM", "--dataset=tiny",
               "--hooks_only=True"]
    for folder, launcher in ((single, [sys.executable]),
                             (parallel, [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                         "--num_processes=2", "--num_machines=1", "--mixed_precision=no",
                                         "--dynamo_backend=no", f"--main_process_port={free_port()}"])):
        folder.mkdir()
        config = write_run_config(folder, artifacts_dir=str(folder / "artifacts"))
        done = subprocess.run([*launcher, *command, f"--config_files={config}"], cwd=folder,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = hooks_artifacts(single / "artifacts"), hooks_artifacts(parallel / "artifacts")
    assert two["selection"] == one["selection"]
    assert two["importance"]["ranking"] == one["importance"]["ranking"]
    for criterion, values in one["importance"]["raw"].items():
        assert two["importance"]["raw"][criterion] == pytest.approx(values, rel=1e-4, abs=1e-6), criterion
    assert two.keys() == one.keys()
    if "distillation" in one:  # the search may keep adjacent layers; distillation's own test is above
        assert two["distillation"]["losses"] == pytest.approx(one["distillation"]["losses"], rel=1e-4)
        assert two["distillation"]["after"] == pytest.approx(one["distillation"]["after"], rel=1e-4)


@pytest.mark.parametrize("train_mode", ["frozen", "lora"])
def test_recbole_ddp_trains_layersel_like_one_process(tmp_path, argv, train_mode):
    # Unshuffled, RecBole's DistributedSampler gives each of 2 processes every other row of a batch (12
    # training windows, one per user, 12 test users: no padding); the loss is a mean over the positions
    # of both processes, so every step takes the gradient one process takes.
    # No dropout (head, LoRA): each process draws from its own random stream.
    results = {}
    for nproc in (1, 2):
        folder = tmp_path / f"nproc{nproc}"
        folder.mkdir()
        config = write_run_config(folder, shuffle=False, train_batch_size=16, eval_batch_size=16,
                                  epochs=2, layer_strategy="importance", train_mode=train_mode,
                                  lora_dropout=0.0, head_dropout=0.0)
        results[nproc] = run("LayerSelLLM", "tiny", config_file_list=[config], nproc=nproc, port=free_port())
    one, two = results[1], results[2]
    assert two["selected_layers"] == one["selected_layers"]
    assert two["test_result"] == pytest.approx(one["test_result"], abs=2e-4)
    assert two["best_valid_score"] == pytest.approx(one["best_valid_score"], abs=2e-4)
