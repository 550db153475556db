"""The greedy search's proxies: how well a candidate layer set recommends, in seconds, not a training run.

Training LayerSelLLM on a layer set until early stopping costs a run; a proxy must rank layer sets as those
runs do (``selection.json`` logs every score; the README reports how well they agree). The kept layers S
(bridges at their identity start) are both the item encoder and the sequence backbone, so both proxies
encode the titles through S (the items' text prior, ``titles.py``) and score NDCG@10 of the next item of a
validation sample of histories, each history's own items removed (the leaderboard's protocol):

- ``content`` (``ContentNDCG``): every item ranked by the cosine between its standardised prior and the
  mean of the history's (``content_ndcg_at_10``), over the whole catalogue. No training: the
  prior is what the layers give the items, and it is what separates trained layer sets most.
- ``adapted`` (``AdaptedNDCG``): the frozen mode's training, shortened. S also reads the histories of a
  training and the validation sample (their states); a fresh sequence head and item vectors
  (``compact.py``), the same seeded start for every S, train ``steps`` Adam steps with the all-position
  loss on the training sample; the validation items are ranked among the samples' items.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from recbole_layersel.all_positions import position_targets
from recbole_layersel.backbone import seeded_backbone
from recbole_layersel.compact import CompactRecommender, HeadConfig
from recbole_layersel.samples import SequenceSample

PROXIES = ("content", "adapted")


@dataclass
class ProxyData:
    train: SequenceSample | None  # the adapted proxy's head trains on these histories
    valid: SequenceSample  # the proxies score these
    title_inputs: torch.Tensor  # (n_items, H): each item's input to the backbone (row 0 padding)
    # layers -> every item's text prior (n_items, H) through them, bridges at their identity start
    # (``titles.TitlePriors``; its ``retain(sets)`` keeps the states the search's next candidates share)
    priors: Callable[[list[int]], torch.Tensor]
    head: HeadConfig


@dataclass(frozen=True)
class AdaptSettings:
    steps: int  # Adam steps of the head on the training sample
    learning_rate: float
    batch_size: int  # histories per step, and per backbone pass
    seed: int  # the head's start, the order of its batches and its dropout


class ContentNDCG:
    """``proxy(layers) -> float``: the content proxy (module docstring) for one set of layers."""

    def __init__(self, data: ProxyData):
        self.data = data

    @torch.no_grad()
    def __call__(self, layers: list[int]) -> float:
        valid = self.data.valid
        return content_ndcg_at_10(self.data.priors(layers).float().cpu(), valid.item_seq.cpu(),
                                  valid.targets.cpu())


def content_ndcg_at_10(vectors: torch.Tensor, item_seq: torch.Tensor, targets: torch.Tensor) -> float:
    """NDCG@10 of ``targets`` when every item is ranked by cosine between its standardised vector and the
    mean of the unit vectors of the user's history (right-padded ``item_seq``), history items left out
    (a target that repeats one stays ranked, as in RecBole)."""
    items = vectors[1:]
    standard = (vectors - items.mean(0)) / items.std(0).clamp(min=1e-6)
    unit = torch.nn.functional.normalize(standard, dim=-1)
    unit[0] = 0  # padding positions add nothing to a user's sum
    users = torch.nn.functional.normalize(unit[item_seq].sum(1), dim=-1)
    scores = users @ unit.T
    target = scores.gather(1, targets[:, None])
    scores.scatter_(1, item_seq, -torch.inf)  # the history is not ranked
    scores[:, 0] = -torch.inf  # nor RecBole's padding item
    scores.scatter_(1, targets[:, None], target)
    rank = (scores >= target).sum(1) - 1  # ties go against the target (items with one title, say)
    return float(torch.where(rank < 10, 1 / torch.log2(rank + 2.0), torch.zeros(len(rank))).mean())


class AdaptedNDCG:
    """``proxy(layers) -> float``: the adapted proxy (module docstring) for one set of ``llm``'s layers."""

    def __init__(self, llm, data: ProxyData, settings: AdaptSettings, mlp_bridges: bool = False,
                 bridge_rank: int | None = None):
        self.llm, self.data, self.settings = llm, data, settings
        self.bridges = {"mlp_bridges": mlp_bridges, "bridge_rank": bridge_rank}
        used = torch.cat([sample.item_seq.flatten() for sample in (data.train, data.valid)]
                         + [data.train.targets, data.valid.targets]).unique()
        self.items = used[used != 0]  # the catalogue: the samples' items, renumbered 1..M below
        renumber = torch.zeros(len(data.title_inputs), dtype=torch.long, device=used.device)
        renumber[self.items] = torch.arange(1, len(self.items) + 1, device=used.device)
        self.train, self.valid = (
            SequenceSample(sample.users, renumber[sample.item_seq], sample.lengths, renumber[sample.targets])
            for sample in (data.train, data.valid))

    def __call__(self, layers: list[int]) -> float:
        s = self.settings
        backbone = seeded_backbone(self.llm, layers, s.seed, **self.bridges).eval()
        prior = _with_padding_row(self.data.priors(layers)[self.items].to(self.data.title_inputs.device))
        inputs = _with_padding_row(self.data.title_inputs[self.items])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            model = CompactRecommender(backbone, inputs, prior, self.data.head)
            train_states, valid_states = (_states(model, sample, s.batch_size)
                                          for sample in (self.train, self.valid))
            adapt(model, self.train, train_states, s)
        return _ndcg_at_10(model, self.valid, valid_states)


def _with_padding_row(rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros(1, rows.shape[1], dtype=rows.dtype, device=rows.device), rows])


@torch.no_grad()
def _states(model: CompactRecommender, sample: SequenceSample, batch_size: int) -> torch.Tensor:
    return torch.cat([model.backbone_states(sample.item_seq[start:start + batch_size]).float()
                      for start in range(0, len(sample), batch_size)])


def adapt(model: CompactRecommender, sample: SequenceSample, states: torch.Tensor,
          settings: AdaptSettings) -> None:
    """``settings.steps`` Adam steps of everything but the backbone on the all-position loss of
    ``sample`` (its backbone ``states`` given), batches in a seeded order; left in eval mode."""
    heads = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    optimizer = torch.optim.Adam(heads, lr=settings.learning_rate)
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.cat([torch.randperm(len(sample), generator=generator)
                       for _ in range(settings.steps * settings.batch_size // len(sample) + 1)])
    model.train()
    for step in range(settings.steps):
        rows = order[step * settings.batch_size:(step + 1) * settings.batch_size]
        loss = sample_loss(model, sample, states[rows], rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def sample_loss(model: CompactRecommender, sample: SequenceSample, states: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all items at every position of ``sample``'s ``rows``, read by ``model``'s
    head from their backbone ``states`` (B, T, H). ``all_position_loss`` without its mean over the
    processes of a group: the proxy runs in one process."""
    item_seq = sample.item_seq[rows]
    targets, filled = position_targets(item_seq, sample.lengths[rows], sample.targets[rows])
    vectors = model.item_vectors()
    output = model.sequence_output(item_seq, states, vectors)
    return nn.functional.cross_entropy(output[filled] @ vectors.T, targets[filled])


@torch.no_grad()
def _ndcg_at_10(model: CompactRecommender, sample: SequenceSample, states: torch.Tensor) -> float:
    """Mean NDCG@10 of the samples' targets among all items but the padding and each history's own."""
    vectors = model.item_vectors()
    scores = model(sample.item_seq, sample.lengths, states, vectors) @ vectors.T
    scores[:, 0] = -torch.inf
    rows = torch.arange(len(sample)).unsqueeze(1)
    history = sample.item_seq.masked_fill(sample.item_seq == sample.targets.unsqueeze(1), 0)
    scores[rows, history] = -torch.inf  # padding positions point at item 0, already out
    rank = (scores > scores.gather(1, sample.targets.unsqueeze(1))).sum(1)
    return float(torch.where(rank < 10, 1 / torch.log2(rank.float() + 2), torch.zeros(())).mean())
