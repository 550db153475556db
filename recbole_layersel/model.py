"""
LayerSelLLM
################################################

A sequential recommender whose sequence model is a compact transformer made of k selected layers of
a pretrained LLM (e.g. 8 of SmolLM2's 30), joined by bridge adapters where kept layers are not adjacent.

Items are their titles: each title is encoded once by the full LLM (``titles.py``). A user's history
enters the backbone as the sequence of its items' title input embeddings; the state at the last
position, through a small head, is the user vector. An item vector is its pooled title representation
through a head, plus a learnt item-ID embedding. Scores are dot products over all items; the loss is
cross-entropy over all items (RecBole's ``CE``).

The backbone's inputs are fixed (title embeddings), so with ``train_mode: frozen`` its outputs are
computed once per user history and reused by every epoch: causal attention makes the state after
t items the same whichever longer history it is read from, so one pass per user serves all of that
user's training prefixes and its validation and test rows. ``train_mode: lora`` trains LoRA adapters
(peft) on the kept layers and the bridges, re-running the backbone on every batch.

Reference:
    Xin Men et al. "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect." 2024.
    Andrey Gromov et al. "The Unreasonable Ineffectiveness of the Deeper Layers." ICLR 2025.
    Wang-Cheng Kang and Julian McAuley. "Self-Attentive Sequential Recommendation." ICDM 2018.
"""

import hashlib
import logging
import warnings
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn
from tqdm import tqdm

from recbole_layersel.backbone import CompactBackbone, is_causal, position_limit
from recbole_layersel.distributed import all_reduce_sum, broadcast_parameters, rank_and_world
from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import code_sha256
from recbole_layersel.hooks import run_pretraining_hooks, seeded_backbone
from recbole_layersel.llm import default_cache_dir, load_llm, resolve_llm
from recbole_layersel.selection import DATA_FREE_STRATEGIES, check_strategy, select_layers
from recbole_layersel.titles import cached_title_embeddings, encode_titles, item_titles

logger = logging.getLogger(__name__)
TRAIN_MODES = ("frozen", "lora")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The attention projections LoRA adapts by default, per family.
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "key", "value"],
}


class CompactRecommender(nn.Module):
    """The part of LayerSelLLM that is exported and served: compact backbone, the fixed title
    embeddings (``title_inputs``, ``title_outputs``, row 0 = padding) and the trainable heads."""

    def __init__(self, backbone: CompactBackbone, title_inputs: torch.Tensor, title_outputs: torch.Tensor,
                 embedding_size: int):
        super().__init__()
        self.backbone = backbone
        hidden_size = backbone.config.hidden_size
        dtype = backbone.dtype
        self.register_buffer("title_inputs", title_inputs.to(dtype))
        self.register_buffer("title_outputs", title_outputs.float())
        self.user_head = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, embedding_size))
        self.item_head = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, embedding_size))
        self.item_id_embedding = nn.Embedding(title_inputs.shape[0], embedding_size, padding_idx=0)
        nn.init.normal_(self.item_id_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_id_embedding.weight[0] = 0
        self.item_bias = nn.Parameter(torch.zeros(title_inputs.shape[0]))  # popularity, learnt

    def sequence_states(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """Backbone output (B, T, H) for right-padded histories, cut to the longest one."""
        item_seq = item_seq[:, : int(item_seq_len.max())]
        return self.backbone(self.title_inputs[item_seq], attention_mask=(item_seq != 0).long())

    def last_states(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        states = self.sequence_states(item_seq, item_seq_len)
        return states[torch.arange(states.shape[0], device=states.device), item_seq_len - 1]

    def user_vectors(self, last_states: torch.Tensor) -> torch.Tensor:
        return self.user_head(last_states.float())

    def item_vectors(self) -> torch.Tensor:
        return self.item_head(self.title_outputs) + self.item_id_embedding.weight

    def scores(self, user_vectors: torch.Tensor, items=None) -> torch.Tensor:
        """Scores of all items (B, n_items), or of one item per row (B,) when ``items`` is given."""
        item_vectors = self.item_vectors()
        if items is None:
            return user_vectors @ item_vectors.T + self.item_bias
        return (user_vectors * item_vectors[items]).sum(-1) + self.item_bias[items]

    def full_sort_scores(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        return self.scores(self.user_vectors(self.last_states(item_seq, item_seq_len)))


def add_lora(backbone: CompactBackbone, r: int, alpha: int, dropout: float, targets=None) -> None:
    """Inject LoRA adapters into the kept layers; only they and the bridges stay trainable."""
    if not backbone.layers:  # the text-only baseline: nothing to adapt
        backbone.requires_grad_(False)
        return
    targets = targets or LORA_TARGETS[backbone.family]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        fan_in_fan_out=backbone.family == "gpt2")  # GPT-2 stores Conv1D weights transposed
    inject_adapter_in_model(config, backbone)
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad = "lora_" in name or name.startswith("bridges.")


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


def _encode_titles_on(device, llm, *args, **kwargs) -> dict[str, torch.Tensor]:
    return encode_titles(_on_device(llm, device), *args, **kwargs)


def llm_fingerprint(path: Path) -> dict:
    """What identifies a local model's weights for caches: its path and each file's size and mtime."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"path": str(path), "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


class LayerSelLLM(SequentialRecommender):
    r"""Compact selected-layer LLM as a RecBole sequential recommender (see the module docstring)."""

    needs_titles = True  # quick_start checks the dataset's title field before anything is written

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.train_mode = config["train_mode"]
        if self.train_mode not in TRAIN_MODES:
            raise LayerSelError(f"train_mode={self.train_mode!r}; use one of {TRAIN_MODES}.")
        if config["llm_dtype"] not in DTYPES:
            raise LayerSelError(f"llm_dtype={config['llm_dtype']!r}; use one of {', '.join(DTYPES)}.")
        self.quantize, self.quantized, self._warned_int8_export = config["quantize"], False, False
        if self.quantize is not None:
            check_int8(self.quantize, self.train_mode, config["device"], config["llm_dtype"])
        if self.train_mode == "frozen":
            self._check_histories_fit(dataset)
        if config["llm_quantization"] and config["selected_layers"] is None \
                and config["layer_strategy"] not in DATA_FREE_STRATEGIES:
            raise LayerSelError(
                f"layer_strategy={config['layer_strategy']!r} scores layers by gradients and weights, "
                f"which llm_quantization={config['llm_quantization']!r} stores as integers. Choose the "
                "layers without quantization (hooks_only=True), then pass them as selected_layers; or "
                f"use a data-free strategy ({', '.join(DATA_FREE_STRATEGIES)})."
            )

        cache_dir = Path(config["llm_cache_dir"] or default_cache_dir()).expanduser()
        llm_path = resolve_llm(config["llm_path"], cache_dir)
        device = config["device"]
        # Loaded on the CPU (bitsandbytes loads straight onto the GPU). The whole model goes to the
        # device only to encode titles that are not cached yet, or for the hooks: otherwise just the
        # kept layers do (CompactRecommender below) and the others are never materialised there.
        llm, tokenizer = load_llm(str(llm_path), dtype=DTYPES[config["llm_dtype"]],
                                  quantization=config["llm_quantization"], device=device)
        self._check_backbone_fits(llm.config, config["llm_path"])
        titles = item_titles(dataset, config["title_field"])
        settings = {name: config[name]
                    for name in ("title_max_tokens", "title_pooling", "llm_dtype", "llm_quantization")}
        key = {"llm": llm_fingerprint(llm_path), "dataset": config["dataset"], "code": code_sha256(),
               **settings, "titles_sha256": hashlib.sha256("\n".join(titles).encode()).hexdigest()}
        encoded = cached_title_embeddings(cache_dir, key, partial(
            _encode_titles_on, device, llm, tokenizer, titles, max_tokens=config["title_max_tokens"],
            pooling=config["title_pooling"], batch_size=config["title_batch_size"],
            show_progress=config["show_progress"]))

        self.config, self.cache_dir, self.llm_path = config, cache_dir, config["llm_path"]
        self.llm_fingerprint, self.titles_sha256 = key["llm"], key["titles_sha256"]
        self.item_tokens = dataset.field2id_token[self.ITEM_ID].tolist()  # internal id -> dataset item id
        self.item_title_texts = titles
        # Popularity (training targets per item) answers users with no history; histories are filled
        # by `before_training` from the loaders, so an export can recommend for a dataset's user id.
        self.item_counts = torch.bincount(dataset.inter_feat[self.ITEM_ID], minlength=self.n_items).tolist()
        self.user_histories: dict[str, list[str]] = {}
        self.lora_settings = {"r": config["lora_r"], "alpha": config["lora_alpha"],
                              "dropout": config["lora_dropout"], "targets": config["lora_target_modules"]}

        num_source_layers, explicit = llm.config.num_hidden_layers, config["selected_layers"]
        if config["num_layers"] == "all":  # every layer, however many this model has
            config["num_layers"] = num_source_layers
        if explicit is None:
            check_strategy(config["layer_strategy"], config["num_layers"], num_source_layers)
        hooks_needed = config["distill_steps"] or (
            explicit is None and config["layer_strategy"] not in DATA_FREE_STRATEGIES)
        if hooks_needed:
            # Importance, selection and distillation read the full model: keep every layer (and the
            # source model, outside the module tree) until `before_training` has chosen.
            llm = _on_device(llm, device)
            backbone = CompactBackbone(llm, list(range(num_source_layers))).requires_grad_(False)
            self._source_llm = (llm,)
        else:
            backbone = seeded_backbone(llm, select_layers(
                num_source_layers, selected_layers=explicit, strategy=config["layer_strategy"],
                num_layers=config["num_layers"], seed=config["seed"]), config["seed"], config["mlp_bridges"],
                config["bridge_rank"])
            self._source_llm = ()
        del llm  # without hooks, the unselected layers, token embeddings and any head are freed here
        self.compact = CompactRecommender(backbone, encoded["inputs"], encoded["outputs"],
                                          config["embedding_size"]).to(config["device"])
        if not hooks_needed:
            self._prepare_backbone_for_training()
        self.state_batch_size = config["state_batch_size"]
        # user -> (the history read, its backbone states (length, H)); a row reuses them only when its
        # own history is a prefix of the one read, so another history for a known user is recomputed.
        self.frozen_states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.loss_fct = nn.CrossEntropyLoss()

    def _check_histories_fit(self, dataset) -> None:
        # Training rows hold prefixes up to (history - 3) items; the test row holds (history - 1).
        longest = int(dataset.inter_feat[self.ITEM_SEQ_LEN].max()) + 2
        if longest > self.max_seq_length:
            raise LayerSelError(
                f"train_mode=frozen needs MAX_ITEM_LIST_LENGTH >= the longest user history, so that every "
                f"row is a prefix of one pass per user; MAX_ITEM_LIST_LENGTH={self.max_seq_length}, but "
                f"histories reach at least {longest} items. Set MAX_ITEM_LIST_LENGTH to "
                f"{max(longest, 2 * self.max_seq_length)} or more, or use train_mode=lora."
            )

    def _check_backbone_fits(self, llm_config, llm_path: str) -> None:
        if self.train_mode == "frozen" and not is_causal(llm_config):
            raise LayerSelError(
                f"llm_path={llm_path!r} is a bidirectional encoder ({llm_config.model_type}): the state "
                "after t items would read the items that follow, so frozen mode's one pass per user would "
                "show each training prefix its own target. Use train_mode=lora (one pass per row), or a "
                "causal model (Llama, Qwen, Gemma, GPT-2)."
            )
        limit = position_limit(llm_config)
        if limit is not None and self.max_seq_length > limit:
            raise LayerSelError(
                f"MAX_ITEM_LIST_LENGTH={self.max_seq_length}, but llm_path={llm_path!r} "
                f"({llm_config.model_type}) has learned position embeddings for at most {limit} positions. "
                f"Set MAX_ITEM_LIST_LENGTH to at most {limit}, or use a model with rotary positions "
                "(Llama, Qwen, Gemma)."
            )

    def export_beside_checkpoint(self, checkpoint_file: str) -> None:
        """RecBole's checkpoints are pickles; this writes the same weights beside one as a pickle-free
        export (``<checkpoint>.layersel/``), which ``recommend`` loads safely."""
        from recbole_layersel.export import export_compact  # export.py imports this module

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
            (llm,) = self._source_llm
            self.compact.backbone = run_pretraining_hooks(self, llm, train_data, valid_data).to(self.device)
            self._source_llm = ()  # frees the source model and every unselected layer
            self._prepare_backbone_for_training()
            total = self.compact.backbone.num_source_layers
            logger.info(f"Compact backbone: layers {self.selected_layers} of {total}")
        if self.quantize and not self.quantized:
            self.compact.backbone = quantize_int8(self.compact.backbone)
            self.quantized = True

    def before_training(self, train_data, *eval_data) -> None:
        """`run_hooks`; then, in frozen mode, one backbone pass per user over its longest history in any
        of the loaders."""
        self.run_hooks(train_data, eval_data[0] if eval_data else train_data)
        longest: dict[int, tuple[int, torch.Tensor, int]] = {}  # user -> (length, history, next item)
        for loader in (train_data, *eval_data):
            rows = loader._dataset.inter_feat
            columns = (rows[self.USER_ID].tolist(), rows[self.ITEM_SEQ_LEN].tolist(), rows[self.ITEM_SEQ],
                       rows[self.ITEM_ID].tolist())
            for user, length, seq, target in zip(*columns, strict=True):
                if length > longest.get(user, (0,))[0]:
                    longest[user] = (length, seq, target)
        user_tokens = train_data._dataset.field2id_token[self.USER_ID]
        self.user_histories = {
            str(user_tokens[user]): [self.item_tokens[i] for i in [*seq[:length].tolist(), target]]
            for user, (length, seq, target) in longest.items()}
        if self.train_mode != "frozen":
            return
        users = list(longest)
        lengths = torch.tensor([longest[u][0] for u in users])
        self._compute_frozen_states(users, torch.stack([longest[u][1] for u in users]), lengths,
                                    data_parallel=True)

    @torch.no_grad()
    def _compute_frozen_states(self, users: list[int], item_seq: torch.Tensor, item_seq_len: torch.Tensor,
                               data_parallel: bool = False) -> list[torch.Tensor]:
        """Backbone states of every position of each history (returned, and kept per user with the
        history they were computed from). With ``data_parallel``
        (called by every process at once) each process runs its share of the batches and an all-reduce
        gives all of them every state; scoring calls it per process, for the users it is missing."""
        was_training = self.compact.training
        self.compact.eval()
        lengths = item_seq_len.tolist()
        ends = torch.tensor(lengths).cumsum(0).tolist()
        states = torch.zeros(ends[-1], self.compact.backbone.config.hidden_size,
                             dtype=self.compact.title_inputs.dtype, device=self.device)
        order = torch.argsort(item_seq_len, descending=True).tolist()  # similar lengths share a batch
        batches = [order[i:i + self.state_batch_size] for i in range(0, len(order), self.state_batch_size)]
        rank, world = rank_and_world() if data_parallel else (0, 1)
        mine = batches[rank::world]
        show = self.config["show_progress"] and len(mine) >= 4
        for batch in tqdm(mine, desc="frozen backbone states", unit="batch", disable=not show):
            batch_states = self.compact.sequence_states(item_seq[batch].to(self.device),
                                                        item_seq_len[batch].to(self.device))
            for row, index in enumerate(batch):
                states[ends[index] - lengths[index]:ends[index]] = batch_states[row, :lengths[index]]
        if data_parallel:
            states = all_reduce_sum(states)
        per_history = [states[end - length:end] for end, length in zip(ends, lengths, strict=True)]
        for index, user in enumerate(users):
            self.frozen_states[user] = (item_seq[index, :lengths[index]].to(self.device), per_history[index])
        self.compact.train(was_training)
        return per_history

    def last_states(self, interaction) -> torch.Tensor:
        if self._source_llm:
            raise LayerSelError(
                "LayerSelLLM still holds the full LLM: its pre-training hooks (importance, selection, "
                "distillation) have not run. Call model.before_training(train_data, valid_data, test_data) "
                "before training or scoring; recbole_layersel's run_recbole does."
            )
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        if self.train_mode == "lora":
            return self.compact.last_states(item_seq, item_seq_len)
        users, lengths = interaction[self.USER_ID].tolist(), item_seq_len.tolist()
        missing = [i for i, (u, n) in enumerate(zip(users, lengths, strict=True))
                   if not self._has_states(u, item_seq[i, :n])]
        computed = {}  # row -> states, read from here: rows of one user may hold different histories
        if missing:
            computed = dict(zip(missing, self._compute_frozen_states(
                [users[i] for i in missing], item_seq[missing], item_seq_len[missing]), strict=True))
        return torch.stack([computed[i][n - 1] if i in computed else self.frozen_states[u][1][n - 1]
                            for i, (u, n) in enumerate(zip(users, lengths, strict=True))])

    def _has_states(self, user: int, history: torch.Tensor) -> bool:
        known = self.frozen_states.get(user)
        return known is not None and len(known[0]) >= len(history) and torch.equal(known[0][:len(history)],
                                                                                   history)

    def forward(self, interaction) -> torch.Tensor:
        """User vectors (B, embedding_size)."""
        return self.compact.user_vectors(self.last_states(interaction))

    def calculate_loss(self, interaction):
        logits = self.compact.scores(self.forward(interaction))
        loss = self.loss_fct(logits, interaction[self.POS_ITEM_ID])
        if not torch.isfinite(loss):
            users = interaction[self.USER_ID][:10].tolist()
            raise LayerSelError(
                f"training loss is {loss.item()} on a batch of {len(logits)} rows (first users {users}); "
                "stopped. The last good checkpoint, if any epoch finished, is in checkpoint_dir. "
                "Lower learning_rate or use llm_dtype=float32."
            )
        return loss

    def predict(self, interaction):
        return self.compact.scores(self.forward(interaction), interaction[self.ITEM_ID])

    def full_sort_predict(self, interaction):
        return self.compact.scores(self.forward(interaction))
