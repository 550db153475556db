"""Which layers of the full LLM make the best text prior: a screen of every hidden state, no training.

    python -m recbole_layersel.title_layers --dataset amazon-electronics [--set llm_path=gemma3-270m]

The model's text prior is its kept layers' final states over each title (``titles.py``); keeping the
first i layers gives the full model's layer-i states (then the final norm). This screen encodes every
title once, keeping every layer's hidden states (0 = the token embeddings, i = layer i's output, ``~`` =
the last ones, after the final norm), pooled both ways (mean over the title's tokens, last token). Each
candidate is standardised over the items as ``compact.py`` does, then drives a content-only recommender
on the validation split: a user's vector is the mean of their history's unit item vectors, items are
ranked by cosine to it (the history left out, as the protocol does), and the score is NDCG@10 of the
validation item. The test split plays no part in the choice.

It ranks candidates; it does not replace training: the model reads the prior through a learnt
projection, not by cosine, so the leaderboard trains the best candidate against the default.
Writes ``<out>/<dataset>.json`` and ``.png`` (NDCG@10 per layer, one line per pooling).
"""

import argparse
import json
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import save_figure, write_atomic
from recbole_layersel.leaderboard import parse_setting, recbole_config
from recbole_layersel.proxy import content_ndcg_at_10
from recbole_layersel.titles import POOLINGS, item_titles, pad_right, pool

LAST = "~"  # the model's last hidden states, after the final norm


@torch.no_grad()
def encode_every_layer(llm, tokenizer, titles: list[str], max_tokens: int, batch_size: int,
                       show_progress: bool = True) -> dict[tuple[str, str], torch.Tensor]:
    """{(layer, pooling): (n, H)} for every hidden state of ``llm`` (layers "0".."L" and "~") and
    pooling; row 0 (RecBole's padding item) stays zero."""
    pad_right(tokenizer)
    encoded: dict[tuple[str, str], torch.Tensor] = {}
    for start in tqdm(range(1, len(titles), batch_size), desc="encode titles (every layer)", unit="batch",
                      disable=not show_progress):
        stop = min(start + batch_size, len(titles))
        batch = tokenizer(titles[start:stop], padding=True, truncation=True, max_length=max_tokens,
                          return_tensors="pt")
        outputs = llm(**batch, output_hidden_states=True)
        layers = {**{str(i): h for i, h in enumerate(outputs.hidden_states)}, LAST: outputs.last_hidden_state}
        for layer, hidden in layers.items():
            for pooling in POOLINGS:
                vectors = encoded.setdefault((layer, pooling), torch.zeros(len(titles), hidden.shape[-1]))
                vectors[start:stop] = pool(hidden, batch["attention_mask"], pooling).float()
    return encoded


def screen(model: str, dataset: str, config_dict: dict) -> dict:
    """The NDCG@10 of every (layer, pooling) on ``dataset``'s validation split, best first."""
    from recbole.data import create_dataset, data_preparation

    from recbole_layersel.compat import atomic_files_verbatim
    from recbole_layersel.llm import default_cache_dir, load_llm

    config = recbole_config(model, dataset, config_dict)
    with atomic_files_verbatim():
        data = create_dataset(config)
    _, valid, _ = data_preparation(config, data)
    llm, tokenizer = load_llm(config["llm_path"], cache_dir=config["llm_cache_dir"] or default_cache_dir())
    encoded = encode_every_layer(llm, tokenizer, item_titles(data, config["title_field"]),
                                 config["title_max_tokens"], config["title_batch_size"],
                                 config["show_progress"])
    rows = valid._dataset.inter_feat
    item_seq, targets = rows[data.iid_field + config["LIST_SUFFIX"]], rows[data.iid_field]
    scores = [{"layer": layer, "title_pooling": pooling,
               "ndcg@10": content_ndcg_at_10(vectors, item_seq, targets)}
              for (layer, pooling), vectors in encoded.items()]
    return {"dataset": dataset, "llm_path": config["llm_path"],
            "title_max_tokens": config["title_max_tokens"], "valid_users": len(targets),
            "scores": sorted(scores, key=lambda row: -row["ndcg@10"])}


def plot(result: dict, path: Path) -> None:
    figure = Figure(figsize=(7, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for pooling in POOLINGS:
        rows = sorted((int(r["layer"]), r["ndcg@10"]) for r in result["scores"]
                      if r["title_pooling"] == pooling and r["layer"] != LAST)
        axes.plot(*zip(*rows, strict=True), marker=".", label=f"{pooling} pooling")
    axes.set(xlabel="hidden states of layer (0 = token embeddings)", ylabel="content-only NDCG@10 (valid)",
             title=f"Title prior by layer: {result['llm_path']} on {result['dataset']}")
    axes.legend()
    save_figure(figure, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--out", type=Path, default=Path("results/title-layers"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. llm_path=gemma3-270m title_max_tokens=16")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_setting(item) for item in args.set)
    except LayerSelError as error:
        parser.error(str(error))
    result = screen("LayerSelLLM", args.dataset, overrides)
    write_atomic(args.out / f"{args.dataset}.json", json.dumps(result, indent=1))
    plot(result, args.out / f"{args.dataset}.png")
    for row in result["scores"][:8]:
        print(f"layer {row['layer']:>2}  title_pooling {row['title_pooling']:<4}  "
              f"NDCG@10 {row['ndcg@10']:.4f}")


if __name__ == "__main__":
    main()
