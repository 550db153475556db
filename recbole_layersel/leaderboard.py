"""Side-by-side leaderboard: every entry through RecBole on the same split and evaluation settings.

    python -m recbole_layersel.leaderboard --dataset ml-100k --seeds 2020 2021 2022 \\
        --entries BPR SASRec LayerSelLLM-importance LayerSelLLM-random

Entries: ``BPR``, ``SASRec`` (RecBole's own), ``SASRec-allpos[-s<stride>]`` (its paper's objective, with
``window_stride``), ``LayerSelLLM-full`` (every layer, no distillation) and
``LayerSelLLM-<strategy>[-k<k>][-int8][-s<stride>][@<dataset>]``: the layer strategy (importance, random,
uniform, last, block_influence, contiguous, magnitude, first), optionally k layers instead of the yaml's
``num_layers`` (``importance-k<k>`` keeps exactly k: its search grows to k without the saturation stop,
a point at k of the quality-vs-k frontier), optionally the compact backbone quantised to int8 (torch
dynamic quantisation), optionally training windows that end every ``stride`` targets
(``window_stride``), and optionally the layers another dataset's hooks chose with the same seed
(cross-domain selection; that dataset's selection is computed first with ``hooks_only`` if no finished
run of it is there).

Each (entry, seed) runs ``quick_start.run_recbole`` in its own process and leaves one JSON file in
``<out>/runs/<dataset>/<entry>/seed<seed>.json``, written atomically when the run has finished
(``"status": "ok"`` with RecBole's test metrics, or ``"status": "failed"`` with the error). A rerun skips
every finished file, so an interrupted leaderboard resumes where it stopped and a finished result is
never overwritten by a partial one. Failed runs are reported as failed, never dropped. Runs go seed by
seed (every entry for the first seed, then the next seed), and the table is rewritten after each run,
so a leaderboard stopped early still has a table that says how far it got.

The table (``<out>/<dataset>.md`` and ``.csv``) gives, per entry, each metric's mean +- 95 % confidence
half-width over seeds (Student's t), training time, inference throughput (users per second of
``full_sort_predict``, backbone included), parameter count, layers kept, and a paired t-test (paired by
seed) of NDCG@10 against each reference entry that has results and, for an entry that keeps k layers
(``-k<k>``), against ``LayerSelLLM-random-k<k>``. ``<out>/<dataset>.png`` charts NDCG@10 and throughput;
with two or more ``LayerSelLLM-importance`` sizes, ``<out>/<dataset>-frontier.png``
plots NDCG@10 against the layers kept, next to the speed-ups of ``--bench`` (a ``bench.json``).
"""

import argparse
import csv
import importlib.util
import io
import json
import math
import multiprocessing
import os
import re
import sys
import threading
import traceback
from pathlib import Path
from queue import Empty

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

from recbole_layersel import __version__
from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import save_figure, sha256_file, write_atomic

METRICS = ("ndcg@5", "ndcg@10", "mrr@10", "precision@10", "recall@10", "hit@10")
# Every row is tested against these when present: the SASRec a LayerSelLLM row must beat, the full model
# (how much quality the compact one keeps) and random layers (what a selection must beat).
REFERENCES = ("SASRec", "SASRec-allpos", "LayerSelLLM-full", "LayerSelLLM-random")
# The p-value columns: row key suffix -> header label (the last one: k random layers of the row's own k).
P_COLUMNS = {**{r: r for r in REFERENCES}, "random_same_k": "random, same k"}
STRATEGIES = ("importance", "random", "uniform", "last", "block_influence", "contiguous", "magnitude")
# The default entries, in table order. SASRec-allpos is RecBole's SASRec trained with its paper's
# all-position objective (all_positions.py); LayerSelLLM-text keeps no LLM layer (title embeddings through
# the same heads), LayerSelLLM-full every layer of the model.
DEFAULT_ENTRIES = ["Pop", "BPR", "GRU4Rec", "SASRec", "SASRec-allpos", "LayerSelLLM-text", "LayerSelLLM-full",
                   *[f"LayerSelLLM-{s}" for s in STRATEGIES], "LayerSelLLM-importance-int8"]
ENTRIES = {
    "Pop": ("Pop", {}),
    "BPR": ("BPR", {}),
    "GRU4Rec": ("GRU4Rec", {}),
    "SASRec": ("SASRec", {}),
    "SASRec-allpos": ("SASRecAllPositions", {}),
    "LayerSelLLM-text": ("LayerSelLLM", {"layer_strategy": "first", "num_layers": 0, "distill_steps": 0}),
    "LayerSelLLM-full": ("LayerSelLLM", {"layer_strategy": "first", "num_layers": "all", "distill_steps": 0}),
}
# Settings that say where or how visibly a run happens, not what it computes: a finished run is reused
# whatever they were.
ENVIRONMENT_KEYS = frozenset({
    "data_path", "checkpoint_dir", "llm_cache_dir", "artifacts_dir", "device", "gpu_id", "use_gpu",
    "local_rank", "single_spec", "state", "show_progress", "worker", "nproc", "world_size", "ip", "port",
    "offset", "resume_file"})
_LLM_ENTRY = re.compile(r"LayerSelLLM-(?P<strategy>[a-z_]+)(?:-k(?P<k>[0-9]+))?(?P<int8>-int8)?"
                        r"(?:-s(?P<stride>[0-9]+))?(?:@(?P<source>[\w.-]+))?")
_ALLPOS_ENTRY = re.compile(r"SASRec-allpos-s(?P<stride>[0-9]+)")


def entry_settings(name: str) -> tuple[str, dict, str | None]:
    """(model, settings, dataset whose selection the entry reuses or None) of an entry name."""
    if name in ENTRIES:
        return (*ENTRIES[name], None)
    if match := _ALLPOS_ENTRY.fullmatch(name):
        return "SASRecAllPositions", {"window_stride": int(match["stride"])}, None
    match = _LLM_ENTRY.fullmatch(name)
    if not match or match["strategy"] not in (*STRATEGIES, "first"):
        raise LayerSelError(
            f"unknown entry {name!r}; use {', '.join(ENTRIES)}, SASRec-allpos-s<stride> or "
            f"LayerSelLLM-<strategy>[-k<k>][-int8][-s<stride>][@<dataset>] with a strategy among "
            f"{', '.join((*STRATEGIES, 'first'))}, e.g. LayerSelLLM-importance-k4."
        )
    settings = {"layer_strategy": match["strategy"]}
    if match["k"]:
        settings["num_layers"] = int(match["k"])
        if match["strategy"] == "importance":
            settings["selection_patience"] = None
    if match["int8"]:
        settings["quantize"] = "int8"
    if match["stride"]:
        settings["window_stride"] = int(match["stride"])
    return "LayerSelLLM", settings, match["source"]


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


def exit_with_parent() -> None:
    """End this process when the process that started it ends, however it ended: a leaderboard killed
    mid-run must not leave its run training on (and writing the run's resume file) without it."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=lambda: (parent.join(), os._exit(1)), daemon=True).start()


def _run_one(model: str, dataset: str, config_dict: dict, queue) -> None:
    from recbole_layersel.quick_start import run_recbole

    exit_with_parent()
    sources = package_sources()  # before the run: a file edited while it trains is not what it ran
    sys.argv = sys.argv[:1]  # RecBole's Config reads the command line; this run's settings are in the dict
    try:
        result = run_recbole(model, dataset, config_dict=config_dict)
        if config_dict.get("hooks_only"):
            record = {"status": "ok", **result}
        else:
            keep = ("epochs_run", "best_epoch", "stopped_by", "valid_curve", "train_seconds", "hook_seconds",
                    "test_seconds", "test_users", "inference_users_per_second", "parameters",
                    "trainable_parameters", "selected_layers")
            record = {"status": "ok", "test": dict(result["test_result"]),
                      "valid": dict(result["best_valid_result"]), **{k: result[k] for k in keep}}
    except Exception as error:  # reported in the table as a failed run, with its message
        record = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()}
    queue.put({**record, "code": loaded_code(sources)})


def package_sources() -> dict[str, str]:
    """The sha256 of each module file of this package, as it is now."""
    return {f"recbole_layersel.{path.stem}": sha256_file(path) for path in Path(__file__).parent.glob("*.py")}


def loaded_code(sources: dict[str, str]) -> dict[str, str]:
    """The run's code: of ``sources`` (``package_sources()`` when it started), the modules this process
    loaded, the leaderboard itself aside."""
    return {name: sources[name] for name, module in sorted(sys.modules.items())
            if name in sources and name != __name__ and getattr(module, "__file__", None)}


def recbole_config(model: str, dataset: str, config_dict: dict):
    """RecBole's config of ``model`` on ``dataset`` with ``config_dict``, our command line kept out of it."""
    from recbole_layersel.registry import LayerSelConfig

    argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole's Config reads the command line; ours is not for it
    try:
        return LayerSelConfig(model, dataset, config_dict=config_dict)
    finally:
        sys.argv = argv


def parse_value(text: str):
    """A --set value: JSON when it parses (numbers, booleans, lists, dicts), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_setting(item: str) -> tuple[str, object]:
    """A --set item ``[ENTRY.]KEY=VALUE`` as its key (with any entry prefix) and parsed value."""
    key, equals, value = item.partition("=")
    if not equals or not key.rpartition(".")[2]:
        raise LayerSelError(f"--set {item!r}: write KEY=VALUE, e.g. epochs=20 or SASRec.epochs=20.")
    return key, parse_value(value)


def resolved_config(model: str, dataset: str, config_dict: dict) -> dict:
    """RecBole's final config of a run (yaml defaults, dataset config and ``config_dict`` merged), as
    JSON, without the keys that say where a run happens (``ENVIRONMENT_KEYS``)."""
    config = recbole_config(model, dataset, config_dict)
    final = json.loads(json.dumps(config.final_config_dict, default=str))
    return {key: value for key, value in sorted(final.items()) if key not in ENVIRONMENT_KEYS}


def changes(record: dict, identity: dict) -> list[str]:
    """How a finished run's record differs from the run its file stands for now: config, version, code."""
    if "config" not in record:
        return ["config was not recorded (a run from before configs were recorded)"]
    found = []
    before, now = record["config"], identity["config"]
    differing = [key for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
    if differing:
        found.append("config differs: " + ", ".join(
            f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in differing[:6]))
    if record.get("version") != identity["version"]:
        found.append(f"version {record.get('version')} -> {identity['version']}")
    stale = [name for name, digest in record.get("code", {}).items() if _module_sha256(name) != digest]
    if stale:
        found.append(f"code changed since: {', '.join(stale)}")
    return found


def _module_sha256(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return sha256_file(spec.origin) if spec is not None and spec.origin else None


def _finished(path: Path, run, identity: dict, redo_changed: bool, retry_failed: bool) -> dict:
    """The record at ``path`` when it is a finished run of the same config and code, or ``run()``'s (a
    dict, run in a child process) written there. A record of another config or code is refused, or run
    again with ``redo_changed``; a failed one is run again with ``retry_failed``."""
    if path.is_file():
        record = json.loads(path.read_text(encoding="utf-8"))
        changed = changes(record, identity)
        if changed and not redo_changed:
            raise LayerSelError(
                f"{path} holds a finished run that no longer matches its entry: {'; '.join(changed)}. "
                "Pass --redo-changed to run it again (the file is replaced when the new run finishes), "
                "or --tables-only to tabulate the runs as they are."
            )
        if not changed and not (retry_failed and record["status"] != "ok"):
            return record
    resumed_by = _check_resume_state(path, identity, redo_changed)
    # A run that resumes a killed one's training state measures only its own part of the training time.
    resumed = {"resumed": True} if path.with_suffix(".resume.pth").is_file() else {}
    record = run() | identity | resumed
    write_atomic(path, json.dumps(record, indent=1))
    if record["status"] == "ok":  # finished: its resume state is gone too; a failed run's is kept to retry
        resumed_by.unlink(missing_ok=True)
    return record


def _check_resume_state(path: Path, identity: dict, redo_changed: bool) -> Path:
    """Make sure that the run about to start for ``path`` resumes only a training state (``.resume.pth``,
    left by a killed run) that the same config and code wrote: one of another config or code, or with no
    record of its run, is refused, or deleted with ``redo_changed``. Then records what the run that
    starts now is (``.resume.json``: its identity and every module's hash; which modules it loads is known
    only when it ends) and returns that record's path."""
    state, recorded = path.with_suffix(".resume.pth"), path.with_suffix(".resume.json")
    if state.is_file():
        found = json.loads(recorded.read_text(encoding="utf-8")) if recorded.is_file() else None
        changed = changes(found, identity) if found else ["no record of the run that wrote it"]
        if changed and not redo_changed:
            raise LayerSelError(
                f"{state} holds the training state of an interrupted run that does not match its entry "
                f"now: {'; '.join(changed)}. Pass --redo-changed to delete it and run the entry from the "
                "start, or restore that config and code to resume it."
            )
        if changed:
            print(f"Deleting {state} (from another run: {'; '.join(changed)}); the run starts again.")
            state.unlink()
    code = {name: digest for name, digest in package_sources().items() if name != __name__}
    write_atomic(recorded, json.dumps({**identity, "code": code}, indent=1))
    return recorded


def _in_child(model: str, dataset: str, config_dict: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run_one, args=(model, dataset, config_dict, queue))
    process.start()
    while True:  # read before joining: a child cannot exit while its record is still in the pipe
        try:
            record = queue.get(timeout=5)
            process.join()
            return record
        except Empty:
            if not process.is_alive():
                return {"status": "failed", "error": f"the run's process exited with code {process.exitcode}"}


def source_selection(source: str, seed: int, out: Path, extra: dict, **options) -> dict:
    """The layers ``LayerSelLLM-importance`` chose on ``source`` with ``seed``: from its finished run, or
    from a hooks-only run (importance and selection, no training) recorded in runs/<source>/selection/."""
    run = out / "runs" / source / "LayerSelLLM-importance" / f"seed{seed}.json"
    record = json.loads(run.read_text(encoding="utf-8")) if run.is_file() else None
    if record is not None and record["status"] == "ok":
        return record
    config_dict = {**extra, "layer_strategy": "importance", "hooks_only": True, "distill_steps": 0,
                   "seed": seed}
    identity = {"entry": "selection", "dataset": source, "seed": seed, "version": __version__,
                "config": resolved_config("LayerSelLLM", source, config_dict)}
    return _finished(out / "runs" / source / "selection" / f"seed{seed}.json",
                     lambda: _in_child("LayerSelLLM", source, config_dict), identity, **options)


def run_entry(name: str, dataset: str, seed: int, out: Path, extra: dict, redo_changed: bool = False,
              retry_failed: bool = False) -> dict:
    """One finished run: read from its file, or run now (in a child process) and write the file."""
    model, settings, source = entry_settings(name)
    options = {"redo_changed": redo_changed, "retry_failed": retry_failed}
    path = out / "runs" / dataset / name / f"seed{seed}.json"
    # Training resumes from the state before its last epoch when a run was killed (protocol.ResumeMixin),
    # kept beside the run file, where `_check_resume_state` looks for it.
    config_dict = {**settings, **extra, "seed": seed, "resume_file": str(path.with_suffix(".resume.pth"))}

    def run() -> dict:
        if source is None:
            return _in_child(model, dataset, config_dict)
        selection = source_selection(source, seed, out, extra, **options)
        if selection["status"] != "ok":
            return {"status": "failed", "error": f"selection on {source} failed: {selection['error']}"}
        return _in_child(model, dataset, {**config_dict, "selected_layers": selection["selected_layers"]})

    # A cross-domain entry's config is recorded without the layers it takes from its source's run.
    identity = {"entry": name, "model": model, "dataset": dataset, "seed": seed,
                "settings": {**settings, **extra}, "version": __version__,
                "config": resolved_config(model, dataset, config_dict)}
    return _finished(path, run, identity, **options)


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
            row["resumed_seeds"] = sum(bool(r.get("resumed")) for r in ok)
            row["users_per_second"] = mean_ci95([r["inference_users_per_second"] for r in ok])[0]
            row["parameters"] = _per_seed([f"{r['parameters']:,}" for r in ok])
            kept = [str(len(r["selected_layers"])) for r in ok if r["selected_layers"] is not None]
            row["layers"] = _per_seed(kept) if kept else "–"
            row["epochs"] = ", ".join(_epochs(r) for r in ok)
        for reference in REFERENCES:
            if reference in ndcg and reference != name:
                row[f"p_vs_{reference}"] = paired_p_value(ndcg[name], ndcg[reference])
        if (random_k := random_of_same_k(name)) in ndcg:
            row["p_vs_random_same_k"] = paired_p_value(ndcg[name], ndcg[random_k])
        table.append(row)
    return table


def random_of_same_k(name: str) -> str | None:
    """The random-layers entry a ``LayerSelLLM-<strategy>-k<k>`` entry's selection must beat: k random
    layers trained with the same options (the ``LayerSelLLM-random`` reference keeps the yaml's k)."""
    match = _LLM_ENTRY.fullmatch(name)
    if not match or not match["k"] or match["strategy"] == "random" or match["source"]:
        return None
    return name.replace(f"LayerSelLLM-{match['strategy']}-", "LayerSelLLM-random-", 1)


def _per_seed(values: list[str]) -> str:
    """One value when every seed has it, else each seed's in seed order (a search may keep fewer layers on
    one seed than on another: their mean is no model's)."""
    return values[0] if len(set(values)) == 1 else " / ".join(values)


def _epochs(record: dict) -> str:
    """``epochs run (best epoch)``, marked when an epoch cap, not early stopping, ended the training (a
    counting model such as Pop is complete after its one pass)."""
    if "epochs_run" not in record:
        return "–"
    cap = " cap" if record["stopped_by"] == "epoch cap" else ""
    return f"{record['epochs_run']} ({record['best_epoch']}){cap}"


def protocol(records: list[dict]) -> str:
    """The evaluation protocol all finished runs share; an error naming them when they differ."""
    runs: dict[str, list[str]] = {}
    for record in records:
        if record["status"] == "ok":
            setting = f"eval_mask_history={record.get('config', {}).get('eval_mask_history', 'not recorded')}"
            runs.setdefault(setting, []).append(f"{record['entry']} seed {record['seed']}")
    if len(runs) > 1:
        raise LayerSelError(
            "runs of different evaluation protocols cannot share a table: " + "; ".join(
                f"{setting}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
                for setting, names in runs.items())
            + ". Rerun the odd ones out under one protocol (--redo-changed), or tabulate them apart.")
    return next(iter(runs), "no finished run yet")


def to_markdown(table: list[dict], dataset: str, planned: int | None = None, evaluation: str = "") -> str:
    references = [r for r in P_COLUMNS if any(f"p_vs_{r}" in row for row in table)]
    header = ["entry", "seeds", *METRICS, "epochs (best)", "train s", "users/s", "parameters", "layers",
              *[f"p vs {P_COLUMNS[r]}" for r in references]]
    finished = sum(row["seeds"] + row["failed"] for row in table)
    progress = f"{finished} of {planned} planned runs (entries x seeds) finished." if planned else ""
    protocol_line = f"Evaluation protocol of every row: {evaluation}." if evaluation else ""
    lines = [f"# Leaderboard: {dataset}", "", progress, protocol_line, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for row in table:
        if row["seeds"] == 0:
            state = f"failed ({row['failed']}): {row['error'][:80]}" if row["failed"] else "not run yet"
            cells = [row["entry"], state] + [""] * (len(header) - 2)
        else:  # one seed has no interval: its mean alone
            metrics = [f"{row[m][0]:.4f}" + (f" ± {row[m][1]:.4f}" if row["seeds"] > 1 else "")
                       for m in METRICS]
            p_values = [_p(row.get(f"p_vs_{r}")) for r in references]
            seeds = f"{row['seeds']}" + (f" ({row['failed']} failed)" if row["failed"] else "")
            train = ("≥ " if row["resumed_seeds"] else "") + f"{row['train_seconds']:.0f}"
            cells = [row["entry"], seeds, *metrics, row["epochs"], train,
                     f"{row['users_per_second']:.0f}", row["parameters"], row["layers"], *p_values]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Metrics: mean ± 95 % CI half-width over seeds (Student's t). epochs (best): per seed, "
              "epochs trained until RecBole's early stopping (stopping_step) ended them, and the best "
              "validation epoch; 'cap' marks a run that the epoch cap stopped instead. "
              "train s: RecBole's fit; '≥' where a seed resumed an interrupted run, whose seconds count "
              "its last part only. "
              "users/s: full_sort_predict on the first test users, from scratch (backbone included). "
              "parameters, layers (transformer layers kept): per seed where seeds differ. "
              "p: paired t-test of NDCG@10 over shared seeds (– when fewer than 2 or identical)"
              + ("; random, same k: against LayerSelLLM-random-k<k> of the row's k."
                 if "random_same_k" in references else ".")]
    return "\n".join(lines)


def _p(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def to_csv(table: list[dict]) -> str:
    buffer = io.StringIO()
    fields = ["entry", "seeds", "failed", "error"]
    fields += [f"{metric}_{part}" for metric in METRICS for part in ("mean", "ci95")]
    fields += ["epochs", "train_seconds", "resumed_seeds", "users_per_second", "parameters", "layers"]
    fields += [f"p_vs_{r}" for r in P_COLUMNS]
    writer = csv.DictWriter(buffer, fields)
    writer.writeheader()
    for row in table:
        flat = {k: v for k, v in row.items() if k not in METRICS}
        for metric in METRICS:
            if row[metric] is not None:
                flat[f"{metric}_mean"], flat[f"{metric}_ci95"] = row[metric]
        writer.writerow(flat)
    return buffer.getvalue()


def plot_leaderboard(table: list[dict], dataset: str, path: Path) -> None:
    """NDCG@10 (mean with 95 % CI) and inference throughput of every entry with results, side by side."""
    rows = [row for row in table if row["seeds"]]
    figure = Figure(figsize=(11, 1.2 + 0.4 * len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    quality, speed = figure.subplots(1, 2, sharey=True)
    positions = range(len(rows))
    quality.barh(positions, [row["ndcg@10"][0] for row in rows], xerr=[row["ndcg@10"][1] for row in rows],
                 color="tab:blue", capsize=3)
    quality.set_yticks(positions, [f"{row['entry']} (n={row['seeds']})" for row in rows])
    quality.invert_yaxis()
    quality.set_xlabel("test NDCG@10 (mean, 95 % CI)")
    quality.xaxis.set_major_locator(MaxNLocator(nbins=4))  # small values have long tick labels
    speed.barh(positions, [row["users_per_second"] for row in rows], color="tab:orange")
    speed.set_xscale("log")
    speed.set_xlabel("inference users/s (log)")
    figure.suptitle(f"{dataset}: RecBole full ranking, leave-one-out by time")
    save_figure(figure, path)


_FRONTIER_ENTRY = re.compile(r"LayerSelLLM-(importance(-k[0-9]+)?|full|text)")


def plot_frontier(records: list[dict], dataset: str, bench: list[dict] | None, path: Path) -> bool:
    """NDCG@10 against layers kept for LayerSelLLM-importance[-k<k>], -text (k = 0) and -full, with the
    benchmark's scoring and training-step speed-ups on a second axis; False (nothing drawn) with fewer
    than two sizes."""
    by_size: dict[int, list[float]] = {}
    for record in records:
        if record["status"] == "ok" and _FRONTIER_ENTRY.fullmatch(record["entry"]):
            by_size.setdefault(len(record["selected_layers"]), []).append(record["test"]["ndcg@10"])
    if len(by_size) < 2:
        return False
    sizes = sorted(by_size)
    summary = [mean_ci95(by_size[k]) for k in sizes]
    figure = Figure(figsize=(7, 5.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.errorbar(sizes, [m for m, _ in summary], yerr=[h for _, h in summary], marker="o", capsize=3,
                  color="tab:blue", label="NDCG@10 (importance selection; 0 = text only, all = full model)")
    for k, (mean, _) in zip(sizes, summary, strict=True):
        axes.annotate(f"n={len(by_size[k])}", (k, mean), textcoords="offset points", xytext=(4, 4),
                      fontsize=7)
    axes.margins(x=0.08)  # room for the n= labels at the ends
    axes.set_xlabel("transformer layers kept (k)")
    axes.set_ylabel("test NDCG@10", color="tab:blue")
    if bench:
        twin = axes.twinx()
        twin.plot([r["k"] for r in bench], [r["speedup"] for r in bench], marker="s", color="tab:red",
                  label="measured scoring speed-up vs all layers")
        if all("train_speedup" in r for r in bench):  # benches before the training-step timing lack it
            twin.plot([r["k"] for r in bench], [r["train_speedup"] for r in bench], marker="^",
                      color="tab:orange", label="measured training-step speed-up")
        twin.plot([r["k"] for r in bench], [r["ideal"] for r in bench], linestyle=":", color="tab:red",
                  label="ideal L/k")
        twin.set_ylabel("speed-up (bench.py)", color="tab:red")
    # One legend below the axes: inside them it would hide whichever points lie under it.
    figure.legend(loc="outside lower center", ncols=2, fontsize=8)  # gathers both axes' labelled lines
    axes.set_title(f"{dataset}: quality vs layers kept")
    save_figure(figure, path)
    return True


def write_tables(records: list[dict], entries: list[str], dataset: str, out: Path, planned: int,
                 bench: list[dict] | None) -> str:
    table = summarise(records, entries)
    markdown = to_markdown(table, dataset, planned, protocol(records))
    write_atomic(out / f"{dataset}.md", markdown)
    write_atomic(out / f"{dataset}.csv", to_csv(table).rstrip("\n"))
    if any(row["seeds"] for row in table):
        plot_leaderboard(table, dataset, out / f"{dataset}.png")
    plot_frontier(records, dataset, bench, out / f"{dataset}-frontier.png")
    return markdown


def entry_extras(items: list[str], entries: list[str]) -> dict[str, dict]:
    """Each entry's settings from ``--set`` items ``KEY=VALUE`` (every entry) or ``ENTRY.KEY=VALUE``."""
    extra = {name: {} for name in entries}
    for item in items:
        key, value = parse_setting(item)
        entry, _, entry_key = key.rpartition(".")
        if entry_key in ("seed", "resume_file"):  # set per run by run_entry, which would overwrite it
            raise LayerSelError(f"--set {item!r}: the leaderboard sets {entry_key} for each run; "
                                "choose seeds with --seeds.")
        for name in [entry] if entry else entries:
            if name not in extra:
                raise LayerSelError(f"--set {item!r} names entry {name!r}, which is not among --entries")
            extra[name][entry_key] = value
    return extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--entries", nargs="+", default=DEFAULT_ENTRIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[2020, 2021, 2022])
    parser.add_argument("--out", default="results")
    parser.add_argument("--tables-only", action="store_true",
                        help="rewrite the tables and charts from the finished runs; start no run")
    parser.add_argument("--redo-changed", action="store_true",
                        help="run again every finished run whose recorded config, version or code differs "
                             "(otherwise such a run stops the leaderboard with an error)")
    parser.add_argument("--retry-failed", action="store_true", help="run again every run that failed")
    parser.add_argument("--bench", default=None, help="bench.json whose speed-ups the frontier plot shows")
    parser.add_argument("--set", nargs="*", default=[], metavar="[ENTRY.]KEY=VALUE",
                        help="settings for every run, e.g. epochs=1, or for one entry, e.g. SASRec.epochs=5 "
                             "(values parsed as JSON when they can be)")
    args = parser.parse_args(argv)
    try:
        for name in args.entries:
            entry_settings(name)
        extra = entry_extras(args.set, args.entries)
    except LayerSelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    bench = json.loads(Path(args.bench).read_text(encoding="utf-8"))["rows"] if args.bench else None
    out, planned, records = Path(args.out), len(args.entries) * len(args.seeds), []
    if args.tables_only:
        paths = [out / "runs" / args.dataset / name / f"seed{seed}.json"
                 for name in args.entries for seed in args.seeds]
        records = [json.loads(path.read_text(encoding="utf-8")) for path in paths if path.is_file()]
        try:
            print(write_tables(records, args.entries, args.dataset, out, planned, bench))
        except LayerSelError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    options = {"redo_changed": args.redo_changed, "retry_failed": args.retry_failed}
    try:
        # Seed by seed: a leaderboard stopped early has every entry on its first seeds.
        for seed in args.seeds:
            for name in args.entries:
                records.append(run_entry(name, args.dataset, seed, out, extra[name], **options))
                markdown = write_tables(records, args.entries, args.dataset, out, planned, bench)
    except LayerSelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
