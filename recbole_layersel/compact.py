"""The served model: what LayerSelLLM trains, ``export`` writes and ``recommend`` and ``bench`` load.

Pure torch (no RecBole): a user's history (item ids, right-padded, oldest first) becomes next-item scores.

- **Items** are tied vectors ``e_j = ID embedding + c W z_j``: a trainable collaborative part and the item's
  text prior ``t_j``, the kept layers' pooled states over its title (``titles.py``, fixed), standardised
  over the items (``z_j``: LLM embeddings share a large common direction, which hides what tells titles
  apart). The sequence reads these vectors and scoring uses the same ones, as in SASRec.
- **LLM states**: the compact backbone (k kept layers, ``backbone.py``) runs on the history's title input
  embeddings; its state ``s_t`` at position t reads items 0..t (causal).
- **Sequence head**: SASRec's encoder (post-norm causal self-attention blocks) over
  ``x_t = e_{i_t} + c P LayerNorm(s_t) + position_t``; its output at position t is the user vector after
  items 0..t. Scores are its dot products with every item vector.

``W`` and ``P`` start at zero and everything else as in SASRec, so an untrained model is an untrained
SASRec: the text prior and the LLM states enter as far as training finds them useful. ``c`` is
``content_scale``, H^-1/4 by default. Adam moves every weight about one learning rate a step, so a
matrix reading H features moves its output sqrt(H) (features of mixed signs) to H (aligned) times faster
than an ID embedding moves: unscaled, the content paths take over in the first epochs and the IDs never
catch up (ml-100k); at ``c = 1/H`` the content is learnt too slowly where it carries the signal
(amazon-electronics). Between them, H^-1/4 measured best (README, *Content scale*): each projection is
shared by every item and learns from every interaction, so it may move faster than one item's ID.

The backbone's inputs are fixed, so its states can be computed once per history and reused while the
head trains (``LayerSelLLM``'s frozen mode); with LoRA on the kept layers they are recomputed per batch.

Reference:
    Wang-Cheng Kang and Julian McAuley. "Self-Attentive Sequential Recommendation." ICDM 2018.
"""

from dataclasses import dataclass

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from recbole_layersel.backbone import CompactBackbone

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


@dataclass
class HeadConfig:
    """The sequence head and item vectors; the defaults are RecBole's SASRec.yaml."""

    embedding_size: int = 64  # size of item and user vectors (SASRec's hidden_size)
    max_length: int = 50  # positions the head has embeddings for (MAX_ITEM_LIST_LENGTH)
    n_layers: int = 2
    n_heads: int = 2
    inner_size: int = 256
    dropout: float = 0.5  # on inputs, attention probabilities and block outputs
    content_scale: float = 1.0  # multiplier on the text-prior and LLM-state projections (1 = unscaled)

    @classmethod
    def from_config(cls, config, hidden_size: int) -> "HeadConfig":
        """The yaml's head settings; ``content_scale: ~`` is ``hidden_size`` ** -1/4 (the LLM's)."""
        content_scale = config["content_scale"]
        return cls(embedding_size=config["embedding_size"], max_length=config["MAX_ITEM_LIST_LENGTH"],
                   n_layers=config["head_layers"], n_heads=config["head_heads"],
                   inner_size=config["head_inner_size"], dropout=config["head_dropout"],
                   content_scale=hidden_size ** -0.25 if content_scale is None else content_scale)


def _normal_init(module: nn.Module) -> None:
    """SASRec's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class CompactRecommender(nn.Module):
    """Compact backbone, fixed title embeddings (``title_inputs`` for the backbone, ``title_prior`` for
    the item vectors; row 0 = padding) and the trainable item vectors and sequence head."""

    def __init__(self, backbone: CompactBackbone, title_inputs: torch.Tensor, title_prior: torch.Tensor,
                 head: HeadConfig):
        super().__init__()
        self.backbone, self.head_config = backbone, head
        size, num_items = head.embedding_size, title_inputs.shape[0]
        self.register_buffer("title_inputs", title_inputs.to(backbone.dtype))
        self.set_title_prior(title_prior)
        self.item_id_embedding = nn.Embedding(num_items, size, padding_idx=0)
        self.text_projection = nn.Linear(title_prior.shape[1], size)
        self.state_projection = nn.Sequential(nn.LayerNorm(backbone.config.hidden_size),
                                              nn.Linear(backbone.config.hidden_size, size))
        self.position_embedding = nn.Embedding(head.max_length, size)
        self.input_norm, self.input_dropout = nn.LayerNorm(size, eps=1e-12), nn.Dropout(head.dropout)
        block = nn.TransformerEncoderLayer(size, head.n_heads, head.inner_size, head.dropout,
                                           activation="gelu", layer_norm_eps=1e-12, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, head.n_layers, enable_nested_tensor=False)
        for module in self.children():
            if module is not backbone:  # the pretrained layers keep their weights
                module.apply(_normal_init)
        with torch.no_grad():
            self.item_id_embedding.weight[0] = 0
            self.text_projection.weight.zero_()
            self.state_projection[1].weight.zero_()

    def set_title_prior(self, title_prior: torch.Tensor) -> None:
        """Use ``title_prior`` (n_items, H) as the items' text prior (the kept layers' encoding of the
        titles, which changes when the layers are chosen), standardised over the items."""
        self.register_buffer("title_prior", title_prior.float().to(self.title_inputs.device))
        items = self.title_prior[1:]  # row 0 is the padding item
        self.register_buffer("prior_mean", items.mean(0), persistent=False)
        self.register_buffer("prior_std", items.std(0).clamp(min=1e-6), persistent=False)

    def backbone_states(self, item_seq: torch.Tensor) -> torch.Tensor:
        """LLM states (B, T, H) of right-padded histories."""
        return self.backbone(self.title_inputs[item_seq], attention_mask=(item_seq != 0).long())

    def item_vectors(self) -> torch.Tensor:
        """Every item's vector (n_items, embedding_size); row 0 is the padding item."""
        standardised = (self.title_prior - self.prior_mean) / self.prior_std
        content = self.head_config.content_scale * self.text_projection(standardised)
        return self.item_id_embedding.weight + content

    def sequence_output(self, item_seq: torch.Tensor, states: torch.Tensor,
                        item_vectors: torch.Tensor) -> torch.Tensor:
        """User vectors (B, T, embedding_size) after each position of right-padded histories, from their
        LLM ``states`` and the ``item_vectors()`` (computed once per step by the caller, who also scores
        with them); a padded position reads only the positions before it, so the others are exact."""
        positions = torch.arange(item_seq.shape[1], device=item_seq.device)
        state_inputs = self.head_config.content_scale * self.state_projection(states.float())
        inputs = item_vectors[item_seq] + state_inputs
        inputs = self.input_dropout(self.input_norm(inputs + self.position_embedding(positions)))
        causal = nn.Transformer.generate_square_subsequent_mask(len(positions), device=item_seq.device)
        return self.encoder(inputs, mask=causal, is_causal=True)

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, states: torch.Tensor | None = None,
                item_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """User vectors (B, embedding_size) after each whole history; ``states`` are the backbone's
        (B, T, H) and ``item_vectors`` this step's ``item_vectors()``, when already computed."""
        length = int(item_seq_len.max())
        item_seq = item_seq[:, :length]
        states = self.backbone_states(item_seq) if states is None else states[:, :length]
        item_vectors = self.item_vectors() if item_vectors is None else item_vectors
        output = self.sequence_output(item_seq, states, item_vectors)
        return output[torch.arange(len(item_seq), device=item_seq.device), item_seq_len - 1]

    def full_sort_scores(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """Scores (B, n_items) of every item after each history."""
        item_vectors = self.item_vectors()
        return self(item_seq, item_seq_len, item_vectors=item_vectors) @ item_vectors.T


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
