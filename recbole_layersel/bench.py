"""Full vs compact LayerSelLLM scoring cost, side by side in one process, on the same batches.

    python -m recbole_layersel.bench --llm-path smollm2-135m --num-layers 1 2 4 8 16 --repeats 20

What is timed is ``CompactRecommender.full_sort_scores`` (what ``LayerSelLLM.full_sort_predict`` computes
in LoRA / served mode: backbone over the history's title embeddings, head, scores of every item), then a
training step of ``train_mode: lora`` (LoRA on every layer, the all-position loss, forward and backward;
the optimizer's update is left out: it is the same for every model). The
"full" model is a ``CompactRecommender`` over all L layers (equal to the LLM's own forward); each compact
one keeps k layers chosen by ``--strategy``, bridges included, and the rows end with k = L ("all").
Title embeddings are synthetic (input embeddings of random tokens), the histories random item ids: the
cost does not depend on which items they are. Calls are interleaved (full, then every k, repeated after
one warm-up round) so that machine noise hits all models alike, and the report gives ratios to the full
model: median and p95 latency, throughput, parameters and peak memory, next to the ideal L / k. A model's
peak memory is the bytes of its parameters and buffers plus the most one call allocates on top of them.

Writes ``bench.md`` (machine line and table), ``bench.json`` (rows, with the absolute numbers behind
each ratio) and ``speedup.png`` (speed-up vs k with the ideal L / k line) to ``--out``.
"""

import argparse
import json
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter

import numpy as np
import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from recbole_layersel.all_positions import all_position_loss
from recbole_layersel.backbone import CompactBackbone
from recbole_layersel.compact import DTYPES, CompactRecommender, HeadConfig, add_lora
from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import save_figure, write_atomic
from recbole_layersel.llm import load_llm
from recbole_layersel.registry import PROPERTIES_DIR
from recbole_layersel.selection import DATA_FREE_STRATEGIES, select_layers

DEFAULT_KS = (1, 2, 4, 8, 16)


def peak_memory_bytes(call, device: torch.device) -> int:
    """Peak bytes allocated during one ``call()`` beyond what was allocated before it (its output included).

    CUDA: the caching allocator's own peak counter. CPU has none, so the profiler records every
    allocation and free (with their sizes) and the running total, taken in time order, gives the peak.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    # The raw kineto events: the profiler's FunctionEvents fold allocations into the ops that made them.
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):  # stable: same-time events keep their order
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each shared tensor once)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LayerSelError(f"--device {name} asked for, but torch {torch.__version__} sees no CUDA GPU; "
                            "use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise LayerSelError(f"--device {name}: use cpu or cuda[:index].")
    return device


def _machine(device: torch.device) -> dict:
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        processor = names[0] if names else platform.processor() or platform.machine()
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "processor": processor, "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}


def benchmark(llm_path: str, num_layers=DEFAULT_KS, *, batch_size: int = 64, seq_len: int = 50,
              num_items: int = 1682, repeats: int = 10, strategy: str = "uniform",
              bridge_rank: int | None = None, device: str = "cpu", dtype: str = "float32",
              embedding_size: int = 64, seed: int = 0) -> dict:
    """Time the full and the compact models; return ``{"machine", "settings", "full", "rows"}``.

    One row per k in `num_layers` below L, then k = L. `bridge_rank` goes to every ``CompactBackbone``
    (None: full-rank bridges).
    """
    if repeats < 1:
        raise LayerSelError(f"repeats={repeats}; time each model at least once.")
    device = _device(device)
    llm, _ = load_llm(llm_path, dtype=DTYPES[dtype])
    llm.to(device)
    total = llm.config.num_hidden_layers
    ks = sorted({k for k in num_layers if 1 <= k < total}) + [total]

    generator = torch.Generator().manual_seed(seed)
    models = _models(llm, ks, strategy, bridge_rank, embedding_size, num_items, seq_len, generator, seed)
    models = {name: model.to(device).eval() for name, model in models.items()}
    del llm  # frees the token embeddings, which no model uses
    item_seq = torch.randint(1, num_items + 1, (batch_size, seq_len), generator=generator).to(device)
    item_seq_len = torch.full((batch_size,), seq_len, device=device)

    with torch.inference_mode():
        times = _interleaved(models, lambda m: m.full_sort_scores(item_seq, item_seq_len), repeats, device)
        peaks = {name: tensor_bytes(model) + peak_memory_bytes(
                     lambda m=model: m.full_sort_scores(item_seq, item_seq_len), device)
                 for name, model in models.items()}
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    # LoRA on every layer (the compact models share them) and the all-position loss: train_mode=lora.
    add_lora(models["full"].backbone, r=8, alpha=16, dropout=0.0)
    targets = torch.randint(1, num_items + 1, (batch_size,), generator=generator).to(device)

    def train_step(model) -> None:
        item_vectors = model.item_vectors()
        states = model.sequence_output(item_seq, model.backbone_states(item_seq), item_vectors)
        all_position_loss(states, item_seq, item_seq_len, targets, item_vectors).backward()
        model.zero_grad(set_to_none=True)

    step_times = _interleaved({name: model.train() for name, model in models.items()}, train_step, repeats,
                              device)

    def measures(name) -> dict:
        t, step = np.array(times[name]), float(np.median(step_times[name]))
        return {"median_s": float(np.median(t)), "p95_s": float(np.percentile(t, 95)),
                "users_per_s": batch_size * len(t) / float(t.sum()),  # over all repeats, not the median
                "train_step_s": step, "params": params[name], "peak_bytes": peaks[name]}

    full = measures("full")
    rows = []
    for k in ks:
        m = measures(k)
        speedup, train_speedup = full["median_s"] / m["median_s"], full["train_step_s"] / m["train_step_s"]
        rows.append({"k": k, "layers": models[k].backbone.selected_layers, "speedup": speedup,
                     "p95_speedup": full["p95_s"] / m["p95_s"],
                     "throughput_ratio": m["users_per_s"] / full["users_per_s"],
                     "ideal": total / k, "share_of_ideal": speedup / (total / k),
                     "train_speedup": train_speedup, "train_share_of_ideal": train_speedup / (total / k),
                     "params_ratio": m["params"] / full["params"],
                     "peak_memory_ratio": m["peak_bytes"] / full["peak_bytes"], "absolute": m})
    settings = {"llm_path": llm_path, "total_layers": total, "strategy": strategy,
                "bridge_rank": bridge_rank, "batch_size": batch_size,
                "seq_len": seq_len, "num_items": num_items, "repeats": repeats, "dtype": dtype,
                "embedding_size": embedding_size, "seed": seed}
    return {"machine": _machine(device), "settings": settings, "full": full, "rows": rows}


def _models(llm, ks: list[int], strategy: str, bridge_rank: int | None, embedding_size: int, num_items: int,
            seq_len: int, generator: torch.Generator, seed: int) -> dict:
    """The full recommender ("full") and one compact one per k, with the same random titles and heads.

    The compact backbones hold the full model's own layer modules (no copies, which would put their
    weights elsewhere in memory and distort the timings); reseeding gives every model the same heads.
    """
    total = llm.config.num_hidden_layers
    with torch.no_grad():  # row 0 is RecBole's padding item, which has no title
        embed = llm.get_input_embeddings()
        titles = [embed(torch.randint(llm.config.vocab_size, (num_items + 1,), generator=generator)
                        .to(llm.device)).float() for _ in range(2)]
        for title in titles:
            title[0] = 0
    selections = {"full": list(range(total))}
    selections |= {k: select_layers(total, strategy=strategy, num_layers=k, seed=seed) for k in ks}
    models = {}
    for name, layers in selections.items():
        backbone = CompactBackbone(llm, layers, bridge_rank=bridge_rank)
        torch.manual_seed(seed)
        models[name] = CompactRecommender(backbone, *titles, HeadConfig(embedding_size=embedding_size,
                                                                         max_length=seq_len))
    return models


def _interleaved(models: dict, call, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of ``call(model)`` per model and round, the models interleaved within each round so that
    machine noise hits all alike; round 0 warms up (first calls allocate and pick kernels), untimed."""
    times = {name: [] for name in models}
    for round_ in range(repeats + 1):
        for name, model in models.items():
            _sync(device)
            start = perf_counter()
            call(model)
            _sync(device)
            if round_:
                times[name].append(perf_counter() - start)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markdown_table(result: dict) -> str:
    total, full = result["settings"]["total_layers"], result["full"]
    lines = [f"Ratios to the full model ({total} layers, {full['params']:,} parameters without token "
             "embeddings); speed-ups and throughput: higher is faster; parameters and peak memory: lower "
             "is smaller.", "",
             f"| k of {total} | speed-up (median) | speed-up (p95) | throughput | ideal L/k | share of ideal "
             "| training step speed-up | its share of ideal | parameters | peak memory |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['k'] if r['k'] < total else f'all ({total})'} | {r['speedup']:.2f}x "
              f"| {r['p95_speedup']:.2f}x | {r['throughput_ratio']:.2f}x | {r['ideal']:.2f}x "
              f"| {100 * r['share_of_ideal']:.0f} % | {r['train_speedup']:.2f}x "
              f"| {100 * r['train_share_of_ideal']:.0f} % | {r['params_ratio']:.3f} "
              f"| {r['peak_memory_ratio']:.3f} |"
              for r in result["rows"]]
    return "\n".join(lines)


def write_report(result: dict, out_dir: Path, command: str) -> None:
    """``bench.md``, ``bench.json`` and ``speedup.png`` in `out_dir`, each written atomically."""
    machine, settings = result["machine"], result["settings"]
    header = (f"torch {machine['torch']}, {machine['threads']} threads, {machine['device']} "
              f"({machine['processor']}), {machine['date']}; {settings['batch_size']} users x "
              f"{settings['seq_len']} items of {settings['num_items']}, {settings['strategy']} layers, "
              f"bridge rank {settings['bridge_rank'] or 'full'}, {settings['dtype']}, "
              f"{settings['repeats']} repeats")
    out_dir = Path(out_dir)
    write_atomic(out_dir / "bench.md", f"# Compact vs full: full_sort_predict\n\n{header}\n\n"
                                       f"    {command}\n\n{markdown_table(result)}")
    write_atomic(out_dir / "bench.json", json.dumps({**result, "command": command}, indent=1))

    ks = [r["k"] for r in result["rows"]]
    figure = Figure(figsize=(5, 4), layout="constrained")
    FigureCanvasAgg(figure)  # no display, no pyplot state
    axes = figure.add_subplot()
    axes.plot(ks, [r["ideal"] for r in result["rows"]], "--", color="grey", label="ideal L / k")
    axes.plot(ks, [r["speedup"] for r in result["rows"]], "o-", label="measured (median)")
    axes.set(xscale="log", yscale="log", xlabel="k (layers kept)", ylabel="speed-up vs full model",
             title=f"{Path(settings['llm_path']).name}, L = {settings['total_layers']}")
    axes.minorticks_off()  # log axes otherwise label minor ticks as 2x10^1
    axes.set_xticks(ks, [str(k) for k in ks])
    ideals = sorted({r["ideal"] for r in result["rows"]})
    axes.set_yticks(ideals, [f"{i:.3g}x" for i in ideals])
    axes.legend()
    save_figure(figure, out_dir / "speedup.png")


def _rank(value: str) -> int | None:
    return None if value == "full" else int(value)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m recbole_layersel.bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-path", default="smollm2-135m")
    parser.add_argument("--num-layers", type=int, nargs="+", default=list(DEFAULT_KS),
                        help="values of k; k = L (all layers) is always added as the last row")
    parser.add_argument("--strategy", default="uniform", choices=DATA_FREE_STRATEGIES,
                        help="which k layers (uniform: evenly spread, first and last included)")
    defaults = yaml.safe_load((PROPERTIES_DIR / "LayerSelLLM.yaml").read_text(encoding="utf-8"))
    parser.add_argument("--bridge-rank", type=_rank, default=defaults["bridge_rank"],
                        help="linear/residual bridge rank, or 'full' (default: what LayerSelLLM.yaml ships)")
    parser.add_argument("--batch-size", type=int, default=64, help="users per call")
    parser.add_argument("--seq-len", type=int, default=50, help="history length")
    parser.add_argument("--num-items", type=int, default=1682, help="catalogue size (ml-100k's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds after one warm-up round")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--embedding-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "recbole_layersel.bench",
                          *(sys.argv[1:] if argv is None else argv)])
    try:
        result = benchmark(args.llm_path, args.num_layers, batch_size=args.batch_size, seq_len=args.seq_len,
                           num_items=args.num_items, repeats=args.repeats, strategy=args.strategy,
                           bridge_rank=args.bridge_rank, device=args.device, dtype=args.dtype,
                           embedding_size=args.embedding_size, seed=args.seed)
    except LayerSelError as err:
        parser.error(str(err))
    write_report(result, args.out, command)
    print(markdown_table(result))
    print(f"written to {args.out}/bench.md, bench.json, speedup.png")


if __name__ == "__main__":
    main()
