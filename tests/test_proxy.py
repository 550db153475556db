"""The greedy search's proxy on a tiny random Llama: validation NDCG@10 after a short adaptation."""

import math

import pytest
import torch
from transformers import AutoModel

from recbole_layersel.backbone import CompactBackbone
from recbole_layersel.compact import HeadConfig
from recbole_layersel.proxy import (
    AdaptedNDCG,
    AdaptSettings,
    ContentNDCG,
    ProxyData,
    _ndcg_at_10,
    content_ndcg_at_10,
)
from recbole_layersel.samples import SequenceSample
from tests.tiny_models import CONFIGS, HIDDEN

NUM_ITEMS = 24  # ids 1..23; 0 is padding
HEAD = HeadConfig(embedding_size=8, max_length=8, n_layers=1, n_heads=2, inner_size=16, dropout=0.0)


def successor_sample(users: range, length: int, seed: int) -> SequenceSample:
    """Histories of consecutive items (i, i+1, ...) whose next item continues the run: learnable."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(1, NUM_ITEMS - length - 1, (len(users),), generator=generator)
    item_seq = starts[:, None] + torch.arange(length)
    return SequenceSample(list(users), item_seq, torch.full((len(users),), length), starts + length)


@pytest.fixture(scope="module")
def proxy_parts():
    torch.manual_seed(0)
    llm = AutoModel.from_config(CONFIGS["llama"]()).eval()
    title_inputs = torch.randn(NUM_ITEMS, HIDDEN)
    title_inputs[0] = 0
    seen = []

    def priors(layers):  # a one-token title per item
        seen.append(list(layers))
        with torch.no_grad():
            prior = CompactBackbone(llm, layers)(title_inputs.unsqueeze(1), torch.ones(NUM_ITEMS, 1).long())
        return torch.cat([torch.zeros(1, HIDDEN), prior[1:, 0]])

    data = ProxyData(successor_sample(range(32), 5, seed=1), successor_sample(range(32, 48), 5, seed=2),
                     title_inputs, priors, HEAD)
    return llm, data, seen


def proxy(parts, steps=60, data=None):
    llm, default_data, _ = parts
    settings = AdaptSettings(steps=steps, learning_rate=0.01, batch_size=8, seed=3)
    return AdaptedNDCG(llm, data or default_data, settings)


def test_the_score_is_a_seeded_ndcg_of_the_layer_set_given(proxy_parts):
    _, data, seen = proxy_parts
    # Targets the histories do not predict: the ranking is all representation, so layer sets differ.
    valid = data.valid
    shuffled = SequenceSample(valid.users, valid.item_seq, valid.lengths, valid.targets.flip(0))
    data = ProxyData(data.train, shuffled, data.title_inputs, data.priors, data.head)
    score = proxy(proxy_parts, data=data)([0, 3])
    assert 0.0 <= score <= 1.0 and score == proxy(proxy_parts, data=data)([0, 3])
    assert seen[-1] == [0, 3]  # the titles went through the candidate's own layers
    assert proxy(proxy_parts, data=data)([1, 4]) != score


def test_the_catalogue_is_the_samples_items(proxy_parts):
    _, data, _ = proxy_parts
    items = torch.cat([data.train.item_seq.flatten(), data.valid.item_seq.flatten(), data.train.targets,
                       data.valid.targets]).unique()
    assert proxy(proxy_parts).items.tolist() == items[items != 0].tolist()


def test_what_is_scored_is_the_adapted_head(proxy_parts):
    assert proxy(proxy_parts, steps=60)([0, 1]) > proxy(proxy_parts, steps=0)([0, 1]) + 0.1


class FixedScores(torch.nn.Module):
    """A stand-in head whose user vectors score the items as given."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.as_tensor(scores, dtype=torch.float)

    def item_vectors(self):
        return torch.eye(self.scores.shape[1])

    def forward(self, item_seq, lengths, states, vectors):
        return self.scores


def test_ndcg_ranks_the_target_without_the_padding_and_the_historys_items():
    item_seq, lengths, targets = torch.tensor([[1, 2], [3, 0]]), torch.tensor([2, 1]), torch.tensor([3, 4])
    sample = SequenceSample([0, 1], item_seq, lengths, targets)
    #                    items: 0    1    2    3    4
    scores = FixedScores([[9.0, 8.0, 7.0, 6.0, 0.0],  # target 3 behind padding and history items 1, 2
                          [9.0, 0.0, 0.0, 8.0, 7.0]])  # target 4 behind padding and history item 3
    assert _ndcg_at_10(scores, sample, states=None) == pytest.approx(1.0)
    sample.targets = torch.tensor([4, 1])  # item 3 (no longer in row 0's history) outranks 4; 4 outranks 1
    assert _ndcg_at_10(scores, sample, states=None) == pytest.approx(1 / math.log2(3))


def test_the_content_proxy_ranks_every_item_by_the_candidates_prior(proxy_parts):
    _, data, seen = proxy_parts
    score = ContentNDCG(data)([2, 5])
    assert seen[-1] == [2, 5] and score == ContentNDCG(data)([2, 5])
    assert score == content_ndcg_at_10(data.priors([2, 5]), data.valid.item_seq, data.valid.targets)
    assert ContentNDCG(data)([0]) != score
