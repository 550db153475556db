"""The protocol every model's training and evaluation follows under our trainer (``compat_trainer``).

Evaluation: which items a user's full ranking leaves out.

RecBole 1.2.1 removes a user's earlier items from the full ranking for general models (BPR, Pop, ...)
and not for sequential ones (SASRec, GRU4Rec, ...), so the same leaderboard scores two protocols. With
``eval_mask_history: True`` (every dataset config we ship) both kinds rank only items the user has not
had before the evaluated one: for a validation row the training items, for a test row the training and
validation items, which is what RecBole's general models already get; as there, the evaluated item itself
stays ranked where it repeats an earlier one. ``False`` masks no model.

Training: until RecBole's early stopping fires (``convergence`` reports how it ended), resumable from the
state before its last epoch (``resume_file``).
"""

import random
from pathlib import Path

import numpy
import torch
from recbole.utils import ModelType

from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import replaced_on_success


def user_items(uids: torch.Tensor, items: torch.Tensor) -> dict[int, torch.Tensor]:
    """The distinct items of each user among the (uid, item) pairs (0 = padding, dropped)."""
    keep = items != 0
    uids, items = uids[keep], items[keep]
    pairs = torch.unique(torch.stack([uids, items], 1), dim=0)  # sorted by user, then item
    users, counts = torch.unique_consecutive(pairs[:, 0], return_counts=True)
    return dict(zip(users.tolist(), pairs[:, 1].split(counts.tolist()), strict=True))


def training_items(train_data, config) -> dict[int, torch.Tensor]:
    """Every item in a user's training rows: a sequential row's history and target, a general row's item."""
    rows = train_data._dataset.inter_feat
    uid, iid = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]
    uids, items = rows[uid], rows[iid]
    history_field = iid + config["LIST_SUFFIX"]
    if history_field in rows:
        history = rows[history_field]
        filled = history != 0
        uids = torch.cat([uids, uids.unsqueeze(1).expand_as(history)[filled]])
        items = torch.cat([items, history[filled]])
    return user_items(uids, items)


class HistoryMaskMixin:
    """A RecBole trainer that evaluates under ``eval_mask_history`` (see the module docstring)."""

    def fit(self, train_data, *args, **kwargs):
        if self.config["MODEL_TYPE"] == ModelType.SEQUENTIAL:  # RecBole's samplers serve general models
            self.training_items = training_items(train_data, self.config)
        return super().fit(train_data, *args, **kwargs)

    def _full_sort_batch_eval(self, batched_data):
        interaction, history_index, positive_u, positive_i = batched_data
        mask = self.config["eval_mask_history"]
        if mask not in (True, False):
            raise LayerSelError(
                f"eval_mask_history={mask!r}; use True (remove each user's earlier items from the full "
                "ranking, for every model: the default and the leaderboards' protocol) or False (keep them, "
                "for every model)."
            )
        if not mask:
            history_index = None
        elif self.config["MODEL_TYPE"] == ModelType.SEQUENTIAL:  # RecBole masks general models only
            history_index = self.sequential_history(interaction)
        return super()._full_sort_batch_eval((interaction, history_index, positive_u, positive_i))

    def sequential_history(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, item) indices of each row's earlier items, its own target aside: the user's training
        items and the row's own history (for a test row it holds the validation item)."""
        if not hasattr(self, "training_items"):
            raise LayerSelError("eval_mask_history=True needs the training items: call fit() before "
                                "evaluate(), as run_recbole does.")
        uid, iid = self.config["USER_ID_FIELD"], self.config["ITEM_ID_FIELD"]
        history = interaction[iid + self.config["LIST_SUFFIX"]].cpu()
        empty = torch.zeros(0, dtype=torch.long)
        items = [torch.cat([self.training_items.get(user, empty), row])
                 for user, row in zip(interaction[uid].tolist(), history, strict=True)]
        rows = torch.cat([torch.full_like(row_items, i) for i, row_items in enumerate(items)])
        items = torch.cat(items)
        # As RecBole's general models: the evaluated item itself stays ranked, even where it is a repeat.
        keep = (items != 0) & (items != interaction[iid].cpu()[rows])
        return rows[keep], items[keep]


class ResumeMixin:
    """With ``resume_file`` set, the training state before each epoch (weights, optimizer, early-stopping
    counters, the best weights so far, the validation curve, every random state) is written there,
    atomically, and ``fit`` starts from it when it exists: a run killed mid-training and started again ends
    exactly as one that was never stopped. The file holds tensors and plain values only (torch's safe
    loader reads it). ``valid_curve`` holds the validation metric of every evaluation, for the run file."""

    def fit(self, train_data, *args, **kwargs):
        self.valid_curve = []
        path = self.config["resume_file"]
        if path and Path(path).is_file():
            self._resume(torch.load(path, map_location="cpu", weights_only=True), train_data)
        return super().fit(train_data, *args, **kwargs)

    def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        if self.config["resume_file"] and epoch_idx > self.start_epoch and self._writes():
            self._save_resume_state(train_data, epoch_idx)
        return super()._train_epoch(train_data, epoch_idx, *args, **kwargs)

    def _valid_epoch(self, valid_data, *args, **kwargs):
        valid_score, valid_result = super()._valid_epoch(valid_data, *args, **kwargs)
        self.valid_curve.append(float(valid_score))
        return valid_score, valid_result

    def _save_checkpoint(self, epoch, *args, **kwargs):
        super()._save_checkpoint(epoch, *args, **kwargs)
        if self.config["resume_file"]:  # a copy of the weights only when a resume state will hold it
            self.best_state = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
            self.best_epoch = epoch

    def _writes(self) -> bool:
        return self.config["single_spec"] or self.config["local_rank"] == 0

    def _save_resume_state(self, train_data, epoch_idx: int) -> None:
        numpy_state = numpy.random.get_state()
        state = {
            "epoch": epoch_idx, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "cur_step": self.cur_step, "best_valid_score": float(self.best_valid_score),
            "best_valid_result": {k: float(v) for k, v in (self.best_valid_result or {}).items()},
            "train_loss": dict(self.train_loss_dict), "valid_curve": list(self.valid_curve),
            "best_model": getattr(self, "best_state", None), "best_epoch": getattr(self, "best_epoch", None),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(numpy.int64)),
                              *numpy_state[2:]),
                    "loader": train_data.generator.get_state()},
        }
        with replaced_on_success(Path(self.config["resume_file"])) as partial:
            torch.save(state, partial)

    def _resume(self, state: dict, train_data) -> None:
        if state["best_model"] is not None:  # the best checkpoint, written again under this run's name
            self.model.load_state_dict(state["best_model"])
            self._save_checkpoint(state["best_epoch"], verbose=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch, self.cur_step = state["epoch"], state["cur_step"]
        self.best_valid_score, self.train_loss_dict = state["best_valid_score"], state["train_loss"]
        self.valid_curve = state["valid_curve"]
        self.best_valid_result = state["best_valid_result"] or None
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        name, keys, *rest = rng["numpy"]
        numpy.random.set_state((name, keys.numpy().astype(numpy.uint32), *rest))
        train_data.generator.set_state(rng["loader"])
        self.logger.info(f"Resuming training at epoch {self.start_epoch} from {self.config['resume_file']}")


def convergence(trainer) -> dict:
    """How training ended: epochs run, the best epoch (RecBole's own reckoning), what stopped it (early
    stopping, the epoch cap, or the one pass that completes a counting model: Pop, ItemKNN) and the
    validation metric of every evaluation (``valid_curve``)."""
    epochs_run = max(trainer.train_loss_dict, default=-1) + 1
    if trainer.config["MODEL_TYPE"] == ModelType.TRADITIONAL:
        stopped_by = "one pass"
    else:
        stopped_by = "early stopping" if trainer.cur_step > trainer.stopping_step else "epoch cap"
    return {"epochs_run": epochs_run, "best_epoch": epochs_run - 1 - trainer.cur_step * trainer.eval_step,
            "stopped_by": stopped_by, "valid_curve": trainer.valid_curve}
