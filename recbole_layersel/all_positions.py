"""SASRec trained as its paper trains it: one causal pass per user, a loss at every position.

RecBole trains a sequential model on one row per training target, the prefix before it, so a user with n
items costs n - 1 passes an epoch. Kang and McAuley train SASRec on the user's sequence once, with the
target at position t being item t + 1: a causal model's state at t is the same whichever longer sequence
it is read from, so that pass gives every target the gradient its prefix row would. ``window_rows`` keeps,
per user, the RecBole rows that end every ``window_stride`` targets counting back from the last, each a
window of up to ``MAX_ITEM_LIST_LENGTH`` items, and each trains its last ``window_stride`` positions, so
every training target is trained exactly once (a history longer than one window is cut into windows, none
dropped). With the default stride, ``MAX_ITEM_LIST_LENGTH``, windows do not overlap (the paper's
objective); a shorter one gives the later targets of long histories more of the context they are
evaluated with, at the cost of more windows: 1 is RecBole's one row per target. Same module, same
hyperparameters (RecBole's SASRec.yaml), another objective.

Reference:
    Wang-Cheng Kang and Julian McAuley. "Self-Attentive Sequential Recommendation." ICDM 2018.
"""

import torch
from recbole.model.sequential_recommender.sasrec import SASRec
from torch import nn

# compat switches off the autograd anomaly mode that importing RecBole's sequential models switches on.
from recbole_layersel import compat  # noqa: F401
from recbole_layersel.distributed import mean_under_ddp
from recbole_layersel.errors import LayerSelError


def window_stride(config) -> int:
    """Targets between the ends of a user's consecutive training windows: ``window_stride``, or
    ``MAX_ITEM_LIST_LENGTH`` (windows that do not overlap) where it is ~."""
    stride, window = config["window_stride"], config["MAX_ITEM_LIST_LENGTH"]
    if stride is None:
        return window
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window:
        raise LayerSelError(
            f"window_stride={stride!r}; use a whole number from 1 (one window per training target, as "
            f"RecBole's rows) to MAX_ITEM_LIST_LENGTH={window} (windows that do not overlap), or ~ for the "
            "latter."
        )
    return stride


def window_rows(user_ids: torch.Tensor, stride: int) -> torch.Tensor:
    """Indices of the rows to keep among RecBole's training rows, whose rows of one user are consecutive
    and in time order (its sequential augmentation writes them so): each user's last row, and every
    ``stride``-th row before it."""
    starts = torch.ones_like(user_ids, dtype=torch.bool)
    starts[1:] = user_ids[1:] != user_ids[:-1]
    run_ids = starts.cumsum(0) - 1
    run_ends = torch.nonzero(torch.cat([starts[1:], torch.tensor([True])])).flatten()
    from_last = run_ends[run_ids] - torch.arange(len(user_ids))
    return torch.nonzero(from_last % stride == 0).flatten()


def windowed(train_data, config):
    """RecBole's training loader over ``window_rows`` of its dataset."""
    dataset = train_data._dataset
    rows = window_rows(dataset.inter_feat[config["USER_ID_FIELD"]], window_stride(config))
    return type(train_data)(config, dataset.copy(dataset.inter_feat[rows]), train_data._sampler, shuffle=True)


def position_targets(item_seq: torch.Tensor, lengths: torch.Tensor, last_targets: torch.Tensor,
                     stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, trained) of right-padded rows (B, T): position t of a row predicts its item t + 1, the
    last position the row's own target; ``trained`` marks the positions a row trains: all it has, or
    its last ``stride`` (those that the window ending ``stride`` targets earlier does not hold)."""
    targets = torch.zeros_like(item_seq)
    targets[:, :-1] = item_seq[:, 1:]
    targets[torch.arange(len(item_seq), device=item_seq.device), lengths - 1] = last_targets
    positions = torch.arange(item_seq.shape[1], device=item_seq.device)
    trained = positions < lengths.unsqueeze(1)
    if stride is not None:
        trained &= positions >= (lengths - stride).unsqueeze(1)
    return targets, trained


def all_position_loss(states: torch.Tensor, item_seq: torch.Tensor, lengths: torch.Tensor,
                      last_targets: torch.Tensor, item_vectors: torch.Tensor,
                      stride: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over all items at every trained position of right-padded rows (B, T)
    (``position_targets``). ``states`` (B, T, H) are the sequence model's outputs, scored against
    ``item_vectors`` (n_items, H). Under DDP the mean is over the positions of every process."""
    targets, trained = position_targets(item_seq, lengths, last_targets, stride)
    logits = states[trained] @ item_vectors.T
    return mean_under_ddp(nn.functional.cross_entropy(logits, targets[trained], reduction="sum"),
                          int(trained.sum()))


class SASRecAllPositions(SASRec):
    r"""RecBole's SASRec with the all-position cross-entropy of the SASRec paper (see the module docstring);
    evaluation and scoring are SASRec's own."""

    trains_all_positions = True  # quick_start trains it on ``windowed`` rows

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        if self.loss_type != "CE":
            raise LayerSelError(f"SASRecAllPositions trains with loss_type CE, not {self.loss_type!r}.")
        self._every_position = False
        self.window_stride = window_stride(config)

    def gather_indexes(self, output, gather_index):
        """SASRec's forward ends here: the last state, or every state while the loss reads them all."""
        return output if self._every_position else super().gather_indexes(output, gather_index)

    def calculate_loss(self, interaction):
        item_seq, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        self._every_position = True
        try:
            states = self.forward(item_seq, lengths)  # (B, T, H)
        finally:
            self._every_position = False
        return all_position_loss(states, item_seq, lengths, interaction[self.POS_ITEM_ID],
                                 self.item_embedding.weight, self.window_stride)
