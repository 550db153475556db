"""The benchmark runs the real full and compact recommenders side by side (behaviour, not timings)."""

import json

import pytest
import torch

from recbole_layersel import bench
from recbole_layersel.bench import benchmark, main, markdown_table, peak_memory_bytes, tensor_bytes
from recbole_layersel.errors import LayerSelError
from tests.tiny_models import CONFIGS, NUM_LAYERS, save_tiny_llm


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return str(save_tiny_llm(tmp_path_factory.mktemp("bench") / "llm", CONFIGS["llama"]()))


def test_peak_memory_on_cpu_counts_what_a_call_allocates():
    a, b = torch.randn(256, 512), torch.randn(512, 1024)
    mib = 256 * 1024 * 4  # one (256, 1024) float32 result

    def two_results_alive():
        product = a @ b
        return (product * 2).sum()  # product and its double coexist, then both are freed

    assert mib <= peak_memory_bytes(lambda: a @ b, torch.device("cpu")) < mib + 4096
    assert 2 * mib <= peak_memory_bytes(two_results_alive, torch.device("cpu")) < 2 * mib + 4096
    assert tensor_bytes(torch.nn.Linear(10, 20)) == (10 * 20 + 20) * 4


def test_benchmark_writes_ratio_rows_for_each_k_and_all(tiny_llm, tmp_path):
    out = tmp_path / "out"
    main(["--llm-path", tiny_llm, "--num-layers", "3", "1", "8", "--batch-size", "3", "--seq-len", "5",
          "--num-items", "20", "--repeats", "3", "--embedding-size", "8", "--out", str(out)])
    result = json.loads((out / "bench.json").read_text())
    rows = result["rows"]
    assert [r["k"] for r in rows] == [1, 3, NUM_LAYERS]  # sorted; k > L dropped; all layers last
    assert rows[0]["layers"] == [0] and rows[1]["layers"] == [0, 2, 5]
    assert [r["ideal"] for r in rows] == [6.0, 2.0, 1.0]
    full = result["full"]
    for r in rows:  # every ratio is the full model's figure over the row's, timed in the same process
        mine = r["absolute"]
        assert r["speedup"] == pytest.approx(full["median_s"] / mine["median_s"])
        assert r["p95_speedup"] == pytest.approx(full["p95_s"] / mine["p95_s"])
        assert r["throughput_ratio"] == pytest.approx(mine["users_per_s"] / full["users_per_s"])
        assert r["train_speedup"] == pytest.approx(full["train_step_s"] / mine["train_step_s"])
        assert r["params_ratio"] == pytest.approx(mine["params"] / full["params"])
        assert r["share_of_ideal"] == pytest.approx(r["speedup"] / r["ideal"])
        assert r["train_speedup"] > 0 and r["absolute"]["train_step_s"] > 0
        assert r["train_share_of_ideal"] == pytest.approx(r["train_speedup"] / r["ideal"])
        assert r["absolute"]["p95_s"] >= r["absolute"]["median_s"] > 0
        assert r["absolute"]["peak_bytes"] > tensor_bytes(torch.nn.Linear(32, 8))
    assert result["full"]["p95_s"] >= result["full"]["median_s"]
    # Fewer layers, fewer parameters even with bridges (uniform 3 of 6: gaps 2 and 3, two linear bridges).
    assert rows[0]["params_ratio"] < rows[1]["params_ratio"] < 1
    assert rows[0]["peak_memory_ratio"] < 1
    assert rows[-1]["params_ratio"] == 1 and rows[-1]["peak_memory_ratio"] == pytest.approx(1, rel=0.05)

    report = (out / "bench.md").read_text()
    assert "python -m recbole_layersel.bench --llm-path" in report and "threads" in report
    assert markdown_table(result) in report and f"| all ({NUM_LAYERS}) |" in report
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*"))  # no partial files left behind


def test_bridge_rank_reaches_the_bridges(tiny_llm):
    settings = dict(num_layers=[3], batch_size=2, seq_len=3, num_items=10, repeats=1, embedding_size=8)
    full_rank, rank_2 = (benchmark(tiny_llm, bridge_rank=rank, **settings) for rank in (None, 2))
    assert rank_2["settings"]["bridge_rank"] == 2
    # Layers [0, 2, 5]: two linear bridges, 32 x 32 at full rank, 32 x 2 + 2 x 32 at rank 2.
    saved = full_rank["rows"][0]["absolute"]["params"] - rank_2["rows"][0]["absolute"]["params"]
    assert saved == 2 * (32 * 32 - 2 * 32 * 2)
    assert rank_2["full"]["params"] == full_rank["full"]["params"]  # all layers: no bridges


def test_cuda_without_a_gpu_is_a_clear_error(tiny_llm, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--llm-path", tiny_llm, "--device", "cuda"])
    assert "no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(LayerSelError, match="repeats"):
        benchmark(tiny_llm, repeats=0)


def test_bridge_rank_defaults_to_the_shipped_yaml_and_takes_full(tiny_llm, tmp_path, monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def record_rank(*args, bridge_rank, **kwargs):
        seen.append(bridge_rank)
        raise Stop

    monkeypatch.setattr(bench, "benchmark", record_rank)
    for extra in ([], ["--bridge-rank", "full"], ["--bridge-rank", "16"]):
        with pytest.raises(Stop):
            main(["--llm-path", tiny_llm, "--out", str(tmp_path), *extra])
    assert seen == [64, None, 16]
