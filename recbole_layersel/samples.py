"""Seeded samples of user histories from RecBole's loaders: what the pre-training hooks read."""

from dataclasses import dataclass

import torch

from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import tensors_sha256


@dataclass
class SequenceSample:
    """Right-padded histories (N, T), their lengths, and the item that followed each."""

    users: list[int]
    item_seq: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.users)

    def sha256(self) -> str:
        return tensors_sha256({"users": torch.tensor(self.users), "item_seq": self.item_seq,
                               "lengths": self.lengths, "targets": self.targets})

    def to(self, device) -> "SequenceSample":
        return SequenceSample(self.users, self.item_seq.to(device), self.lengths.to(device),
                              self.targets.to(device))

    def mask(self) -> torch.Tensor:
        return (self.item_seq != 0).long()


def sample_sequences(loader, fields: dict[str, str], size: int, max_items: int, seed: int,
                     setting: str) -> SequenceSample:
    """``size`` users drawn (seeded) from ``loader``'s rows, each with its longest row, keeping the last
    ``max_items`` items of the history. ``fields`` names RecBole's columns: user, item, item_seq,
    item_seq_len (a SequentialRecommender's USER_ID, ITEM_ID, ITEM_SEQ, ITEM_SEQ_LEN)."""
    rows = loader._dataset.inter_feat
    longest: dict[int, tuple[int, int]] = {}  # user -> (history length, row index)
    for index, (user, length) in enumerate(zip(rows[fields["user"]].tolist(),
                                               rows[fields["item_seq_len"]].tolist(), strict=True)):
        if length > longest.get(user, (0, -1))[0]:
            longest[user] = (length, index)
    if size > len(longest):
        raise LayerSelError(
            f"{setting}={size} is larger than the data: {len(longest)} users have rows here. "
            f"Set {setting} to at most {len(longest)}."
        )
    generator = torch.Generator().manual_seed(seed)
    users = sorted(longest)
    chosen = [users[i] for i in torch.randperm(len(users), generator=generator)[:size].tolist()]
    indices = torch.tensor([longest[u][1] for u in chosen])
    full_seq, full_len = rows[fields["item_seq"]][indices], rows[fields["item_seq_len"]][indices]
    lengths = full_len.clamp(max=max_items)
    item_seq = torch.zeros(size, int(lengths.max()), dtype=torch.long)
    for row, (n, keep) in enumerate(zip(full_len.tolist(), lengths.tolist(), strict=True)):
        item_seq[row, :keep] = full_seq[row, n - keep:n]
    return SequenceSample(chosen, item_seq, lengths, rows[fields["item"]][indices])
