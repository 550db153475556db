"""Compact transformer backbones made of k selected layers of a pretrained Hugging Face model.

A sequential recommender can borrow a pretrained LLM (or encoder) as its sequence backbone without
paying for all of its L layers: keep k of them, in their original order. `CompactBackbone` holds the
very same layer modules (no copy: the pretrained weights are reused and the unselected layers can be
freed), the part of the model's "stem" those layers need to run on ``inputs_embeds`` (rotary or learned
position embeddings, final norm), and a `Bridge` between every two consecutive kept layers. Bridges
start as the identity, so with every layer selected the backbone reproduces the source model's
``last_hidden_state``; once trained, they stand in for the skipped layers.

Each family is run the way its own ``modeling_<family>.py`` runs it: the layers get the masks built by
``transformers.masking_utils`` and the position arguments the original forward passes them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from numbers import Integral

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from recbole_layersel.errors import LayerSelError

# Decoders whose layers take rotary position embeddings from the model's `rotary_emb`.
_ROTARY_FAMILIES = ("llama", "qwen2", "qwen3", "gemma", "gemma3_text")
# `model_type` values; "gemma3" is the multimodal wrapper, of which only the text model is used.
SUPPORTED_FAMILIES: tuple[str, ...] = (*_ROTARY_FAMILIES, "gemma3", "gpt2", "bert")
BRIDGE_KINDS: tuple[str, ...] = ("identity", "linear", "residual", "mlp")

# Where a family keeps its layer stack (in the base model) and, inside one layer, the self-attention module
# whose second output is the attention probabilities. Families not listed use "layers" and "self_attn".
_LAYER_STACK = {"gpt2": "h", "bert": "encoder.layer"}
_SELF_ATTENTION = {"gpt2": "attn", "bert": "attention.self"}


def is_causal(config: PretrainedConfig) -> bool:
    """Whether the state at position t reads positions <= t only; encoders such as BERT read them all."""
    config = getattr(config, "text_config", config)
    return not (config.model_type == "bert" and not config.is_decoder)


def position_limit(config: PretrainedConfig) -> int | None:
    """The longest sequence a family with learned position embeddings (GPT-2, BERT) can read; None for
    rotary families, whose positions are computed."""
    config = getattr(config, "text_config", config)
    if config.model_type == "gpt2":
        return config.n_positions
    return config.max_position_embeddings if config.model_type == "bert" else None


def validate_selection(selected_layers, num_layers: int) -> list[int]:
    """Check a selection of layer indices of a `num_layers`-layer model and return it sorted ascending."""
    selected = list(selected_layers)
    not_ints = [i for i in selected if isinstance(i, bool) or not isinstance(i, Integral)]
    if not_ints:
        raise LayerSelError(
            f"selected_layers must hold integer layer indices, got {not_ints!r}; pass e.g. [0, 3, 5]."
        )
    if not selected:
        raise LayerSelError(
            f"selected_layers is empty; select at least one layer index in 0..{num_layers - 1}."
        )
    if len(selected) > num_layers:
        raise LayerSelError(
            f"{len(selected)} layers selected but the model has only {num_layers}; "
            f"select at most {num_layers} distinct indices in 0..{num_layers - 1}."
        )
    out_of_range = [i for i in selected if not 0 <= i < num_layers]
    if out_of_range:
        raise LayerSelError(
            f"layer indices {out_of_range} are out of range; valid indices are 0..{num_layers - 1} "
            "(negative indices are not accepted)."
        )
    duplicates = sorted({i for i in selected if selected.count(i) > 1})
    if duplicates:
        raise LayerSelError(f"layer indices {duplicates} are selected more than once; list each layer once.")
    return sorted(int(i) for i in selected)


def bridge_kind_for_gap(gap: int, mlp: bool = False) -> str:
    """Bridge kind between kept layers whose original indices differ by `gap` (1 = adjacent).

    Adjacent layers need no bridge; a gap of up to 3 gets a linear map, a longer gap a residual
    correction, and `mlp=True` asks for a non-linear (bottleneck MLP) correction wherever layers were skipped.
    """
    if gap < 1:
        raise LayerSelError(f"gap must be >= 1 (next kept index minus previous kept index), got {gap}.")
    if gap == 1:
        return "identity"
    if mlp:
        return "mlp"
    return "linear" if gap <= 3 else "residual"


class Bridge(nn.Module):
    """Trainable map between two consecutive kept layers; the identity at initialisation.

    identity: h.  linear: W h, W = I at init.  residual: h + W h, W = 0 at init.
    mlp: h + up(act(down(h))), up = 0 at init (bottleneck of `mlp_ratio * hidden_size` units).
    With `rank` r < hidden_size, linear and residual bridges learn a rank-r change instead:
    W = I + U V (linear) and W = U V (residual), U = 0 at init, both computed as h + U (V h).
    A full-rank bridge costs H^2 multiply-adds per token, about 9 % of a SmolLM2 layer, so seven of
    them (8 of 30 layers kept evenly) cost 0.6 of a layer; rank 64 (2·64·H) costs two ninths of that.
    Distillation fits a bridge on a few thousand states, which a rank-64 map fits as well as a full one.
    `regularizer()` measures the distance from the identity (||W - I||^2, ||W||^2, squared up-projection
    parameters, 0), the penalty that keeps bridges close to "skip nothing" during distillation.
    """

    def __init__(self, kind: str, hidden_size: int, mlp_ratio: float = 0.25, rank: int | None = None):
        super().__init__()
        if kind not in BRIDGE_KINDS:
            raise LayerSelError(f"unknown bridge kind {kind!r}; expected one of {BRIDGE_KINDS}.")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, Integral) or rank < 1):
            raise LayerSelError(f"bridge_rank={rank!r}; use a positive integer, or ~ for full-rank bridges.")
        self.kind = kind
        self.low_rank = kind in ("linear", "residual") and rank is not None and rank < hidden_size
        if self.low_rank:
            self.down = nn.Linear(hidden_size, rank, bias=False)
            self.up = nn.Linear(rank, hidden_size, bias=False)
            nn.init.zeros_(self.up.weight)
        elif kind == "linear":
            self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
            nn.init.eye_(self.proj.weight)
        elif kind == "residual":
            self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
            nn.init.zeros_(self.proj.weight)
        elif kind == "mlp":
            bottleneck = max(1, int(hidden_size * mlp_ratio))
            self.down = nn.Linear(hidden_size, bottleneck)
            self.act = nn.GELU()
            self.up = nn.Linear(bottleneck, hidden_size)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.low_rank:
            return hidden_states + self.up(self.down(hidden_states))
        if self.kind == "linear":
            return self.proj(hidden_states)
        if self.kind == "residual":
            return hidden_states + self.proj(hidden_states)
        if self.kind == "mlp":
            return hidden_states + self.up(self.act(self.down(hidden_states)))
        return hidden_states

    def regularizer(self) -> torch.Tensor:
        if self.low_rank:  # ||U V||^2 = trace((U^T U)(V V^T)), without forming the H x H product
            return ((self.up.weight.T @ self.up.weight) * (self.down.weight @ self.down.weight.T)).sum()
        if self.kind == "linear":
            weight = self.proj.weight
            identity = torch.eye(weight.shape[0], device=weight.device, dtype=weight.dtype)
            return (weight - identity).pow(2).sum()
        if self.kind == "residual":
            return self.proj.weight.pow(2).sum()
        if self.kind == "mlp":
            return sum(p.pow(2).sum() for p in self.up.parameters())
        return torch.zeros(())


class CompactBackbone(nn.Module):
    """The selected layers of a pretrained model, joined by bridges, run on ``inputs_embeds``.

    `base_model` may be a base model (LlamaModel, Qwen3Model, Gemma3TextModel, GPT2Model, BertModel, ...)
    or one with a head (*ForCausalLM, GPT2LMHeadModel, Gemma3ForConditionalGeneration, ...); heads, token
    embeddings and unselected layers are not kept. The kept layer modules are *shared* with `base_model`,
    not copied and not changed: building a backbone leaves `base_model` as it was (several backbones of one
    model can coexist, e.g. during the greedy search), while training one trains the source's layers too.
    The layers keep their `layer_idx` (used only by KV caches, which are never passed) and read the
    source's config, whose attention implementation ``self.config`` (the compact config, which drives the
    masks) copies; `eager_attention` switches both.
    """

    def __init__(
        self,
        base_model: PreTrainedModel,
        selected_layers: list[int],
        mlp_bridges: bool = False,
        num_source_layers: int | None = None,
        bridge_rank: int | None = None,
    ):
        super().__init__()
        model_type = base_model.config.model_type
        if model_type not in SUPPORTED_FAMILIES:
            raise LayerSelError(
                f"unsupported architecture model_type={model_type!r}; "
                f"CompactBackbone supports {', '.join(SUPPORTED_FAMILIES)}."
            )
        base = base_model.base_model  # drops task heads: *ForCausalLM.model, GPT2LMHeadModel.transformer
        base = getattr(base, "language_model", base)  # Gemma 3 multimodal: only its text model is used
        self.family = base.config.model_type
        if getattr(base.config, "use_bidirectional_attention", False):
            raise LayerSelError(
                "Gemma 3 with use_bidirectional_attention=True is not supported; use a causal model."
            )

        source_layers = base.get_submodule(_LAYER_STACK.get(self.family, "layers"))
        self.num_source_layers = num_source_layers or len(source_layers)
        # No layer at all is the text-only baseline: the inputs through the final norm.
        selected_layers = list(selected_layers)
        self.selected_layers = validate_selection(selected_layers, self.num_source_layers) \
            if selected_layers else []
        # A model built from a compact config (see `from_compact_config`) already holds just the kept layers.
        positions = self.selected_layers if num_source_layers is None else range(len(self.selected_layers))
        self.layers = nn.ModuleList(source_layers[i] for i in positions)

        self.config = copy.deepcopy(base.config)
        self.config.num_hidden_layers = len(self.layers)
        if getattr(self.config, "layer_types", None) is not None:
            # Sliding-window layers stay sliding-window layers: each kept layer keeps its own type.
            self.config.layer_types = [self.config.layer_types[i] for i in positions]
        self.layer_types = getattr(self.config, "layer_types", None) or ["full_attention"] * len(self.layers)

        if self.family in _ROTARY_FAMILIES:
            self.rotary_emb = base.rotary_emb
            self.norm = base.norm
        elif self.family == "gpt2":
            self.wpe, self.drop, self.norm = base.wpe, base.drop, base.ln_f
        else:  # bert: position and token-type embeddings + LayerNorm act on the inputs; no final norm
            embeddings = base.embeddings
            self.position_embeddings = embeddings.position_embeddings
            self.token_type_embeddings = embeddings.token_type_embeddings
            self.embed_norm, self.embed_dropout = embeddings.LayerNorm, embeddings.dropout
            self.norm = nn.Identity()

        self.bridge_rank = bridge_rank
        self.bridges = nn.ModuleList(
            Bridge(bridge_kind_for_gap(after - before, mlp_bridges), self.config.hidden_size,
                   rank=bridge_rank)
            for before, after in pairwise(self.selected_layers)
        ).to(device=base.device, dtype=base.dtype)


    def _configs(self) -> list[PretrainedConfig]:
        """The compact config and every config object the kept layers read at run time."""
        found = {id(self.config): self.config}
        for module in self.layers.modules():
            if isinstance(getattr(module, "config", None), PretrainedConfig):
                found.setdefault(id(module.config), module.config)
        return list(found.values())

    @contextmanager
    def eager_attention(self):
        """Run the masks and the layers with "eager" attention, which returns attention probabilities;
        every config is put back afterwards, also on error."""
        saved = [(config, config._attn_implementation) for config in self._configs()]
        try:
            for config, _ in saved:
                config._attn_implementation = "eager"
            yield self
        finally:
            for config, implementation in saved:
                config._attn_implementation = implementation

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the layers compute in: that of the first floating-point parameter (bitsandbytes
        stores quantised weights as integers; norms stay in this dtype)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @classmethod
    def from_compact_config(
        cls, config: PretrainedConfig, selected_layers: list[int], num_source_layers: int, mlp_bridges: bool,
        bridge_rank: int | None = None,
    ) -> CompactBackbone:
        """An untrained backbone shaped like a saved one (its `self.config`), without the source model:
        load the saved state dict into it."""
        return cls(AutoModel.from_config(config), selected_layers, mlp_bridges, num_source_layers,
                   bridge_rank)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ):
        """Run the kept layers on `inputs_embeds` (B, T, H) with a (B, T) 1/0 padding `attention_mask`.

        Returns the final hidden states (B, T, H), after the final norm. With `output_hidden_states`
        and/or `output_attentions` returns a tuple (last_hidden_state, per_layer, attentions) holding only
        the requested parts: per_layer[i] is the output of kept layer i (before the bridge that follows it
        and before the final norm), attentions[i] its attention probabilities (B, heads, T, T), which only
        the "eager" attention implementation provides.
        """
        hidden_states, context = self.prepare(inputs_embeds, attention_mask)
        attentions, hooks = [], []
        if output_attentions:
            implementations = {config._attn_implementation for config in self._configs()}
            if implementations != {"eager"}:
                raise LayerSelError(
                    f"output_attentions=True needs attention probabilities, which the "
                    f"{', '.join(sorted(implementations))} attention does not return; load the model with "
                    "attn_implementation='eager', or run inside `with backbone.eager_attention():`."
                )
            attention_path = _SELF_ATTENTION.get(self.family, "self_attn")
            hooks = [
                layer.get_submodule(attention_path).register_forward_hook(
                    lambda _module, _args, output: attentions.append(output[1])
                )
                for layer in self.layers
            ]
        per_layer = []
        try:
            for i in range(len(self.layers)):
                if i > 0:
                    hidden_states = self.bridges[i - 1](hidden_states)
                hidden_states = self.run_layer(i, hidden_states, context)
                if output_hidden_states:  # kept only when asked: each is a (B, T, H) tensor
                    per_layer.append(hidden_states)
        finally:
            for hook in hooks:
                hook.remove()

        last_hidden_state = self.norm(hidden_states)
        if not (output_hidden_states or output_attentions):
            return last_hidden_state
        outputs = (last_hidden_state,)
        if output_hidden_states:
            outputs += (tuple(per_layer),)
        if output_attentions:
            outputs += (tuple(attentions),)
        return outputs

    def prepare(self, inputs_embeds: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The first kept layer's input, and the context every layer reads besides its input: per layer
        type, the attention mask and position arguments of this batch (``run_layer``)."""
        position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
        masks = self._attention_masks(inputs_embeds, attention_mask, position_ids)
        hidden_states, layer_kwargs = self._embed_positions(inputs_embeds, position_ids)
        context = {t: {"attention_mask": masks[t], **kwargs} for t, kwargs in layer_kwargs.items()}
        return hidden_states, context

    def run_layer(self, index: int, hidden_states: torch.Tensor, context: dict) -> torch.Tensor:
        """Kept layer ``index`` on ``hidden_states``, with the batch's ``context`` from ``prepare``."""
        return self.layers[index](hidden_states, **context[self.layer_types[index]])

    def _attention_masks(self, inputs_embeds, attention_mask, position_ids) -> dict:
        """The padding mask combined with causal (for BERT: bidirectional) masking, per layer type, in the
        format the configured attention implementation expects."""
        if not is_causal(self.config):
            return {
                "full_attention": create_bidirectional_mask(
                    config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask
                )
            }
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache": None,
            "position_ids": position_ids,
        }
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in self.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return masks

    def _embed_positions(self, inputs_embeds, position_ids) -> tuple[torch.Tensor, dict]:
        """Apply the family's input stem; return the first layer's input and, per layer type, the
        position arguments the layers take."""
        if self.family in _ROTARY_FAMILIES:
            if self.family == "gemma3_text":  # local (sliding) and global layers use different RoPE bases
                rope = {t: self.rotary_emb(inputs_embeds, position_ids, t) for t in set(self.layer_types)}
            else:
                rope = dict.fromkeys(self.layer_types, self.rotary_emb(inputs_embeds, position_ids))
            layer_kwargs = {
                t: {"position_embeddings": cos_sin, "position_ids": position_ids}
                for t, cos_sin in rope.items()
            }
            return inputs_embeds, layer_kwargs
        if self.family == "gpt2":
            hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))
            return hidden_states, {"full_attention": {"position_ids": position_ids}}
        # BERT: every item is in segment 0, so the token-type embedding is row 0 for all positions.
        hidden_states = inputs_embeds + self.token_type_embeddings.weight[0]
        hidden_states = hidden_states + self.position_embeddings(position_ids)
        return self.embed_dropout(self.embed_norm(hidden_states)), {"full_attention": {}}


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (dropout would make every measurement random); each submodule's train/eval
    mode is put back afterwards, also on error."""
    saved = {submodule: submodule.training for submodule in module.modules()}
    try:
        module.eval()
        yield
    finally:
        for submodule, training in saved.items():
            submodule.training = training


def seeded_backbone(llm, selected: list[int], seed: int, mlp_bridges: bool = False,
                    bridge_rank: int | None = None) -> CompactBackbone:
    """The compact backbone with bridges initialised from ``seed``, not from the global random state
    (which the stages before it consume differently on a cache hit and a miss); the global state is
    left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CompactBackbone(llm, selected, mlp_bridges=mlp_bridges, bridge_rank=bridge_rank)
