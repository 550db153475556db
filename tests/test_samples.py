"""Seeded samples of users' longest histories, cut to their most recent items."""

from types import SimpleNamespace

import pytest
import torch

from recbole_layersel.errors import LayerSelError
from recbole_layersel.samples import sample_sequences

FIELDS = {"user": "user_id", "item": "item_id", "item_seq": "item_id_list", "item_seq_len": "item_length"}


def loader(rows: list[tuple[int, list[int], int]]):
    """A RecBole loader's ``_dataset.inter_feat`` with one row per (user, history, target)."""
    width = max(len(history) for _, history, _ in rows)
    item_seq = torch.zeros(len(rows), width, dtype=torch.long)
    for row, (_, history, _) in enumerate(rows):
        item_seq[row, :len(history)] = torch.tensor(history)
    inter_feat = {"user_id": torch.tensor([user for user, _, _ in rows]),
                  "item_length": torch.tensor([len(history) for _, history, _ in rows]),
                  "item_id_list": item_seq, "item_id": torch.tensor([target for _, _, target in rows])}
    return SimpleNamespace(_dataset=SimpleNamespace(inter_feat=inter_feat))


def test_each_user_gives_its_longest_history_cut_to_the_last_items():
    rows = [(1, [5, 6], 7), (1, [5, 6, 7, 8, 9, 10, 11, 12], 13), (2, [3], 4)]
    sample = sample_sequences(loader(rows), FIELDS, size=2, max_items=3, seed=0, setting="s")
    by_user = {user: row for row, user in enumerate(sample.users)}
    assert sorted(by_user) == [1, 2]
    first = by_user[1]
    assert sample.item_seq[first].tolist() == [10, 11, 12] and sample.lengths[first] == 3
    assert sample.targets[first] == 13
    assert sample.item_seq[by_user[2]].tolist() == [3, 0, 0] and sample.lengths[by_user[2]] == 1


def test_the_draw_is_seeded_and_a_sample_larger_than_the_users_is_refused():
    rows = [(user, [user, user + 1], user + 2) for user in range(1, 11)]
    draw = [sample_sequences(loader(rows), FIELDS, 4, 5, seed, "s").users for seed in (3, 3, 4)]
    assert draw[0] == draw[1] != draw[2]
    with pytest.raises(LayerSelError, match=r"importance_sample_users=11 is larger than the data: 10 users"):
        sample_sequences(loader(rows), FIELDS, 11, 5, 0, "importance_sample_users")
