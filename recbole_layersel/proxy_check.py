"""Do the greedy search's proxies rank layer sets as training does?

    python -m recbole_layersel.proxy_check --dataset ml-100k --seed 2020

Reads the finished LayerSelLLM leaderboard runs of ``--seed`` on the dataset (``<runs>/<dataset>/
LayerSelLLM-*/seed<seed>.json``: each holds the layers it kept and its NDCG@10), scores every
distinct layer set with both proxies of ``proxy.py`` on the samples the hooks of that seed draw, and
reports Spearman's rho between each proxy and the runs' NDCG@10, with each proxy's seconds per set.
Writes ``<out>/<dataset>-seed<seed>.md`` and ``.json`` (``--runs``: results/runs, ``--out``: results/proxy).

One seed's runs are a noisy yardstick: training the same layer sets on another seed re-ranks them. With
those reports written for several seeds,

    python -m recbole_layersel.proxy_check --dataset ml-100k --agreement 2020 2021 2022

reports, over the layer sets every seed trained, how well training agrees with itself (rho between the
seeds' NDCG@10) and each proxy with the mean over seeds (``<out>/<dataset>-agreement.md`` and ``.json``).
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed
from scipy.stats import spearmanr

from recbole_layersel.compat import atomic_files_verbatim
from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import write_atomic
from recbole_layersel.hooks import HookSettings, build_proxy
from recbole_layersel.leaderboard import recbole_config
from recbole_layersel.model import LayerSelLLM
from recbole_layersel.proxy import PROXIES


def finished_runs(runs: Path, dataset: str, seed: int) -> tuple[str, dict[tuple[int, ...], dict[str, float]]]:
    """(split, layer set -> {entry: NDCG@10}) of the finished LayerSelLLM runs of ``seed``: the validation
    NDCG@10 of the best epoch when every run recorded it (runs from 2026-12-01 on), else the test one."""
    records = {path.parent.name: json.loads(path.read_text(encoding="utf-8"))
               for path in sorted((runs / dataset).glob(f"LayerSelLLM-*/seed{seed}.json"))}
    records = {entry: record for entry, record in records.items()
               if record["status"] == "ok" and record.get("selected_layers") is not None}
    split = "valid" if all("valid" in record for record in records.values()) else "test"
    by_layers: dict[tuple[int, ...], dict[str, float]] = {}
    for entry, record in records.items():
        by_layers.setdefault(tuple(record["selected_layers"]), {})[entry] = record[split]["ndcg@10"]
    if len(by_layers) < 3:
        raise LayerSelError(
            f"{runs / dataset} holds finished LayerSelLLM runs of seed {seed} for {len(by_layers)} layer "
            "sets; a rank correlation needs at least 3. Run more entries with the leaderboard first."
        )
    return split, by_layers


def proxies(dataset: str, seed: int, overrides: dict | None = None) -> dict:
    """Both proxies, built as the hooks of a LayerSelLLM run of ``seed`` on ``dataset`` (and ``overrides``)
    build them; its settings name the adapted proxy, so that the hooks' data holds its training sample."""
    config = recbole_config("LayerSelLLM", dataset, {"seed": seed, "layer_strategy": "importance",
                                                     "show_progress": False, **(overrides or {}),
                                                     "selection_proxy": "adapted"})
    init_seed(seed, config["reproducibility"])
    with atomic_files_verbatim():
        train, valid, _ = data_preparation(config, create_dataset(config))
    model = LayerSelLLM(config, train._dataset)
    llm, tokenizer = model._source_llm
    settings = HookSettings.from_config(config)
    data = model._hook_data(train, valid, settings, llm, tokenizer).proxy
    return {name: build_proxy(name, llm, data, settings) for name in PROXIES}


def check(dataset: str, seed: int, runs: Path, names: tuple[str, ...] = PROXIES) -> dict:
    split, by_layers = finished_runs(runs, dataset, seed)
    rows = [{"layers": list(layers), "entries": entries, "ndcg@10": sum(entries.values()) / len(entries)}
            for layers, entries in by_layers.items()]
    built = proxies(dataset, seed)
    for name in names:
        for row in rows:
            start = time.perf_counter()
            row[name] = {"score": built[name](row["layers"]), "seconds": time.perf_counter() - start}
    ndcg = [row["ndcg@10"] for row in rows]
    rho = {name: _rho([row[name]["score"] for row in rows], ndcg) for name in names}
    return {"dataset": dataset, "seed": seed, "split": split, "rows": rows, "spearman": rho}


def agreement(runs: Path, out: Path, dataset: str, seeds: list[int]) -> dict:
    """Over the layer sets every seed of ``seeds`` trained and scored (``<out>/<dataset>-seed<S>.json``):
    each pair of seeds' rank correlation of NDCG@10, and each proxy's (its scores on seed S) with the mean
    NDCG@10 over the seeds and with seed S's own."""
    splits, trained = zip(*(finished_runs(runs, dataset, seed) for seed in seeds), strict=True)
    if len(set(splits)) > 1:
        raise LayerSelError(
            f"the runs of seeds {seeds} give NDCG@10 on {splits} (a run without a validation score makes its "
            "seed fall back to test); rerun those runs so that every seed compares the same split.")
    trained = dict(zip(seeds, trained, strict=True))
    reports = {seed: _report(out, dataset, seed) for seed in seeds}
    scored = {seed: {tuple(row["layers"]): row for row in reports[seed]["rows"]} for seed in seeds}
    common = [layers for layers in trained[seeds[0]]
              if all(layers in trained[seed] and layers in scored[seed] for seed in seeds)]
    if len(common) < 3:
        raise LayerSelError(
            f"the runs and reports of seeds {seeds} share {len(common)} layer sets; a rank correlation needs "
            "at least 3. Run the same data-free entries (first, last, full, text) on every seed, then check "
            "each seed's proxies.")
    ndcg = {seed: [float(np.mean(list(trained[seed][layers].values()))) for layers in common]
            for seed in seeds}
    mean = np.mean([ndcg[seed] for seed in seeds], axis=0).tolist()
    names = [name for name in PROXIES if all(name in reports[seed]["spearman"] for seed in seeds)]
    scores = {name: {seed: [scored[seed][layers][name]["score"] for layers in common] for seed in seeds}
              for name in names}
    return {
        "dataset": dataset, "seeds": seeds, "split": splits[0],
        "layers": [list(layers) for layers in common], "ndcg@10": ndcg, "mean": mean, "proxies": scores,
        "seed_vs_seed": {f"{a}-{b}": _rho(ndcg[a], ndcg[b]) for a, b in itertools.combinations(seeds, 2)},
        "proxy_vs_mean": {name: {seed: _rho(scores[name][seed], mean) for seed in seeds} for name in names},
        "proxy_vs_own_seed": {name: {seed: _rho(scores[name][seed], ndcg[seed]) for seed in seeds}
                              for name in names},
    }


def _report(out: Path, dataset: str, seed: int) -> dict:
    path = out / f"{dataset}-seed{seed}.json"
    if not path.is_file():
        raise LayerSelError(f"{path} does not exist; write it first with python -m recbole_layersel."
                            f"proxy_check --dataset {dataset} --seed {seed} --out {out}")
    return json.loads(path.read_text(encoding="utf-8"))


def _rho(a: list[float], b: list[float]) -> float:
    return float(spearmanr(a, b)[0])


def agreement_markdown(report: dict) -> str:
    seeds, names = report["seeds"], list(report["proxy_vs_mean"])
    lines = [f"# Training against itself, and the proxies against its mean: {report['dataset']}", "",
             "| layers |" + "".join(f" {report['split']} NDCG@10 {seed} |" for seed in seeds) + " mean |"
             + "".join(f" {name} proxy {seed} |" for name in names for seed in seeds),
             "|---|" + "---:|" * (len(seeds) + 1 + len(names) * len(seeds))]
    for i, layers in enumerate(report["layers"]):
        values = ([report["ndcg@10"][seed][i] for seed in seeds] + [report["mean"][i]]
                  + [report["proxies"][name][seed][i] for name in names for seed in seeds])
        lines.append(f"| {layers} |" + "".join(f" {value:.4f} |" for value in values))
    pairs = report["seed_vs_seed"]
    lines += ["", f"Spearman's rho over these {len(report['layers'])} layer sets. Training, seed against "
              "seed: " + _rhos(pairs) + f" (mean {np.mean(list(pairs.values())):.2f})."]
    lines += [f"{name} proxy of each seed against the mean over seeds: "
              f"{_rhos(report['proxy_vs_mean'][name])}; against its own seed's: "
              f"{_rhos(report['proxy_vs_own_seed'][name])}." for name in names]
    return "\n".join(lines)


def _rhos(values: dict) -> str:
    return ", ".join(f"{key} {rho:.2f}" for key, rho in values.items())


def markdown(report: dict) -> str:
    rho = report["spearman"]
    lines = [f"# Greedy proxies vs trained runs: {report['dataset']}, seed {report['seed']}", "",
             f"| layers | runs | {report['split']} NDCG@10 |"
             + "".join(f" {name} proxy | s |" for name in rho),
             "|---|---|---:|" + "---:|---:|" * len(rho)]
    for row in sorted(report["rows"], key=lambda row: -row["ndcg@10"]):
        scores = "".join(f" {row[name]['score']:.4f} | {row[name]['seconds']:.1f} |" for name in rho)
        lines.append(f"| {row['layers']} | {', '.join(row['entries'])} | {row['ndcg@10']:.4f} |{scores}")
    lines += ["", f"Spearman's rho with {report['split']} NDCG@10 over {len(report['rows'])} layer sets: "
              + ", ".join(f"{name} {value:.2f}" for name, value in rho.items()) + "."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--runs", type=Path, default=Path("results/runs"))
    parser.add_argument("--out", type=Path, default=Path("results/proxy"))
    parser.add_argument("--proxies", nargs="+", choices=PROXIES, default=list(PROXIES),
                        help="the proxies to score (the adapted one costs 10 to over 100 times as much)")
    parser.add_argument("--agreement", nargs="+", type=int, metavar="SEED",
                        help="score nothing: compare the reports of these seeds in --out (see above)")
    args = parser.parse_args(argv)
    if args.agreement:
        report = agreement(args.runs, args.out, args.dataset, args.agreement)
        _write(args.out / f"{args.dataset}-agreement", report, agreement_markdown(report))
    else:
        report = check(args.dataset, args.seed, args.runs, tuple(args.proxies))
        _write(args.out / f"{args.dataset}-seed{args.seed}", report, markdown(report))


def _write(stem: Path, report: dict, table: str) -> None:
    write_atomic(stem.with_suffix(".json"), json.dumps(report, indent=1))
    write_atomic(stem.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
