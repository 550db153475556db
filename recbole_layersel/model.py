"""
LayerSelLLM
################################################

A sequential recommender whose sequence model is a compact transformer made of k selected layers of
a pretrained LLM (e.g. 8 of SmolLM2's 30), joined by bridge adapters where kept layers are not adjacent,
under a trainable SASRec head (``compact.py``): item vectors are a learnt ID embedding plus the item's
title representation (its title's tokens through the kept layers, encoded once, ``titles.py``); the
head reads them with the kept layers' states of the history and scores every item against the same item
vectors. The layers kept are thus both the item encoder and the sequence backbone.

Training follows SASRec's paper: one causal pass per window of ``MAX_ITEM_LIST_LENGTH`` items, cross-entropy
over all items at every position (``all_positions.py``), so every training target RecBole's prefix rows
hold is trained on once an epoch (``window_stride`` makes windows overlap, each training its new targets).

The backbone's inputs are fixed (title embeddings), so with ``train_mode: frozen`` its states are computed
once per history and reused by every epoch: causal attention makes the state after t items the same
whichever longer history it is read from, so one pass serves a window and every prefix of it. Only the
head trains, at SASRec's cost. ``train_mode: lora`` also trains LoRA adapters (peft) on the kept layers
and the bridges, re-running the backbone on every batch (the full-quality path, for GPUs).

Reference:
    Xin Men et al. "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect." 2024.
    Andrey Gromov et al. "The Unreasonable Ineffectiveness of the Deeper Layers." ICLR 2025.
    Wang-Cheng Kang and Julian McAuley. "Self-Attentive Sequential Recommendation." ICDM 2018.
"""

import hashlib
import logging
import warnings
from dataclasses import asdict
from functools import partial
from itertools import pairwise
from pathlib import Path

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn
from tqdm import tqdm

from recbole_layersel.all_positions import all_position_loss, position_targets, window_stride
from recbole_layersel.backbone import CompactBackbone, is_causal, position_limit, seeded_backbone
from recbole_layersel.compact import DTYPES, CompactRecommender, HeadConfig, add_lora
from recbole_layersel.distributed import all_reduce_sum, broadcast_parameters, rank_and_world
from recbole_layersel.errors import LayerSelError
from recbole_layersel.export import export_compact
from recbole_layersel.files import StageCache, code_sha256
from recbole_layersel.hooks import HookData, HookSettings, artifacts_dir, run_pretraining_hooks
from recbole_layersel.llm import default_cache_dir, load_llm, resolve_llm
from recbole_layersel.proxy import PROXIES, ProxyData
from recbole_layersel.samples import sample_sequences
from recbole_layersel.selection import DATA_FREE_STRATEGIES, check_strategy, select_layers
from recbole_layersel.titles import (
    TITLE_CODE,
    TitlePriors,
    TitleSettings,
    backbone_fingerprint,
    cached_title_embeddings,
    encode_titles,
    item_titles,
)

logger = logging.getLogger(__name__)
TRAIN_MODES = ("frozen", "lora")
# Settings of earlier versions -> what replaced them; RecBole would silently ignore them otherwise.
REPLACED_SETTINGS = {
    "importance_weights": "importance_group_weights (one weight per group of correlated criteria: fisher, "
                          "change, activations, output_rank, attention)",
}


# Sizes and counts that must be whole numbers >= 1, and step counts that may be 0.
POSITIVE_SETTINGS = ("importance_sample_users", "importance_max_items", "selection_sample_users",
                     "selection_train_users", "selection_batch_size", "selection_candidates",
                     "selection_beam_width", "title_max_tokens", "title_batch_size", "state_batch_size",
                     "embedding_size", "head_layers", "head_heads", "head_inner_size", "lora_r")
STEP_SETTINGS = ("importance_warmup_steps", "selection_adapt_steps", "distill_steps")
# Real-valued settings: what a valid value is, and how the error says it.
NUMBER_SETTINGS = {
    "learning_rate": (lambda v: v > 0, "a number > 0, e.g. 0.001"),
    "distill_lr": (lambda v: v > 0, "a number > 0, e.g. 0.001"),
    "distill_reg_lambda": (lambda v: v >= 0, "a number >= 0 (0: no pull towards the identity)"),
    "selection_min_gain": (lambda v: v >= 0, "a number >= 0 (0.01 = 1 %)"),
    "selection_cache_gib": (lambda v: v >= 0, "a number of GiB >= 0, e.g. 8 (0: only the latest states)"),
    "head_dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
    "content_scale": (lambda v: v > 0,
                      "a number > 0 (1: unscaled), or ~ for H^-1/4 (H: the LLM's hidden size)"),
}
# Real-valued settings whose ~ means a default worked out later.
OPTIONAL_NUMBER_SETTINGS = ("content_scale",)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(config) -> None:
    """One clear error for a setting LayerSelLLM cannot use, before anything is loaded."""
    for setting, replacement in REPLACED_SETTINGS.items():
        if config[setting] is not None:
            raise LayerSelError(f"{setting}={config[setting]!r} is no longer a setting; use {replacement}.")
    for setting, allowed in (("selection_proxy", PROXIES), ("train_mode", TRAIN_MODES), ("llm_dtype", DTYPES),
                             ("loss_type", ("CE",))):
        if config[setting] not in allowed:
            raise LayerSelError(f"{setting}={config[setting]!r}; use one of {tuple(allowed)}.")
    for setting in (*POSITIVE_SETTINGS, *STEP_SETTINGS):
        least = 1 if setting in POSITIVE_SETTINGS else 0
        if not _is_int(config[setting]) or config[setting] < least:
            raise LayerSelError(f"{setting}={config[setting]!r}; use a whole number >= {least}.")
    for setting, (valid, wanted) in NUMBER_SETTINGS.items():
        value = config[setting]
        if value is None and setting in OPTIONAL_NUMBER_SETTINGS:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not valid(value):
            raise LayerSelError(f"{setting}={value!r}; use {wanted}.")
    if config["embedding_size"] % config["head_heads"]:
        raise LayerSelError(f"embedding_size={config['embedding_size']} is not a multiple of "
                            f"head_heads={config['head_heads']}; each attention head reads an equal share.")
    lists = (("selected_layers", _is_int, [0, 1, 7]),
             ("lora_target_modules", lambda v: isinstance(v, str), ["q_proj", "v_proj"]))
    for setting, kind, example in lists:
        value = config[setting]
        if value is not None and not (isinstance(value, list) and all(kind(v) for v in value)):
            raise LayerSelError(f"{setting}={value!r}; give a list, e.g. `{setting}: {example}` in yaml or "
                                f"--{setting}=\"{example}\" on the command line, or ~ for the default.")
    if config["quantize"] is not None:
        check_int8(config["quantize"], config["train_mode"], config["device"], config["llm_dtype"])
    if config["llm_quantization"] and config["selected_layers"] is None \
            and config["layer_strategy"] not in DATA_FREE_STRATEGIES:
        raise LayerSelError(
            f"layer_strategy={config['layer_strategy']!r} scores layers by gradients and weights, "
            f"which llm_quantization={config['llm_quantization']!r} stores as integers. Choose the "
            "layers without quantization (hooks_only=True), then pass them as selected_layers; or "
            f"use a data-free strategy ({', '.join(DATA_FREE_STRATEGIES)})."
        )


def check_int8(quantize, train_mode: str, device, llm_dtype: str) -> None:
    if quantize != "int8":
        raise LayerSelError(f"quantize={quantize!r}; use int8 (torch dynamic quantisation) or ~ for none.")
    if train_mode != "frozen" or torch.device(device).type != "cpu" or llm_dtype != "float32":
        raise LayerSelError(
            "quantize=int8 runs torch's dynamic quantisation, which has CPU float32 kernels and no "
            f"gradients: it needs train_mode=frozen, device cpu and llm_dtype=float32, not "
            f"train_mode={train_mode!r}, device {device}, llm_dtype={llm_dtype!r}. "
            "Use use_gpu=False train_mode=frozen, or drop quantize."
        )


def quantize_int8(backbone: CompactBackbone) -> CompactBackbone:
    """The backbone with every ``nn.Linear`` (layer projections, bridges) replaced by torch's dynamic
    int8 version: weights stored in int8, activations quantised on the fly per batch."""
    with warnings.catch_warnings():
        # torch >= 2.10 deprecates eager-mode quantisation in favour of torchao; the issue asks for
        # torch's own dynamic quantisation as the compression baseline, so it is used knowingly.
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(backbone, {nn.Linear}, dtype=torch.qint8)


def _on_device(llm, device):
    """``llm`` on ``device``; bitsandbytes models are already there and refuse ``.to``."""
    return llm if getattr(llm, "is_quantized", False) else llm.to(device)


def llm_fingerprint(path: Path) -> dict:
    """What identifies a local model's weights for caches: its path and each file's size and mtime."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"path": str(path), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


class LayerSelLLM(SequentialRecommender):
    r"""Compact selected-layer LLM as a RecBole sequential recommender (see the module docstring)."""

    needs_titles = True  # quick_start checks the dataset's title field before anything is written
    trains_all_positions = True  # quick_start trains it on ``all_positions.windowed`` rows

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        check_settings(config)
        self.window_stride = window_stride(config)
        self.train_mode = config["train_mode"]
        self.quantize, self.quantized, self._warned_int8_export = config["quantize"], False, False

        cache_dir = Path(config["llm_cache_dir"] or default_cache_dir()).expanduser()
        llm_path = resolve_llm(config["llm_path"], cache_dir)
        device = config["device"]
        # Loaded on the CPU (bitsandbytes loads straight onto the GPU). The whole model goes to the
        # device only for the hooks: otherwise just the token embeddings (to encode titles) and the
        # kept layers do, and the others are never materialised there.
        llm, tokenizer = load_llm(str(llm_path), dtype=DTYPES[config["llm_dtype"]],
                                  quantization=config["llm_quantization"], device=device)
        self._check_backbone_fits(llm.config, config["llm_path"], config["title_max_tokens"])
        self.config, self.cache_dir, self.llm_path = config, cache_dir, config["llm_path"]
        self.llm_fingerprint = llm_fingerprint(llm_path)
        self.item_tokens = dataset.field2id_token[self.ITEM_ID].tolist()  # internal id -> dataset item id
        self.item_title_texts = item_titles(dataset, config["title_field"])
        self.titles_sha256 = hashlib.sha256("\n".join(self.item_title_texts).encode()).hexdigest()
        # Popularity (training targets per item: every position of the training windows) answers users
        # with no history; histories are filled by `before_training` from the loaders, so an export can
        # recommend for a dataset's user id.
        rows = dataset.inter_feat
        targets, trained = position_targets(rows[self.ITEM_SEQ], rows[self.ITEM_SEQ_LEN], rows[self.ITEM_ID],
                                            self.window_stride)
        self.item_counts = torch.bincount(targets[trained], minlength=self.n_items).tolist()
        self.user_histories: dict[str, list[str]] = {}
        self.hook_seconds: dict[str, float] = {}  # stage -> seconds, once the hooks have run (leaderboards)
        self.lora_settings = {"r": config["lora_r"], "alpha": config["lora_alpha"],
                              "dropout": config["lora_dropout"], "targets": config["lora_target_modules"]}

        chosen = self._data_free_layers(llm.config.num_hidden_layers)
        # Distillation trains the bridges between kept layers that are not adjacent; adjacent ones have none,
        # and then the whole model is never needed (nor moved to the device).
        hooks_needed = chosen is None or bool(
            config["distill_steps"] and any(later - earlier > 1 for earlier, later in pairwise(chosen)))
        if hooks_needed:
            # Importance, selection and distillation read the full model: keep every layer (and the
            # source model, outside the module tree) until `before_training` has chosen.
            # Until then the item vectors read the prior of no layer (token embeddings), which costs
            # no pass of the full model over every title.
            llm = _on_device(llm, device)
            backbone = CompactBackbone(llm, list(range(llm.config.num_hidden_layers))).requires_grad_(False)
            encoded = self._encode_titles(CompactBackbone(llm, []), llm.get_input_embeddings(), tokenizer)
            self._source_llm = (llm, tokenizer)
        else:
            backbone = seeded_backbone(llm, chosen, config["seed"], config["mlp_bridges"],
                                       config["bridge_rank"]).to(device)
            how = "selected_layers" if config["selected_layers"] is not None else \
                f"layer_strategy {config['layer_strategy']}"
            logger.info(f"Compact backbone: layers {chosen} of {llm.config.num_hidden_layers} ({how}, "
                        "no hooks needed)")
            encoded = self._encode_titles(backbone, llm.get_input_embeddings().to(device), tokenizer)
            self._source_llm = ()
        del llm  # without hooks, the unselected layers, token embeddings and any head are freed here
        self.compact = CompactRecommender(backbone, encoded["inputs"], encoded["prior"],
                                          HeadConfig.from_config(config, backbone.config.hidden_size)
                                          ).to(config["device"])
        if not hooks_needed:
            self._prepare_backbone_for_training()
        self.state_batch_size = config["state_batch_size"]
        # user -> [(a history read, its backbone states (length, H)), ...]; a row reuses states only
        # when its own history is a prefix of one read, so another history of a known user is computed.
        self.frozen_states: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _data_free_layers(self, num_source_layers: int) -> list[int] | None:
        """The layers to keep when no data is needed to choose them (``selected_layers`` or a data-free
        strategy), else None: the hooks choose them in ``before_training``."""
        config, explicit = self.config, self.config["selected_layers"]
        if config["num_layers"] == "all":  # every layer, however many this model has
            config["num_layers"] = num_source_layers
        if explicit is None:
            check_strategy(config["layer_strategy"], config["num_layers"], num_source_layers)
            if config["layer_strategy"] not in DATA_FREE_STRATEGIES:
                return None
        return select_layers(num_source_layers, selected_layers=explicit, seed=config["seed"],
                             strategy=config["layer_strategy"], num_layers=config["num_layers"])

    def _check_backbone_fits(self, llm_config, llm_path: str, title_max_tokens: int) -> None:
        if not is_causal(llm_config):
            raise LayerSelError(
                f"llm_path={llm_path!r} is a bidirectional encoder ({llm_config.model_type}): the state at "
                "position t would read the items that follow, which the loss at every position predicts. "
                "Use a causal model (Llama, Qwen, Gemma, GPT-2)."
            )
        limit = position_limit(llm_config)
        lengths = {"MAX_ITEM_LIST_LENGTH": self.max_seq_length, "title_max_tokens": title_max_tokens}
        for key, length in lengths.items():  # histories and titles both run through the layers
            if limit is not None and length > limit:
                raise LayerSelError(
                    f"{key}={length}, but llm_path={llm_path!r} ({llm_config.model_type}) has learned "
                    f"position embeddings for at most {limit} positions. Set {key} to at most {limit}, or "
                    "use a model with rotary positions (Llama, Qwen, Gemma)."
                )

    def _encode_titles(self, backbone: CompactBackbone, embed_tokens: nn.Embedding,
                       tokenizer) -> dict[str, torch.Tensor]:
        """The titles' inputs and their prior through ``backbone`` (``titles.py``), from the cache when
        this model, backbone, dataset and title settings encoded them before."""
        settings = TitleSettings.from_config(self.config)
        key = {"llm": self.llm_fingerprint, **backbone_fingerprint(backbone), "code": code_sha256(TITLE_CODE),
               "dataset": self.config["dataset"], "titles_sha256": self.titles_sha256, **asdict(settings)}
        return cached_title_embeddings(self.cache_dir, key, partial(
            encode_titles, backbone, embed_tokens, tokenizer, self.item_title_texts, settings,
            batch_size=self.config["title_batch_size"], show_progress=self.config["show_progress"]))

    def export_beside_checkpoint(self, checkpoint_file: str) -> None:
        """RecBole's checkpoints are pickles; this writes the same weights beside one as a pickle-free
        export (``<checkpoint>.layersel/``), which ``recommend`` loads safely."""
        if self.quantized:
            if not self._warned_int8_export:
                logger.warning("quantize=int8: no pickle-free export beside the checkpoints (int8 layers "
                               "hold packed weights, not tensors); the RecBole checkpoint is the only copy.")
                self._warned_int8_export = True
            return
        export_compact(self, Path(checkpoint_file).with_suffix(".layersel"))

    def drop_cached_states(self) -> None:
        """Forget the frozen states, so that the next scoring runs the backbone (inference timing)."""
        self.frozen_states.clear()

    @property
    def selected_layers(self) -> list[int]:
        return self.compact.backbone.selected_layers

    def _prepare_backbone_for_training(self) -> None:
        backbone = self.compact.backbone
        if self.train_mode == "lora":
            add_lora(backbone, **self.lora_settings)
        else:
            backbone.requires_grad_(False)

    def run_hooks(self, train_data, valid_data) -> None:
        """The pre-training hooks (``hooks.py``), while the full model is still here; then the compact
        backbone is made ready to train (and quantised, with ``quantize: int8``). Runs once."""
        # Under DDP the heads were initialised with a different seed in every process: take rank 0's.
        broadcast_parameters(self.compact, skip_prefix="backbone.")
        if self._source_llm:
            llm, tokenizer = self._source_llm
            settings = HookSettings.from_config(self.config)
            data = self._hook_data(train_data, valid_data, settings, llm, tokenizer)
            cache, out_dir = StageCache(self.cache_dir), artifacts_dir(self.config)
            backbone, self.hook_seconds = run_pretraining_hooks(llm, data, settings, cache, out_dir)
            backbone = backbone.to(self.device)
            self.compact.backbone = backbone
            encoded = self._encode_titles(backbone, llm.get_input_embeddings(), tokenizer)
            self.compact.set_title_prior(encoded["prior"])
            self._source_llm = ()  # frees the source model and every unselected layer
            self._prepare_backbone_for_training()
            total = self.compact.backbone.num_source_layers
            logger.info(f"Compact backbone: layers {self.selected_layers} of {total}")
        if self.quantize and not self.quantized:
            self.compact.backbone = quantize_int8(self.compact.backbone)
            self.quantized = True

    def _hook_data(self, train_data, valid_data, settings: HookSettings, llm, tokenizer) -> HookData:
        """The seeded samples of histories and the items' title embeddings the hooks read."""
        imp, sel = settings.importance, settings.selection
        fields = {"user": self.USER_ID, "item": self.ITEM_ID, "item_seq": self.ITEM_SEQ,
                  "item_seq_len": self.ITEM_SEQ_LEN}

        def sample(loader, size, seed, setting):
            drawn = sample_sequences(loader, fields, size, imp.importance_max_items, seed, setting)
            return drawn.to(self.device)

        compact = self.compact
        data = HookData(sample(train_data, imp.importance_sample_users, imp.seed, "importance_sample_users"),
                        compact.title_inputs, compact.title_prior, compact.head_config,
                        {"llm": self.llm_fingerprint, "dataset": self.config["dataset"],
                         "titles_sha256": self.titles_sha256})
        if sel.searches():
            title_settings = TitleSettings.from_config(self.config)
            priors = TitlePriors(llm, tokenizer, self.item_title_texts, title_settings,
                                 batch_size=self.config["title_batch_size"],
                                 cache_bytes=int(self.config["selection_cache_gib"] * 2**30))
            adapts = sel.selection_proxy == "adapted"
            data.proxy = ProxyData(
                sample(train_data, sel.selection_train_users, imp.seed + 2, "selection_train_users") if adapts
                else None,
                sample(valid_data, sel.selection_sample_users, imp.seed + 1, "selection_sample_users"),
                compact.title_inputs, priors, compact.head_config)
        return data

    def before_training(self, train_data, *eval_data) -> None:
        """`run_hooks`; then, in frozen mode, one backbone pass per history that no other history of the
        same user extends, over every row of the loaders (training windows, validation and test)."""
        self.run_hooks(train_data, eval_data[0] if eval_data else train_data)
        histories: dict[int, list[torch.Tensor]] = {}  # user -> the histories of its rows
        longest: dict[int, tuple[torch.Tensor, int]] = {}  # user -> (its longest history, next item)
        for loader in (train_data, *eval_data):
            rows = loader._dataset.inter_feat
            columns = (rows[self.USER_ID].tolist(), rows[self.ITEM_SEQ_LEN].tolist(), rows[self.ITEM_SEQ],
                       rows[self.ITEM_ID].tolist())
            for user, length, seq, target in zip(*columns, strict=True):
                histories.setdefault(user, []).append(seq[:length])
                if length > len(longest.get(user, ((),))[0]):
                    longest[user] = (seq[:length], target)
        user_tokens = train_data._dataset.field2id_token[self.USER_ID]
        self.user_histories = {str(user_tokens[user]): [self.item_tokens[i] for i in [*seq.tolist(), target]]
                               for user, (seq, target) in longest.items()}
        if self.train_mode != "frozen":
            return
        users, reads = [], []
        for user, seqs in histories.items():
            for seq in _not_prefixes(seqs):
                users.append(user)
                reads.append(seq)
        self._compute_frozen_states(users, reads, data_parallel=True)

    @torch.no_grad()
    def _compute_frozen_states(self, users: list[int], histories: list[torch.Tensor],
                               data_parallel: bool = False) -> list[torch.Tensor]:
        """Backbone states (length, H) of every position of each history: returned, and kept per user
        with the history they were computed from. With ``data_parallel`` (called by every process at
        once) each process runs its share of the batches and an all-reduce gives all of them every state;
        scoring calls it per process, for the rows it is missing."""
        was_training = self.compact.training
        self.compact.eval()
        lengths = [len(history) for history in histories]
        ends = torch.tensor(lengths).cumsum(0).tolist()
        states = torch.zeros(ends[-1], self.compact.backbone.config.hidden_size,
                             dtype=self.compact.title_inputs.dtype, device=self.device)
        order = sorted(range(len(histories)), key=lambda i: -lengths[i])  # similar lengths share a batch
        batches = [order[i:i + self.state_batch_size] for i in range(0, len(order), self.state_batch_size)]
        rank, world = rank_and_world() if data_parallel else (0, 1)
        mine = batches[rank::world]
        show = self.config["show_progress"] and len(mine) >= 4
        for batch in tqdm(mine, desc="frozen backbone states", unit="batch", disable=not show):
            item_seq = nn.utils.rnn.pad_sequence([histories[i] for i in batch], batch_first=True)
            batch_states = self.compact.backbone_states(item_seq.to(self.device))
            for row, index in enumerate(batch):
                states[ends[index] - lengths[index]:ends[index]] = batch_states[row, :lengths[index]]
        if data_parallel:
            states = all_reduce_sum(states)
        per_history = [states[end - length:end] for end, length in zip(ends, lengths, strict=True)]
        for user, history, history_states in zip(users, histories, per_history, strict=True):
            self.frozen_states.setdefault(user, []).append((history.to(self.device), history_states))
        self.compact.train(was_training)
        return per_history

    def _cached_states(self, user: int, history: torch.Tensor) -> torch.Tensor | None:
        for known, states in self.frozen_states.get(user, ()):
            if len(known) >= len(history) and torch.equal(known[:len(history)], history):
                return states[:len(history)]
        return None

    def sequence_states(self, interaction) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows' histories (B, T) cut to the longest, their lengths and the backbone's states
        (B, T, H): from the frozen states (computing those missing) or, with LoRA, from the backbone."""
        if self._source_llm:
            raise LayerSelError(
                "LayerSelLLM still holds the full LLM: its pre-training hooks (importance, selection, "
                "distillation) have not run. Call model.before_training(train_data, valid_data, test_data) "
                "before training or scoring; recbole_layersel's run_recbole does."
            )
        item_seq_len = interaction[self.ITEM_SEQ_LEN]
        item_seq = interaction[self.ITEM_SEQ][:, :int(item_seq_len.max())]
        if self.train_mode == "lora":
            return item_seq, item_seq_len, self.compact.backbone_states(item_seq)
        users = interaction[self.USER_ID].tolist()
        histories = [seq[:n] for seq, n in zip(item_seq, item_seq_len.tolist(), strict=True)]
        rows = [self._cached_states(user, history) for user, history in zip(users, histories, strict=True)]
        missing = [i for i, states in enumerate(rows) if states is None]
        if missing:
            computed = self._compute_frozen_states([users[i] for i in missing],
                                                   [histories[i] for i in missing])
            for i, states in zip(missing, computed, strict=True):
                rows[i] = states
        return item_seq, item_seq_len, nn.utils.rnn.pad_sequence(rows, batch_first=True)

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, states: torch.Tensor,
                item_vectors: torch.Tensor) -> torch.Tensor:
        """User vectors (B, embedding_size) after each history, given its backbone ``states`` and this
        step's item vectors."""
        return self.compact(item_seq, item_seq_len, states, item_vectors)

    def calculate_loss(self, interaction):
        """Cross-entropy over all items at every position of each window (``all_positions.py``)."""
        item_seq, item_seq_len, states = self.sequence_states(interaction)
        item_vectors = self.compact.item_vectors()
        output = self.compact.sequence_output(item_seq, states, item_vectors)
        loss = all_position_loss(output, item_seq, item_seq_len, interaction[self.POS_ITEM_ID], item_vectors,
                                 self.window_stride)
        if not torch.isfinite(loss):
            users = interaction[self.USER_ID][:10].tolist()
            raise LayerSelError(
                f"training loss is {loss.item()} on a batch of {len(item_seq)} rows (first users {users}); "
                "stopped. The last good checkpoint, if any epoch finished, is in checkpoint_dir. "
                "Lower learning_rate or use llm_dtype=float32."
            )
        return loss

    def predict(self, interaction):
        item_vectors = self.compact.item_vectors()
        user_vectors = self.forward(*self.sequence_states(interaction), item_vectors)
        return (user_vectors * item_vectors[interaction[self.ITEM_ID]]).sum(-1)

    def full_sort_predict(self, interaction):
        item_vectors = self.compact.item_vectors()
        return self.forward(*self.sequence_states(interaction), item_vectors) @ item_vectors.T


def _not_prefixes(histories: list[torch.Tensor]) -> list[torch.Tensor]:
    """The histories that are not a prefix of another one (duplicates once): one backbone pass over them
    gives the states of all."""
    kept: list[torch.Tensor] = []
    for history in sorted(histories, key=len, reverse=True):
        n = len(history)
        if not any(len(other) >= n and torch.equal(other[:n], history) for other in kept):
            kept.append(history)
    return kept
