"""Item titles -> text embeddings, computed by the compact backbone and cached on disk.

Two vectors per item, both of the LLM's hidden size:
- ``inputs``: the mean of the title's input token embeddings. It lives where a transformer's first layer
  expects its inputs, so a user's history becomes a sequence of ``inputs_embeds`` for the backbone.
- ``prior``: the item's text prior, which its trainable vector starts from: the backbone's final states
  (its kept layers, bridges and final norm) over the title's tokens, pooled (``mean`` or ``last`` token).
  The layers kept are the layers that encode the items, so which ones are kept shows in the prior: a few
  early layers make a better title embedding than all of them, whose last states are shaped to predict
  the next token (``title_layers.py`` screens the full model's layers). With no layer kept the prior is
  the title's token embeddings through the final norm.
Row 0 is RecBole's padding item and stays zero.
"""

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from recbole_layersel.distributed import all_reduce_sum, from_main, is_main, my_batches
from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import StageCache, StageSettings

logger = logging.getLogger(__name__)
POOLINGS = ("mean", "last")
# The modules whose code computes title embeddings (loading the LLM, running the kept layers, encoding,
# sharing batches over processes, the cache): the cache key hashes them, so a change elsewhere keeps the
# (costly) cache.
TITLE_CODE = ("titles", "llm", "backbone", "distributed", "files")


@dataclass(frozen=True)
class TitleSettings(StageSettings):
    title_max_tokens: int
    title_pooling: str
    llm_dtype: str
    llm_quantization: str | None


def item_titles(dataset, title_field: str) -> list[str]:
    """Each item's title as text, indexed by RecBole's internal item id (index 0 is padding)."""
    words = dataset.field2id_token[title_field]
    titles = [" ".join(words[t] for t in row.tolist() if t != 0) for row in dataset.item_feat[title_field]]
    missing = [dataset.id2token(dataset.iid_field, i) for i, title in enumerate(titles) if i and not title]
    if missing:
        raise LayerSelError(
            f"{len(missing)} of {len(titles) - 1} items have no title in field {title_field!r} "
            f"(item ids {', '.join(map(str, missing[:10]))}{', ...' if len(missing) > 10 else ''}). "
            "Every item needs a title: fill them in the .item file, or drop those items."
        )
    return titles


def backbone_fingerprint(backbone) -> dict:
    """What identifies a compact backbone's computation for caches, given the source model: its kept
    layers and the hash of its bridges' weights (identity ones have none; distilled ones differ)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.bridges.state_dict().items()):
        digest.update(name.encode() + b"\0" + tensor.detach().float().cpu().numpy().tobytes())
    return {"layers": list(backbone.selected_layers), "num_source_layers": backbone.num_source_layers,
            "bridges_sha256": digest.hexdigest()}


@torch.no_grad()
def encode_titles(backbone, embed_tokens, tokenizer, titles: list[str], settings: TitleSettings, *,
                  batch_size: int, show_progress: bool = True,
                  data_parallel: bool = True) -> dict[str, torch.Tensor]:
    """``{"inputs": (n, H), "prior": (n, H)}`` for ``titles`` (see the module docstring): ``embed_tokens``
    is the LLM's input embedding, ``backbone`` a ``CompactBackbone`` on the same device. With
    ``data_parallel`` every process of a process group calls it and encodes its share of the batches;
    without, this process encodes them all."""
    pooling = settings.title_pooling
    if pooling not in POOLINGS:
        raise LayerSelError(f"title_pooling={pooling!r} is not supported; use one of {POOLINGS}.")
    pad_right(tokenizer)
    device = embed_tokens.weight.device
    was_training = backbone.training
    backbone.eval()
    # Under a process group each process encodes its share of the batches (distributed.py).
    encoded = {name: torch.zeros(len(titles), embed_tokens.weight.shape[1]) for name in ("inputs", "prior")}
    batches = my_batches(len(titles), batch_size) if data_parallel else \
        [(start, min(start + batch_size, len(titles))) for start in range(0, len(titles), batch_size)]
    for start, stop in tqdm(batches, desc="encode titles", unit="batch", disable=not show_progress):
        batch = tokenizer(titles[start:stop], padding=True, truncation=True,
                          max_length=settings.title_max_tokens, return_tensors="pt").to(device)
        token_inputs = embed_tokens(batch["input_ids"])
        encoded["inputs"][start:stop] = pool(token_inputs, batch["attention_mask"], "mean").float().cpu()
        hidden = backbone(token_inputs.to(backbone.dtype), attention_mask=batch["attention_mask"])
        encoded["prior"][start:stop] = pool(hidden, batch["attention_mask"], pooling).float().cpu()
    backbone.train(was_training)
    if data_parallel:
        encoded = {name: all_reduce_sum(tensor) for name, tensor in encoded.items()}
    for name in encoded:  # RecBole's padding item 0 has no title
        encoded[name][0] = 0
    return encoded


def pad_right(tokenizer) -> None:
    """Pad titles on the right; GPT-2 style tokenizers have no pad token (padding is masked anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Hidden states (B, T, H) of right-padded titles pooled to (B, H): the mean over their tokens, or
    the last token's."""
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    last = (attention_mask.sum(1) - 1).clamp(min=0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def cached_title_embeddings(cache_dir: Path, key: dict, compute) -> dict[str, torch.Tensor]:
    """``compute()``'s result, kept in the stage cache under ``cache_dir`` and reused while the key
    (model, kept layers and bridges, dataset, titles, code and the fields of
    `TitleSettings`) is unchanged."""
    cache = StageCache(cache_dir)
    cached = from_main(lambda: cache.load_tensors("title_embeddings", key))  # all agree on a hit
    if cached is not None:
        logger.info("Reusing title embeddings from %s", cache.path("title_embeddings", key, ".safetensors"))
        return cached
    encoded = compute()
    if is_main():
        cache.save_tensors("title_embeddings", key, encoded)
    return encoded
