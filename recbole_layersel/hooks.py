"""Pre-training hooks: importance -> selection -> distillation on the full LLM, before RecBole trains.

``LayerSelLLM.run_hooks`` calls ``run_pretraining_hooks`` with the source model, the settings and the
tensors the stages read (``HookData``: samples of histories, the items' title embeddings, the head's
shape); it gets back the compact backbone to train and the stages' seconds. The recommender itself is not
touched.

1. **importance** (``importance.py``): a fresh recommendation head warms up on the full model's states
   of a seeded sample of training histories, so the loss whose Fisher information is measured is a
   recommender's; then every layer is scored on that sample;
2. **selection** (``selection.py``): the greedy search over layer sets, scored by a proxy of
   ``proxy.py`` (validation NDCG@10 of the candidate's text prior, or after a short adaptation), or a
   baseline strategy, or the config's own ``selected_layers``;
3. **distillation** (``distill.py``): the bridges of the compact model learn to reproduce the full
   model's states at the compact model's depth (after its deepest kept layer and the final norm) on the
   sample.

A stage is skipped when the config gives its result (``selected_layers`` or a data-free strategy skips
1 and 2; ``distill_steps: 0`` skips 3) and is cached under ``<llm_cache_dir>/stages/``,
keyed by model, dataset, data samples and settings, so a rerun or a second variant reuses it. Under a
process group the importance and distillation passes share their batches out; the greedy search runs
in the first process and the others take its result.

Artifacts (``out_dir``, next to RecBole's log): importance.json, importance.png, selection.json,
distillation.json.
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from recbole_layersel.backbone import CompactBackbone, seeded_backbone
from recbole_layersel.compact import CompactRecommender, HeadConfig
from recbole_layersel.distill import distill_bridges
from recbole_layersel.distributed import (
    all_reduce_sum,
    broadcast_parameters,
    from_main,
    is_main,
    my_batches,
    rank_and_world,
)
from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import StageCache, StageSettings, code_sha256, tensors_sha256, write_atomic
from recbole_layersel.importance import ImportanceResult, compute_importance, plot_importance_heatmap
from recbole_layersel.proxy import (
    AdaptedNDCG,
    AdaptSettings,
    ContentNDCG,
    ProxyData,
    adapt,
    sample_loss,
)
from recbole_layersel.samples import SequenceSample
from recbole_layersel.selection import (
    DATA_FREE_STRATEGIES,
    IMPORTANCE_STRATEGIES,
    greedy_select,
    select_layers,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportanceSettings(StageSettings):
    seed: int
    learning_rate: float  # the head warms up at ten times the training rate
    importance_sample_users: int
    importance_max_items: int
    importance_batch_size: int
    importance_warmup_steps: int
    importance_group_weights: dict | None
    attention_top_k: int
    llm_quantization: str | None


@dataclass(frozen=True)
class SelectionSettings(StageSettings):
    layer_strategy: str
    selected_layers: list | None
    num_layers: int
    selection_proxy: str
    selection_train_users: int
    selection_sample_users: int
    selection_adapt_steps: int
    selection_batch_size: int
    selection_candidates: int
    selection_beam_width: int
    selection_patience: int | None
    selection_min_gain: float
    selection_max_evaluations: int | None
    selection_max_seconds: float | None

    def searches(self) -> bool:
        return self.selected_layers is None and self.layer_strategy == "importance"


@dataclass(frozen=True)
class DistillSettings(StageSettings):
    distill_steps: int
    distill_lr: float
    distill_reg_lambda: float
    distill_layerwise: bool
    mlp_bridges: bool
    bridge_rank: int | None


@dataclass(frozen=True)
class HookSettings:
    importance: ImportanceSettings
    selection: SelectionSettings
    distill: DistillSettings

    @classmethod
    def from_config(cls, config) -> "HookSettings":
        return cls(ImportanceSettings.from_config(config), SelectionSettings.from_config(config),
                   DistillSettings.from_config(config))

    def needs_importance(self) -> bool:
        selection = self.selection
        return selection.selected_layers is None and selection.layer_strategy not in DATA_FREE_STRATEGIES


@dataclass
class HookData:
    """What the stages read, prepared by ``LayerSelLLM`` from RecBole's loaders."""

    sample: SequenceSample  # training histories: importance and distillation
    title_inputs: torch.Tensor  # (n_items, H): each item's input to the backbone (row 0 padding)
    title_prior: torch.Tensor  # (n_items, H): the items' text prior of no layer, read by the warm-up head
    head: HeadConfig
    identity: dict  # what names the model, dataset and titles in every cache key
    proxy: ProxyData | None = field(default=None)  # the greedy search's samples, when it runs

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample's backbone inputs (N, T, H) and attention mask (N, T)."""
        return self.title_inputs[self.sample.item_seq], self.sample.mask()


def run_pretraining_hooks(llm, data: HookData, settings: HookSettings, cache: StageCache,
                          out_dir: Path | None) -> tuple[CompactBackbone, dict[str, float]]:
    """Importance, selection and distillation on ``llm`` (the loaded source model); returns the compact
    backbone to train and each stage's seconds (a stage read from the cache counts its reading)."""
    full = CompactBackbone(llm, list(range(llm.config.num_hidden_layers))).requires_grad_(False)
    world = rank_and_world()[1]
    if world > 1:
        logger.info(f"Pre-training hooks run data-parallel over {world} processes.")
    out_dir = out_dir if is_main() else None
    key = {"stage": "importance", "code": code_sha256(), **data.identity, "dtype": str(full.dtype),
           "sample": data.sample.sha256(), "head": asdict(data.head), **asdict(settings.importance),
           "tensors": tensors_sha256({"title_inputs": data.title_inputs, "title_prior": data.title_prior})}
    importance, teacher = None, None
    started = time.perf_counter()
    if settings.needs_importance():
        importance, teacher = _importance(full, data, settings.importance, cache, key, out_dir)
    seconds = {"importance": time.perf_counter() - started}
    key = {**key, "stage": "selection", **asdict(settings.selection)}
    if settings.selection.searches():
        key["proxy_samples"] = [sample.sha256() for sample in (data.proxy.train, data.proxy.valid) if sample]
    selection = _selection(llm, data, settings, importance, cache, key)
    seconds["selection"] = time.perf_counter() - started - seconds["importance"]
    selected = selection["selected"]
    if out_dir is not None:
        write_atomic(out_dir / "selection.json", json.dumps(selection, indent=1))
    logger.info(f"Selected layers ({selection['strategy']}): {selected} ({selection['stop_reason']})")

    dist = settings.distill
    compact = seeded_backbone(llm, selected, settings.importance.seed, dist.mlp_bridges, dist.bridge_rank)
    if dist.distill_steps and any(bridge.kind != "identity" for bridge in compact.bridges):
        key = {**key, "stage": "distill", "selected": selected, **asdict(dist)}
        _distill(compact, llm, data, settings, importance, teacher, cache, key, out_dir)
    seconds["distillation"] = time.perf_counter() - started - seconds["importance"] - seconds["selection"]
    logger.info("Pre-training hooks took " + ", ".join(f"{stage} {s:.1f} s" for stage, s in seconds.items())
                + " (stage cache hits included)")
    return compact, seconds


def _importance(full: CompactBackbone, data: HookData, settings: ImportanceSettings, cache: StageCache,
                key: dict, out_dir: Path | None) -> tuple[ImportanceResult, dict | None]:
    """The importance of every layer (and the full model's states, when computed now rather than read
    from the cache)."""
    cached = from_main(lambda: cache.load_json("importance", key))
    teacher = None
    if cached is not None:
        importance = ImportanceResult(**cached)
        logger.info("Reusing layer importance from the stage cache.")
    else:
        def make_loss(full_states: torch.Tensor):
            head = _warmed_up_head(full, full_states, data, settings)
            return lambda states, rows: sample_loss(head, data.sample, states, rows)

        importance, teacher = compute_importance(
            full, *data.inputs(), make_loss, group_weights=settings.importance_group_weights,
            attention_top_k=settings.attention_top_k, batch_size=settings.importance_batch_size)
        if is_main():
            cache.save_json("importance", key, importance.to_json())
    if out_dir is not None:
        report = {**importance.to_json(), "settings": key, "sample_users": len(data.sample)}
        write_atomic(out_dir / "importance.json", json.dumps(report, indent=1))
        plot_importance_heatmap(importance, out_dir / "importance.png",
                                title=f"{Path(key['llm']['path']).name} on {key['dataset']}")
    logger.info(f"Fused layer importance (most important first): {importance.ranking}")
    return importance, teacher


def _warmed_up_head(full: CompactBackbone, full_states: torch.Tensor, data: HookData,
                    settings: ImportanceSettings) -> CompactRecommender:
    """A fresh head (seeded) trained on the full model's states of the sample (``full_states``), so that
    the importance loss is a recommender's loss, not a random head's; returned in eval mode (no
    dropout)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        head = CompactRecommender(full, data.title_inputs, data.title_prior, data.head)
        states = full_states.to(data.title_inputs.device)
        warm_up = AdaptSettings(settings.importance_warmup_steps, settings.learning_rate * 10,
                                settings.importance_batch_size, settings.seed)
        adapt(head, data.sample, states, warm_up)
    broadcast_parameters(head, skip_prefix="backbone.")  # GPU kernels may differ by a bit between processes
    return head


def _selection(llm, data: HookData, settings: HookSettings, importance: ImportanceResult | None,
               cache: StageCache, key: dict) -> dict:
    sel = settings.selection
    if not sel.searches():
        layers = select_layers(llm.config.num_hidden_layers, selected_layers=sel.selected_layers,
                               strategy=sel.layer_strategy, num_layers=sel.num_layers,
                               seed=settings.importance.seed, importance=importance)
        reason = "given" if sel.selected_layers is not None else "strategy"
        return {"strategy": sel.layer_strategy, "selected": layers, "stop_reason": reason, "trajectory": []}

    def search() -> dict:
        cached = cache.load_json("selection", key)
        if cached is not None:
            logger.info("Reusing the greedy selection from the stage cache.")
            return cached
        proxy = build_proxy(sel.selection_proxy, llm, data.proxy, settings)

        def evaluate(layers: list[int]) -> float:
            score = proxy(layers)
            logger.info(f"Greedy proxy ({sel.selection_proxy}) {layers}: valid NDCG@10 {score:.4f}")
            return score

        result = greedy_select(
            importance.ranking, evaluate, target_k=sel.num_layers, candidates=sel.selection_candidates,
            beam_width=sel.selection_beam_width, patience=sel.selection_patience,
            min_gain=sel.selection_min_gain, max_evaluations=sel.selection_max_evaluations,
            max_seconds=sel.selection_max_seconds, on_beam=data.proxy.priors.retain)
        selection = {"strategy": "importance", **result.to_json()}
        cache.save_json("selection", key, selection)
        return selection

    # One process searches (the proxy's encodings and adaptation are not shared out); the others take its
    # result, so every process keeps the same layers.
    return from_main(search)


def build_proxy(name: str, llm, data: ProxyData, settings: HookSettings):
    """The greedy search's proxy ``name`` (``proxy.PROXIES``) as the search builds it from ``settings``."""
    sel, dist = settings.selection, settings.distill
    if name == "content":
        return ContentNDCG(data)
    adapt_settings = AdaptSettings(sel.selection_adapt_steps, settings.importance.learning_rate * 10,
                                   sel.selection_batch_size, settings.importance.seed)
    return AdaptedNDCG(llm, data, adapt_settings, mlp_bridges=dist.mlp_bridges, bridge_rank=dist.bridge_rank)


def _distill(compact: CompactBackbone, llm, data: HookData, settings: HookSettings,
             importance: ImportanceResult | None, teacher: dict | None, cache: StageCache, key: dict,
             out_dir: Path | None) -> None:
    """Train ``compact``'s bridges to reproduce the full model's states at its depth (``_states_at_depth``;
    from the cache when it can)."""
    dist = settings.distill
    bridges, report = from_main(lambda: (cache.load_tensors("distill", key), cache.load_json("distill", key)))
    if bridges is not None and report is not None:
        compact.bridges.load_state_dict(bridges)
        logger.info("Reusing distilled bridges from the stage cache.")
    else:
        if dist.distill_layerwise and importance is None:
            raise LayerSelError(
                "distill_layerwise=True weights layers by Fisher importance and needs the importance "
                "pass, which runs only when layer_strategy scores layers "
                f"({', '.join(IMPORTANCE_STRATEGIES)}) and selected_layers is ~; choose so, or set "
                "distill_layerwise=False."
            )
        inputs, mask = data.inputs()
        batch_size = settings.importance.importance_batch_size
        if teacher is None and dist.distill_layerwise:  # importance from the cache: the full model again
            full = CompactBackbone(llm, list(range(compact.num_source_layers)))
            teacher = {"per_layer": _layer_outputs(full, inputs, mask, batch_size)}
        if teacher is None:  # the full model up to the deepest kept layer; its final states are the target
            truncated = CompactBackbone(llm, list(range(compact.selected_layers[-1] + 1)))
            target = _final_states(truncated, inputs, mask, batch_size)
        else:
            target = _states_at_depth(compact, teacher["per_layer"])
        fisher = importance.normalised["fisher"] if dist.distill_layerwise else None
        report = distill_bridges(
            compact, inputs, mask, target,
            teacher_per_layer=teacher["per_layer"] if dist.distill_layerwise else None,
            layer_weights={i: fisher[i] for i in compact.selected_layers} if dist.distill_layerwise else None,
            reg_lambda=dist.distill_reg_lambda, steps=dist.distill_steps, lr=dist.distill_lr,
            batch_size=settings.importance.importance_batch_size, seed=settings.importance.seed).to_json()
        if is_main():
            cache.save_tensors("distill", key, compact.bridges.state_dict())
            cache.save_json("distill", key, report)
    if out_dir is not None:
        write_atomic(out_dir / "distillation.json", json.dumps(report, indent=1))
    logger.info(f"Distillation fidelity (held-out): before {report['before']}, after {report['after']}")


@torch.no_grad()
def _states_at_depth(compact: CompactBackbone, per_layer: torch.Tensor) -> torch.Tensor:
    """The full model's states after the compact model's deepest kept layer and the final norm (N, T, H),
    from the full model's per-layer outputs: what the bridges are distilled towards. The layers above it
    are not in the compact model, so it cannot reproduce their output, and pulling its bridges towards it
    would make them stand in for those layers instead of the skipped ones."""
    device = next(compact.parameters()).device
    deepest = per_layer[compact.selected_layers[-1]]
    return compact.norm(deepest.to(device, compact.dtype)).float().to(deepest.device)


@torch.no_grad()
def _final_states(backbone: CompactBackbone, inputs, mask, batch_size: int) -> torch.Tensor:
    """The backbone's final states (N, T, H); data-parallel over a process group."""
    backbone.eval()
    states = torch.zeros(*inputs.shape[:2], backbone.config.hidden_size, device=inputs.device)
    for start, stop in my_batches(len(inputs), batch_size):
        states[start:stop] = backbone(inputs[start:stop], mask[start:stop]).float()
    return all_reduce_sum(states)


@torch.no_grad()
def _layer_outputs(backbone: CompactBackbone, inputs, mask, batch_size: int) -> torch.Tensor:
    """Every layer's output (L, N, T, H), as ``compute_importance`` returns them; data-parallel over a
    process group."""
    backbone.eval()
    outputs = torch.zeros(len(backbone.layers), *inputs.shape[:2], backbone.config.hidden_size,
                          device=inputs.device)
    for start, stop in my_batches(len(inputs), batch_size):
        outputs[:, start:stop] = torch.stack(backbone(inputs[start:stop], mask[start:stop],
                                                      output_hidden_states=True)[1]).float()
    return all_reduce_sum(outputs)


def artifacts_dir(config) -> Path | None:
    """``artifacts_dir`` from the config, else a folder named after RecBole's log file, beside it."""
    if config["artifacts_dir"]:
        return Path(config["artifacts_dir"])
    for handler in logging.getLogger().handlers:
        # pytest's logging plugin adds a FileHandler on os.devnull when no log file is configured.
        if isinstance(handler, logging.FileHandler) and handler.baseFilename != os.devnull:
            return Path(handler.baseFilename).with_suffix("")
    return None
