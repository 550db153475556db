"""Ask a trained model "what next for this user?", from Python or the command line.

    from recbole_layersel.recommend import Recommender
    recommender = Recommender.load("exports/ml-100k")   # an export, or a checkpoint run_recbole.py saved
    recommender.recommend([["242", "302"]], top_k=10)   # histories of dataset item ids, oldest first
    recommender.recommend_users(["196"], top_k=10)      # users of the dataset the model was trained on

    python -m recbole_layersel.recommend --model-dir exports/ml-100k --user 196 --topk 10
    python -m recbole_layersel.recommend --model-dir saved/LayerSelLLM-<time>.pth --items 242,302 --json

Scores are the model's own full ranking (``CompactRecommender.full_sort_scores``); items already in the
history are left out unless asked for. An empty history gets the most popular items of the training
data, marked as such; unknown item or user ids are an error that names them. Only pickle-free files
are read: a RecBole checkpoint is used through the export ``run_recbole.py`` writes beside it.
"""

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from recbole_layersel.errors import LayerSelError
from recbole_layersel.export import META_NAME, load_compact


@dataclass
class Recommendation:
    item_id: str
    title: str
    score: float
    source: str  # "model", or "popularity" for an empty history


class Recommender:
    """A loaded compact model plus the dataset's item ids, titles, popularity and user histories."""

    def __init__(self, model, meta: dict):
        self.model, self.meta = model, meta
        self.item_ids: list[str] = meta["item_ids"]
        self.titles: list[str] = meta["titles"]
        self.index = {item: i for i, item in enumerate(self.item_ids) if i}  # 0 is padding
        self.histories: dict[str, list[str]] = meta["user_histories"]

    @classmethod
    def load(cls, path: str | Path) -> "Recommender":
        """From an export directory, or from a RecBole checkpoint with its export beside it."""
        path = Path(path)
        if path.suffix == ".pth":
            beside = path.with_suffix(".layersel")
            if not (beside / META_NAME).is_file():
                raise LayerSelError(
                    f"{path} is a pickled RecBole checkpoint and has no pickle-free export beside it "
                    f"({beside}); pickles are not loaded. Retrain with this version of run_recbole.py, "
                    "which writes one beside every LayerSelLLM checkpoint, or pass an export directory."
                )
            path = beside
        return cls(*load_compact(path))

    def recommend_users(self, users: list[str], top_k: int = 10, include_history: bool = False):
        unknown = [user for user in users if str(user) not in self.histories]
        if unknown:
            raise LayerSelError(
                f"unknown user ids {unknown[:10]}: this model knows {len(self.histories)} users of "
                f"dataset items {self.item_ids[1:3]}...; pass their item histories with --items instead."
            )
        return self.recommend([self.histories[str(user)] for user in users], top_k, include_history)

    @torch.no_grad()
    def recommend(self, histories: list[list[str]], top_k: int = 10, include_history: bool = False):
        """Top ``top_k`` items for each history (dataset item ids, oldest first), best first."""
        if top_k < 1:
            raise LayerSelError(f"top_k={top_k} must be at least 1.")
        unknown = sorted({str(item) for history in histories for item in history} - set(self.index))
        if unknown:
            raise LayerSelError(
                f"unknown item ids {unknown[:10]}{' ...' if len(unknown) > 10 else ''}: not items of the "
                f"dataset this model was trained on ({len(self.index)} items). Remove them from the history."
            )
        results: list[list[Recommendation] | None] = [None] * len(histories)
        known = [i for i, history in enumerate(histories) if history]
        for i in set(range(len(histories))) - set(known):
            results[i] = self._popular(top_k)
        if known:
            max_history = self.meta["head"]["max_length"]
            rows = [[self.index[str(item)] for item in histories[i]][-max_history:] for i in known]
            item_seq = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
            for row, items in enumerate(rows):
                item_seq[row, :len(items)] = torch.tensor(items)
            scores = self.model.full_sort_scores(item_seq, torch.tensor([len(items) for items in rows]))
            scores[:, 0] = -torch.inf  # padding
            if not include_history:
                scores.scatter_(1, item_seq, -torch.inf)
            top = scores.topk(min(top_k, int(torch.isfinite(scores).sum(1).min())), dim=1)
            for row, i in enumerate(known):
                ranked = zip(top.values[row].tolist(), top.indices[row].tolist(), strict=True)
                results[i] = [Recommendation(self.item_ids[j], self.titles[j], s, "model") for s, j in ranked]
        return results

    def _popular(self, top_k: int) -> list[Recommendation]:
        counts = torch.tensor(self.meta["item_counts"], dtype=torch.float)
        counts[0] = -1
        top = counts.topk(min(top_k, len(counts) - 1))
        return [Recommendation(self.item_ids[j], self.titles[j], float(c), "popularity")
                for c, j in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def format_table(recommendations: list[Recommendation]) -> str:
    if recommendations and recommendations[0].source == "popularity":
        header = "Empty history: the most popular items of the training data (score = training count)."
    else:
        header = "Recommendations (score = model score, higher is better)."
    lines = [header, f"{'rank':>4}  {'item_id':<12} {'score':>10}  title"]
    lines += [f"{rank:>4}  {r.item_id:<12} {r.score:>10.4f}  {r.title}"
              for rank, r in enumerate(recommendations, 1)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="export directory or RecBole checkpoint (.pth)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user id of the dataset the model was trained on")
    who.add_argument("--items", help="comma-separated dataset item ids, oldest first ('' = empty history)")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--include-history", action="store_true", help="also recommend items already seen")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        recommender = Recommender.load(args.model_dir)
        if args.user is not None:
            (result,) = recommender.recommend_users([args.user], args.topk, args.include_history)
        else:
            history = [item for item in args.items.split(",") if item.strip()]
            (result,) = recommender.recommend([history], args.topk, args.include_history)
    except LayerSelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps([asdict(r) for r in result], indent=1) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
