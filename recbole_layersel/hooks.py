"""Pre-training hooks: importance -> selection -> distillation on the full LLM, before RecBole trains.

``LayerSelLLM.before_training`` calls ``run_pretraining_hooks`` while the model still holds every layer
of the LLM (a ``CompactBackbone`` of all layers is exactly the full model):

1. **importance** (``importance.py``) on a seeded sample of training histories, after a short warm-up
   of the recommendation heads on the full model's states (LLM frozen), so the loss means something;
2. **selection** (``selection.py``): greedy by fused importance with a proxy on a validation sample, or
   a baseline strategy, or the config's own ``selected_layers``;
3. **distillation** (``distill.py``): the bridges of the compact model learn to reproduce the full
   model's final states on the sample.

A stage is skipped when the config gives its result (``selected_layers`` skips 1 and 2 unless a later
stage needs importance; ``distill_steps: 0`` skips 3) and is cached under ``<llm_cache_dir>/stages/``,
keyed by model, dataset, data sample and settings, so a rerun or a second variant reuses it.

The greedy proxy (``selection_proxy``): ``fidelity`` is the mean cosine similarity between the compact
and the full model's last-position states on the validation sample (smooth, no labels needed);
``ndcg`` is NDCG@10 of the warmed-up heads applied to the compact model's states against the validation
targets (the rec metric itself, noisier on small samples). Untrained (identity) bridges in both.

Artifacts, next to RecBole's log (``artifacts_dir``): importance.json, importance.png,
selection.json, distillation.json.
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from recbole_layersel.backbone import CompactBackbone
from recbole_layersel.distill import distill_bridges
from recbole_layersel.distributed import (
    all_reduce_sum,
    broadcast_parameters,
    from_main,
    is_main,
    main_value,
    my_batches,
    rank_and_world,
)
from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import StageCache, StageSettings, code_sha256, tensors_sha256, write_atomic
from recbole_layersel.importance import ImportanceResult, compute_importance, plot_importance_heatmap
from recbole_layersel.selection import DATA_FREE_STRATEGIES, greedy_select, select_layers

logger = logging.getLogger(__name__)
PROXIES = ("fidelity", "ndcg")


@dataclass
class SequenceSample:
    """Right-padded histories (N, T), their lengths, and the item that followed each."""

    users: list[int]
    item_seq: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor

    def sha256(self) -> str:
        return tensors_sha256({"users": torch.tensor(self.users), "item_seq": self.item_seq,
                               "lengths": self.lengths, "targets": self.targets})


def sample_sequences(model, loader, size: int, max_items: int, seed: int, setting: str) -> SequenceSample:
    """``size`` users drawn (seeded) from ``loader``'s rows, each with its longest row, keeping the last
    ``max_items`` items of the history."""
    rows = loader._dataset.inter_feat
    longest: dict[int, tuple[int, int]] = {}  # user -> (history length, row index)
    for index, (user, length) in enumerate(zip(rows[model.USER_ID].tolist(),
                                               rows[model.ITEM_SEQ_LEN].tolist(), strict=True)):
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
    full_seq, full_len = rows[model.ITEM_SEQ][indices], rows[model.ITEM_SEQ_LEN][indices]
    lengths = full_len.clamp(max=max_items)
    item_seq = torch.zeros(size, int(lengths.max()), dtype=torch.long)
    for row, (n, keep) in enumerate(zip(full_len.tolist(), lengths.tolist(), strict=True)):
        item_seq[row, :keep] = full_seq[row, n - keep:n]
    return SequenceSample(chosen, item_seq, lengths, rows[model.ITEM_ID][indices])


def _last(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return states[torch.arange(len(states)), lengths - 1]


def _final_states(backbone, inputs, mask, batch_size: int) -> torch.Tensor:
    return _teacher_states(backbone, inputs, mask, batch_size, per_layer=False)["last"]


@torch.no_grad()
def _teacher_states(backbone, inputs, mask, batch_size: int, per_layer: bool) -> dict[str, torch.Tensor]:
    """The backbone's final states (N, T, H) and, with ``per_layer`` (layer-wise distillation), every
    layer's output (L, N, T, H), as ``compute_importance`` returns them; data-parallel over a process
    group. Per-layer outputs are L times the memory: only kept when asked."""
    backbone.eval()
    states = {"last": torch.zeros(*inputs.shape[:2], backbone.config.hidden_size, device=inputs.device)}
    if per_layer:
        states["per_layer"] = torch.zeros(len(backbone.layers), *states["last"].shape, device=inputs.device)
    for start, stop in my_batches(len(inputs), batch_size):
        outputs = backbone(inputs[start:stop], mask[start:stop], output_hidden_states=per_layer)
        if per_layer:
            outputs, layers = outputs
            states["per_layer"][:, start:stop] = torch.stack(layers).float()
        states["last"][start:stop] = outputs.float()
    return {name: all_reduce_sum(tensor) for name, tensor in states.items()}


def head_scores(compact, sample: SequenceSample, states: torch.Tensor, rows=slice(None)) -> torch.Tensor:
    """Scores of every item after the histories of ``sample`` (or its ``rows``), read by the head from
    the backbone ``states`` (B, T, H) of those rows."""
    item_vectors = compact.item_vectors()
    return compact(sample.item_seq[rows], sample.lengths[rows], states, item_vectors) @ item_vectors.T


def warm_up_heads(compact, states: torch.Tensor, sample: SequenceSample, steps: int, lr: float) -> None:
    """Train the heads (everything but the backbone) on fixed full-model states, so the importance
    loss is the loss of a recommender, not of random heads; they are left in eval mode (no dropout), in
    which the importance pass and the proxy read them."""
    heads = [p for name, p in compact.named_parameters() if not name.startswith("backbone.")]
    optimizer = torch.optim.Adam(heads, lr=lr)
    compact.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head_scores(compact, sample, states), sample.targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    compact.eval()


def _ndcg_at_10(scores: torch.Tensor, targets: torch.Tensor) -> float:
    target_scores = scores.gather(1, targets.unsqueeze(1))
    rank = (scores > target_scores).sum(1)
    gains = torch.where(rank < 10, 1 / torch.log2(rank.float() + 2), torch.zeros(rank.shape))
    return float(gains.mean())


def artifacts_dir(config) -> Path | None:
    """``artifacts_dir`` from the config, else a folder named after RecBole's log file, beside it."""
    if config["artifacts_dir"]:
        return Path(config["artifacts_dir"])
    for handler in logging.getLogger().handlers:
        # pytest's logging plugin adds a FileHandler on os.devnull when no log file is configured.
        if isinstance(handler, logging.FileHandler) and handler.baseFilename != os.devnull:
            return Path(handler.baseFilename).with_suffix("")
    return None


@dataclass(frozen=True)
class ImportanceSettings(StageSettings):
    seed: int
    learning_rate: float  # the heads warm up at ten times the training rate
    importance_sample_users: int
    importance_max_items: int
    importance_batch_size: int
    importance_warmup_steps: int
    importance_weights: dict | None
    attention_top_k: int
    llm_quantization: str | None


@dataclass(frozen=True)
class SelectionSettings(StageSettings):
    layer_strategy: str
    selected_layers: list | None
    num_layers: int
    selection_proxy: str
    selection_sample_users: int
    selection_patience: int
    selection_min_gain: float
    selection_max_evaluations: int | None
    selection_max_seconds: float | None


@dataclass(frozen=True)
class DistillSettings(StageSettings):
    distill_steps: int
    distill_lr: float
    distill_reg_lambda: float
    distill_layerwise: bool
    mlp_bridges: bool
    bridge_rank: int | None


def seeded_backbone(llm, selected: list[int], seed: int, mlp_bridges: bool, bridge_rank) -> CompactBackbone:
    """The compact backbone with bridges initialised from ``seed``, not from the global random state
    (which the stages before it consume differently on a cache hit and a miss); the global state is
    left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CompactBackbone(llm, selected, mlp_bridges=mlp_bridges, bridge_rank=bridge_rank)


def run_pretraining_hooks(model, llm, train_data, valid_data) -> CompactBackbone:
    """Importance, selection and distillation for ``model`` (a LayerSelLLM still holding the full
    backbone); returns the compact backbone to train. ``llm`` is the loaded source model."""
    config, compact_model = model.config, model.compact
    full = compact_model.backbone
    total = full.num_source_layers
    imp, sel, dist = (settings.from_config(config)
                      for settings in (ImportanceSettings, SelectionSettings, DistillSettings))
    strategy, explicit = sel.layer_strategy, sel.selected_layers
    # Under a process group every process computes the same results; the first one writes them.
    writes = is_main()
    world = rank_and_world()[1]
    if world > 1:
        logger.info(f"Pre-training hooks run data-parallel over {world} processes.")
    out_dir = artifacts_dir(config) if writes else None
    cache = StageCache(model.cache_dir)
    batch_size = imp.importance_batch_size

    sample = sample_sequences(model, train_data, imp.importance_sample_users, imp.importance_max_items,
                              imp.seed, "importance_sample_users")
    inputs = compact_model.title_inputs[sample.item_seq]
    mask = (sample.item_seq != 0).long()
    # What every stage reads: the model's weights (by file), the code, the sample, and the fixed and
    # initial tensors of the recommender (title embeddings in the backbone's dtype, heads) and the head's
    # settings (its dropout and attention heads change no tensor).
    read = {name: tensor for name, tensor in compact_model.state_dict().items()
            if not name.startswith("backbone.")}
    importance_key = {"stage": "importance", "code": code_sha256(), "llm": model.llm_fingerprint,
                      "dtype": str(full.dtype), "sample": sample.sha256(), "tensors": tensors_sha256(read),
                      "head": asdict(compact_model.head_config), **asdict(imp)}

    # The warm-up below trains the heads; every strategy must start RecBole's training from the same
    # heads, so they are put back at the end.
    initial_heads = {name: p.detach().clone() for name, p in compact_model.named_parameters()
                     if not name.startswith("backbone.")}
    needs_importance = explicit is None and strategy not in DATA_FREE_STRATEGIES
    importance, teacher = None, None
    if needs_importance:
        cached = from_main(lambda: cache.load_json("importance", importance_key))
        # One no-grad pass gives the warm-up states and, should importance come from the cache, the
        # teacher that distillation needs; otherwise the importance pass below returns the teacher.
        teacher = _teacher_states(full, inputs, mask, batch_size,
                                  per_layer=cached is not None and dist.distill_layerwise)
        warm_up_heads(compact_model, teacher["last"], sample, imp.importance_warmup_steps,
                      imp.learning_rate * 10)
        broadcast_parameters(compact_model, skip_prefix="backbone.")  # GPU kernels may differ by a bit
        if cached is not None:
            importance = ImportanceResult(**cached)
            logger.info("Reusing layer importance from the stage cache.")
        else:
            def rec_loss(states, rows):
                return nn.functional.cross_entropy(head_scores(compact_model, sample, states, rows),
                                                   sample.targets[rows])

            importance, teacher = compute_importance(
                full, inputs, mask, rec_loss, weights=imp.importance_weights,
                attention_top_k=imp.attention_top_k, batch_size=batch_size)
            if writes:
                cache.save_json("importance", importance_key, importance.to_json())
        if out_dir is not None:
            report = {**importance.to_json(), "settings": importance_key, "sample_users": len(sample.users)}
            write_atomic(out_dir / "importance.json", json.dumps(report, indent=1))
            plot_importance_heatmap(importance, out_dir / "importance.png",
                                    title=f"{model.llm_path} on {config['dataset']}")
        logger.info(f"Fused layer importance (most important first): {importance.ranking}")

    if dist.distill_steps and teacher is None:  # full-model states, taken before any compact model is built
        # Layer-wise distillation needs importance, so this teacher never needs per-layer outputs.
        teacher = _teacher_states(full, inputs, mask, batch_size, per_layer=False)
    selection_key = {**importance_key, "stage": "selection", **asdict(sel)}
    if strategy == "importance" and explicit is None:
        valid_sample = sample_sequences(model, valid_data, sel.selection_sample_users,
                                        imp.importance_max_items, imp.seed + 1, "selection_sample_users")
        selection_key["valid_sample"] = valid_sample.sha256()
        selection = from_main(lambda: cache.load_json("selection", selection_key))
        if selection is None:
            selection = _greedy(compact_model, llm, full, valid_sample, sel, batch_size,
                                importance.ranking).to_json()
            if writes:
                cache.save_json("selection", selection_key, selection)
    else:
        selection = {"selected": select_layers(total, selected_layers=explicit, strategy=strategy,
                                               num_layers=sel.num_layers, seed=imp.seed,
                                               importance=importance),
                     "stop_reason": "given" if explicit is not None else "strategy", "trajectory": []}
    selected = selection["selected"]
    if out_dir is not None:
        write_atomic(out_dir / "selection.json", json.dumps({"strategy": strategy, **selection}, indent=1))
    logger.info(f"Selected layers ({strategy}): {selected} ({selection['stop_reason']})")

    compact = seeded_backbone(llm, selected, imp.seed, dist.mlp_bridges, dist.bridge_rank)
    if dist.distill_steps and any(bridge.kind != "identity" for bridge in compact.bridges):
        distill_key = {**selection_key, "stage": "distill", "selected": selected, **asdict(dist)}
        bridges, report = from_main(lambda: (cache.load_tensors("distill", distill_key),
                                             cache.load_json("distill", distill_key)))
        if bridges is None or report is None:
            if dist.distill_layerwise and importance is None:
                raise LayerSelError(
                    "distill_layerwise=True weights layers by Fisher importance and needs the importance "
                    "pass; use layer_strategy=importance (or block_influence, contiguous, magnitude), or set "
                    "distill_layerwise=False."
                )
            fisher = importance.normalised["fisher"] if dist.distill_layerwise else None
            report = distill_bridges(
                compact, inputs, mask, teacher["last"],
                teacher_per_layer=teacher["per_layer"] if dist.distill_layerwise else None,
                layer_weights={i: fisher[i] for i in selected} if dist.distill_layerwise else None,
                reg_lambda=dist.distill_reg_lambda, steps=dist.distill_steps, lr=dist.distill_lr,
                batch_size=batch_size, seed=imp.seed).to_json()
            if writes:
                cache.save_tensors("distill", distill_key, compact.bridges.state_dict())
                cache.save_json("distill", distill_key, report)
        else:
            compact.bridges.load_state_dict(bridges)
            logger.info("Reusing distilled bridges from the stage cache.")
        if out_dir is not None:
            write_atomic(out_dir / "distillation.json", json.dumps(report, indent=1))
        logger.info(f"Distillation fidelity (held-out): before {report['before']}, after {report['after']}")
    with torch.no_grad():
        for name, parameter in compact_model.named_parameters():
            if name in initial_heads:
                parameter.copy_(initial_heads[name])
    return compact


def _greedy(compact_model, llm, full, sample: SequenceSample, settings: SelectionSettings, batch_size: int,
            ranking: list[int]):
    """Greedy selection with the configured proxy on a validation sample."""
    proxy = settings.selection_proxy
    if proxy not in PROXIES:
        raise LayerSelError(f"selection_proxy={proxy!r}; use one of {PROXIES}.")
    inputs = compact_model.title_inputs[sample.item_seq]
    mask = (sample.item_seq != 0).long()
    full_last = None  # the ndcg proxy needs no full-model states
    if proxy == "fidelity":
        full_last = _last(_final_states(full, inputs, mask, batch_size), sample.lengths)

    @torch.no_grad()
    def evaluate(layers: list[int]) -> float:
        states = _final_states(CompactBackbone(llm, layers), inputs, mask, batch_size)
        if proxy == "fidelity":
            last = _last(states, sample.lengths)
            return float(nn.functional.cosine_similarity(last, full_last, dim=-1).mean())
        return _ndcg_at_10(head_scores(compact_model, sample, states), sample.targets)

    return greedy_select(ranking, evaluate, target_k=settings.num_layers,
                         patience=settings.selection_patience, min_gain=settings.selection_min_gain,
                         max_evaluations=settings.selection_max_evaluations,
                         max_seconds=settings.selection_max_seconds,
                         clock=lambda: main_value(time.perf_counter()))  # one time budget for all
