"""Pop, the popularity baseline, counting what it says it counts.

RecBole 1.2.1's ``Pop.calculate_loss`` does ``item_cnt[item] = item_cnt[item] + 1`` over a batch, which
adds 1 to an item however often the batch holds it, and it counts every row of its pointwise loader,
whose sampled negatives (label 0) are no interactions at all. So its "popularity" is the number of
batches an item falls in, plus noise, and it changes with the seed. This one counts each training
interaction once; scoring, the trainer (one pass) and everything else are RecBole's.
"""

import torch
from recbole.model.general_recommender.pop import Pop as RecBolePop


class Pop(RecBolePop):
    r"""Items ranked by their number of training interactions."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.LABEL = config["LABEL_FIELD"]

    def calculate_loss(self, interaction):
        items = interaction[self.ITEM_ID]
        if self.LABEL in interaction:  # the pointwise loader's sampled negatives carry label 0
            items = items[interaction[self.LABEL] > 0]
        self.item_cnt.index_add_(0, items, torch.ones_like(items).unsqueeze(1))
        self.max_cnt = torch.max(self.item_cnt, dim=0)[0]
        return torch.nn.Parameter(torch.zeros(1)).to(self.device)
