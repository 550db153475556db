"""Compact vs full backbone speed, side by side in one process, on the same batches.

    python -m recbole_layersel.bench --llm-path smollm2-135m --num-layers 8 --batch-size 64 --seq-len 50

The full model is the LLM's own forward over ``inputs_embeds`` (all L layers, no cache); each compact
model is a ``CompactBackbone`` of k layers built from a copy of it. Calls are interleaved (full, then
each k, repeated) so that machine noise hits all of them alike, and only ratios are reported:
speed-up = median full time / median compact time, next to the ideal L / k.
"""

import argparse
import statistics
import time

import torch

from recbole_layersel.backbone import CompactBackbone
from recbole_layersel.llm import load_llm
from recbole_layersel.selection import select_layers


@torch.no_grad()
def benchmark(llm_path: str, num_layers: list[int], *, batch_size: int = 64, seq_len: int = 50,
              repeats: int = 5, strategy: str = "uniform") -> list[dict]:
    """One row per k: ``{"k", "layers", "speedup", "ideal", "efficiency"}``."""
    full, _ = load_llm(llm_path)
    total = full.config.num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    token_ids = torch.randint(full.config.vocab_size, (batch_size, seq_len), generator=generator)
    inputs_embeds = full.get_input_embeddings()(token_ids)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    # The compact backbones share the full model's layer modules (no copies): the weights they read sit
    # where the full model's do, and building one only renumbers layer_idx (used by KV caches, which no
    # call here has) and re-points configs with the same attention implementation.
    compacts = {k: CompactBackbone(full, select_layers(total, strategy=strategy, num_layers=k))
                for k in num_layers}

    def run_full():
        full(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)

    calls = {"full": run_full}
    calls |= {k: (lambda c=c: c(inputs_embeds, attention_mask)) for k, c in compacts.items()}
    times = {name: [] for name in calls}
    for call in calls.values():  # warm-up: first calls allocate and pick kernels
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    full_median = statistics.median(times["full"])
    rows = []
    for k, compact in compacts.items():
        speedup = full_median / statistics.median(times[k])
        rows.append({"k": k, "layers": compact.selected_layers, "speedup": speedup, "ideal": total / k,
                     "efficiency": speedup / (total / k)})
    return rows


def markdown_table(rows: list[dict], total_layers: int) -> str:
    lines = [f"| k of {total_layers} | speed-up vs full | ideal L/k | share of ideal |",
             "|---:|---:|---:|---:|"]
    lines += [f"| {r['k']} | {r['speedup']:.2f}x | {r['ideal']:.2f}x | {100 * r['efficiency']:.0f} % |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-path", default="smollm2-135m")
    parser.add_argument("--num-layers", type=int, nargs="+", default=[8])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--strategy", default="uniform")
    args = parser.parse_args()
    rows = benchmark(args.llm_path, args.num_layers, batch_size=args.batch_size, seq_len=args.seq_len,
                     repeats=args.repeats, strategy=args.strategy)
    total = round(rows[0]["ideal"] * rows[0]["k"])
    print(f"{args.llm_path}: {args.batch_size} users x {args.seq_len} items, median of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print(markdown_table(rows, total))


if __name__ == "__main__":
    main()
