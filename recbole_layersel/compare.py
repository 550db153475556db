"""Cross-model importance: the same pre-training hooks on several LLMs and one dataset, side by side.

    python -m recbole_layersel.compare --dataset ml-100k --llms smollm2-135m gemma3-270m \\
        --out results/importance

For each LLM, LayerSelLLM's hooks run with ``hooks_only`` (importance on the seeded sample of training
histories, then the greedy selection; no distillation, no training) in a process of their own, and leave
``importance.json`` and ``selection.json`` in ``<out>/<dataset>/<llm>/``. The comparison is one PNG of
the importance heatmaps (criteria, group scores and fused score x layers, stars on the selected layers)
and a Markdown table of the selections with their relative depths (layer / (L - 1)), so a reader sees
whether "upper layers matter most" holds across models. Finished LLMs are not rerun.
"""

import argparse
import json
import multiprocessing
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import save_figure, write_atomic
from recbole_layersel.importance import ImportanceResult, draw_importance


def _hooks(llm: str, dataset: str, config_dict: dict) -> None:
    from recbole_layersel.quick_start import run_recbole

    sys.argv = sys.argv[:1]  # RecBole's Config reads the command line; the settings are in the dict
    run_recbole("LayerSelLLM", dataset, config_dict={**config_dict, "llm_path": llm})


def run_hooks(llm: str, dataset: str, out: Path, settings: dict) -> Path:
    """``<out>/<dataset>/<llm name>/`` with the hooks' artifacts, computed now unless the folder holds those
    of the same model and settings (``hooks.json``, written last)."""
    folder, identity = out / dataset / Path(llm).name, {"llm_path": llm, **settings}
    recorded = folder / "hooks.json"
    if recorded.is_file() and json.loads(recorded.read_text(encoding="utf-8")) == identity:
        return folder
    config_dict = {"layer_strategy": "importance", "distill_steps": 0, **settings, "hooks_only": True,
                   "artifacts_dir": str(folder)}
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_hooks, args=(llm, dataset, config_dict))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"the hooks of {llm} on {dataset} failed (exit code {process.exitcode}); "
                           "its RecBole log says why.")
    write_atomic(recorded, json.dumps(identity, indent=1))
    return folder


def compare(folders: dict[str, Path], dataset: str, out: Path) -> str:
    """Write ``<out>/<dataset>-importance.png`` and ``.md`` from each LLM's artifacts; returns the table."""
    results, selections = {}, {}
    for name, folder in folders.items():
        report = json.loads((folder / "importance.json").read_text(encoding="utf-8"))
        missing = [key for key in ImportanceResult.__dataclass_fields__ if key not in report]
        if missing:
            raise LayerSelError(
                f"{folder / 'importance.json'} lacks {missing}: an earlier version of the hooks wrote it. "
                f"Move {folder} away (it is kept, not deleted, here) and run again to recompute it.")
        results[name] = ImportanceResult(**{k: report[k] for k in ImportanceResult.__dataclass_fields__})
        selections[name] = json.loads((folder / "selection.json").read_text(encoding="utf-8"))["selected"]

    widest = max(len(result.fused) for result in results.values())
    figure = Figure(figsize=(3.5 + 0.3 * widest, 5.5 * len(results)), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, (name, result) in zip(figure.subplots(len(results), 1, squeeze=False)[:, 0], results.items(),
                                    strict=True):
        image = draw_importance(axes, result, selections[name],
                                f"{name}: {len(result.fused)} layers, stars = selected")
    figure.colorbar(image, ax=figure.axes, label="scaled rank over layers (1 = most important)",
                    shrink=0.6)
    figure.suptitle(f"Layer importance on {dataset}")
    save_figure(figure, out / f"{dataset}-importance.png")

    lines = [f"# Layer importance across models: {dataset}", "",
             "| LLM | layers | selected | relative depth of selected | in upper half | top 5 by fused |",
             "|---|---:|---|---|---:|---|"]
    for name, result in results.items():
        last = len(result.fused) - 1
        depths = [layer / last for layer in selections[name]]
        upper = sum(depth > 0.5 for depth in depths)
        lines.append(f"| {name} | {last + 1} | {selections[name]} | {', '.join(f'{d:.2f}' for d in depths)} "
                     f"| {upper} of {len(depths)} | {result.ranking[:5]} |")
    table = "\n".join(lines)
    write_atomic(out / f"{dataset}-importance.md", table)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--llms", nargs="+", required=True,
                        help="llm_path values: aliases, directories or .gguf files")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--out", default="results/importance")
    args = parser.parse_args(argv)
    out = Path(args.out)
    settings = {"seed": args.seed, "show_progress": False}
    names = [Path(llm).name for llm in args.llms]
    if len(set(names)) < len(names):
        parser.error(f"--llms {args.llms}: two models share a name ({names}), and so a folder; copy one to "
                     "a directory of another name.")
    folders = {name: run_hooks(llm, args.dataset, out, settings)
               for name, llm in zip(names, args.llms, strict=True)}
    print(compare(folders, args.dataset, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
