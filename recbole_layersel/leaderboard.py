"""Side-by-side leaderboard: every entry through RecBole on the same split and evaluation settings.

    python -m recbole_layersel.leaderboard --dataset ml-100k --seeds 2020 2021 2022 \\
        --entries BPR SASRec LayerSelLLM-importance LayerSelLLM-random

Each (entry, seed) runs ``quick_start.run_recbole`` in its own process and leaves one JSON file in
``<out>/runs/<dataset>/<entry>/seed<seed>.json``, written atomically when the run has finished
(``"status": "ok"`` with RecBole's test metrics, or ``"status": "failed"`` with the error). A rerun skips
every finished file, so an interrupted leaderboard resumes where it stopped and a finished result is
never overwritten by a partial one. Failed runs are reported as failed, never dropped.

The table (``<out>/<dataset>.md`` and ``.csv``) gives, per entry, each metric's mean +- 95 % confidence
half-width over seeds (Student's t), training time, test throughput (users per second), parameter count,
and a paired t-test (paired by seed) of NDCG@10 against each reference entry that has results.
"""

import argparse
import csv
import io
import json
import math
import multiprocessing
import sys
import traceback
from pathlib import Path

from scipy import stats

from recbole_layersel.files import write_atomic

METRICS = ("ndcg@5", "ndcg@10", "mrr@10", "precision@10", "recall@10", "hit@10")
REFERENCES = ("SASRec", "LayerSelLLM-full")
# Entry name -> (model, settings). The LayerSelLLM rows differ only in how layers are chosen.
ENTRIES = {
    "BPR": ("BPR", {}),
    "SASRec": ("SASRec", {}),
    "LayerSelLLM-full": ("LayerSelLLM", {"layer_strategy": "first", "num_layers": 30, "distill_steps": 0}),
    **{f"LayerSelLLM-{strategy}": ("LayerSelLLM", {"layer_strategy": strategy})
       for strategy in ("importance", "random", "uniform", "last", "block_influence", "contiguous",
                        "magnitude")},
}


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student's t; 0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))


def paired_p_value(values: dict[int, float], reference: dict[int, float]) -> float | None:
    """Two-sided paired t-test over the seeds both have; None with fewer than 2 pairs or no variance."""
    seeds = sorted(set(values) & set(reference))
    differences = [values[s] - reference[s] for s in seeds]
    if len(seeds) < 2 or all(d == differences[0] for d in differences):
        return None
    return float(stats.ttest_rel([values[s] for s in seeds], [reference[s] for s in seeds]).pvalue)


def _run_one(model: str, dataset: str, config_dict: dict, queue) -> None:
    from recbole_layersel.quick_start import run_recbole

    sys.argv = sys.argv[:1]  # RecBole's Config reads the command line; this run's settings are in the dict
    try:
        result = run_recbole(model, dataset, config_dict=config_dict)
        keep = ("train_seconds", "test_seconds", "test_users", "parameters", "trainable_parameters")
        queue.put({"status": "ok", "test": dict(result["test_result"]), **{k: result[k] for k in keep}})
    except Exception as error:  # reported in the table as a failed run, with its message
        queue.put({"status": "failed", "error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc()})


def run_entry(name: str, dataset: str, seed: int, out: Path, extra: dict) -> dict:
    """One finished run: read from its file, or run now (in a child process) and write the file."""
    path = out / "runs" / dataset / name / f"seed{seed}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    model, settings = ENTRIES[name]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    config_dict = {**settings, **extra, "seed": seed}
    process = context.Process(target=_run_one, args=(model, dataset, config_dict, queue))
    process.start()
    process.join()
    record = queue.get() if not queue.empty() else {
        "status": "failed", "error": f"the run's process exited with code {process.exitcode}"}
    record |= {"entry": name, "model": model, "dataset": dataset, "seed": seed, "settings": settings}
    write_atomic(path, json.dumps(record, indent=1))
    return record


def summarise(records: list[dict], entries: list[str]) -> list[dict]:
    """One row per entry: metric means and CIs, costs, p-values against the references, failures."""
    by_entry = {name: [r for r in records if r["entry"] == name] for name in entries}
    ndcg = {name: {r["seed"]: r["test"]["ndcg@10"] for r in rows if r["status"] == "ok"}
            for name, rows in by_entry.items()}
    table = []
    for name, rows in by_entry.items():
        ok = [r for r in rows if r["status"] == "ok"]
        failed = [r for r in rows if r["status"] != "ok"]
        row = {"entry": name, "seeds": len(ok), "failed": len(failed),
               "error": failed[0]["error"] if failed else ""}
        for metric in METRICS:
            row[metric] = mean_ci95([r["test"][metric] for r in ok]) if ok else None
        if ok:
            row["train_seconds"] = mean_ci95([r["train_seconds"] for r in ok])[0]
            row["users_per_second"] = mean_ci95([r["test_users"] / r["test_seconds"] for r in ok])[0]
            row["parameters"] = ok[0]["parameters"]
        for reference in REFERENCES:
            if reference in ndcg and reference != name:
                row[f"p_vs_{reference}"] = paired_p_value(ndcg[name], ndcg[reference])
        table.append(row)
    return table


def to_markdown(table: list[dict], dataset: str) -> str:
    references = [r for r in REFERENCES if any(f"p_vs_{r}" in row for row in table)]
    header = ["entry", "seeds", *METRICS, "train s", "users/s", "parameters",
              *[f"p vs {r}" for r in references]]
    lines = [f"# Leaderboard: {dataset}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for row in table:
        if row["seeds"] == 0:
            failure = f"failed ({row['failed']}): {row['error'][:80]}"
            cells = [row["entry"], failure] + [""] * (len(header) - 2)
        else:
            metrics = [f"{row[m][0]:.4f} ± {row[m][1]:.4f}" for m in METRICS]
            p_values = [_p(row.get(f"p_vs_{r}")) for r in references]
            seeds = f"{row['seeds']}" + (f" ({row['failed']} failed)" if row["failed"] else "")
            cells = [row["entry"], seeds, *metrics, f"{row['train_seconds']:.0f}",
                     f"{row['users_per_second']:.0f}", f"{row['parameters']:,}", *p_values]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Metrics: mean ± 95 % CI half-width over seeds (Student's t). p: paired t-test of NDCG@10 "
              "over shared seeds (– when fewer than 2 or identical)."]
    return "\n".join(lines)


def _p(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def to_csv(table: list[dict]) -> str:
    buffer = io.StringIO()
    fields = ["entry", "seeds", "failed", "error"]
    fields += [f"{metric}_{part}" for metric in METRICS for part in ("mean", "ci95")]
    fields += ["train_seconds", "users_per_second", "parameters"] + [f"p_vs_{r}" for r in REFERENCES]
    writer = csv.DictWriter(buffer, fields)
    writer.writeheader()
    for row in table:
        flat = {k: v for k, v in row.items() if k not in METRICS}
        for metric in METRICS:
            if row[metric] is not None:
                flat[f"{metric}_mean"], flat[f"{metric}_ci95"] = row[metric]
        writer.writerow(flat)
    return buffer.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--entries", nargs="+", default=list(ENTRIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[2020, 2021, 2022])
    parser.add_argument("--out", default="results")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="settings for every run, e.g. epochs=1 (values parsed as JSON when they can be)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.entries if name not in ENTRIES]
    if unknown:
        print(f"error: unknown entries {unknown}; choose from {', '.join(ENTRIES)}", file=sys.stderr)
        return 2
    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    out = Path(args.out)
    records = [run_entry(name, args.dataset, seed, out, extra)
               for name in args.entries for seed in args.seeds]
    table = summarise(records, args.entries)
    write_atomic(out / f"{args.dataset}.md", to_markdown(table, args.dataset))
    write_atomic(out / f"{args.dataset}.csv", to_csv(table).rstrip("\n"))
    print(to_markdown(table, args.dataset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
