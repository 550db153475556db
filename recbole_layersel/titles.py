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
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from recbole_layersel.backbone import CompactBackbone
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
    column = dataset.item_feat[title_field]
    if column.dim() == 1:  # a token column: each title is one token, its whole text
        column = column.unsqueeze(1)
    titles = [" ".join(words[t] for t in row.tolist() if t != 0) for row in column]
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
    pooling = _checked_pooling(settings)
    was_training = backbone.training
    backbone.eval()
    # Under a process group each process encodes its share of the batches (distributed.py).
    encoded = {name: torch.zeros(len(titles), embed_tokens.weight.shape[1]) for name in ("inputs", "prior")}
    batches = my_batches(len(titles), batch_size) if data_parallel else _spans(len(titles), batch_size)
    title_batches = _title_batches(tokenizer, titles, settings.title_max_tokens, batches,
                                   embed_tokens.weight.device)
    for rows, token_ids, mask in tqdm(title_batches, desc="encode titles", unit="batch", total=len(batches),
                                      disable=not show_progress):
        token_inputs = embed_tokens(token_ids)
        encoded["inputs"][rows] = pool(token_inputs, mask, "mean").float().cpu()
        hidden = backbone(token_inputs.to(backbone.dtype), attention_mask=mask)
        encoded["prior"][rows] = pool(hidden, mask, pooling).float().cpu()
    backbone.train(was_training)
    if data_parallel:
        encoded = {name: all_reduce_sum(tensor) for name, tensor in encoded.items()}
    for name in encoded:  # RecBole's padding item 0 has no title
        encoded[name][0] = 0
    return encoded


class TitlePriors:
    """``priors(layers) -> (n, H)``: ``encode_titles``'s prior of every title (on the CPU, row 0 zero)
    through a set of the source model's layers joined by identity bridges, the bridges' start: the layers
    run one after the other. So are the greedy search's candidate sets, and they share their lower layers:
    the titles' states after each run of layers are kept, and a set runs only the layers above its longest
    kept prefix. Beyond ``cache_bytes`` the least recently used states are dropped, those after the
    prefixes of the ``retain``ed sets last. The titles are tokenised on the first call."""

    def __init__(self, llm, tokenizer, titles: list[str], settings: TitleSettings, *, batch_size: int,
                 cache_bytes: int = 2**31):
        _checked_pooling(settings)
        num_layers = getattr(llm.config, "text_config", llm.config).num_hidden_layers
        self.full = CompactBackbone(llm, list(range(num_layers))).eval()
        self.embed_tokens, self.tokenizer, self.titles = llm.get_input_embeddings(), tokenizer, titles
        self.settings, self.batch_size, self.cache_bytes = settings, batch_size, cache_bytes
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]] = []
        self.kept: OrderedDict[tuple[int, ...], list[torch.Tensor]] = OrderedDict()
        self.retained: set[tuple[int, ...]] = set()

    def retain(self, sets: list[list[int]]) -> None:
        """Keep the states after every prefix of ``sets`` over any others: the greedy search's beam, which
        every candidate of its next step extends (one layer added, below or above its layers)."""
        self.retained = {tuple(sorted(layers)[:n]) for layers in sets for n in range(1, len(layers) + 1)}

    @torch.no_grad()
    def __call__(self, layers: list[int]) -> torch.Tensor:
        layers = sorted(layers)
        batches = self.batches or self._tokenised()
        done = next((n for n in range(len(layers), 0, -1) if tuple(layers[:n]) in self.kept), 0)
        states = [hidden for _, _, hidden, _ in batches]
        if done:
            states = self.kept[tuple(layers[:done])]
            self.kept.move_to_end(tuple(layers[:done]))  # used again: dropped last
        for n in range(done, len(layers)):
            states = [self.full.run_layer(layers[n], hidden, context)
                      for hidden, (_, _, _, context) in zip(states, batches, strict=True)]
            self._keep(tuple(layers[:n + 1]), states)
        prior = torch.zeros(len(self.titles), self.full.config.hidden_size)
        for hidden, (rows, mask, _, _) in zip(states, batches, strict=True):
            prior[rows] = pool(self.full.norm(hidden), mask, self.settings.title_pooling).float().cpu()
        prior[0] = 0  # RecBole's padding item has no title
        return prior

    def _tokenised(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]]:
        """Per batch of titles of about one length: their rows, attention mask, the first layer's input
        and the layers' context."""
        spans = _spans(len(self.titles), self.batch_size)
        device = self.embed_tokens.weight.device
        for rows, token_ids, mask in _title_batches(self.tokenizer, self.titles,
                                                    self.settings.title_max_tokens, spans, device):
            inputs = self.embed_tokens(token_ids).to(self.full.dtype)
            self.batches.append((rows, mask, *self.full.prepare(inputs, mask)))
        return self.batches

    def _keep(self, layers: tuple[int, ...], states: list[torch.Tensor]) -> None:
        self.kept[layers] = states
        while len(self.kept) > 1 and sum(hidden.nbytes for kept in self.kept.values()
                                         for hidden in kept) > self.cache_bytes:
            others = [key for key in self.kept if key != layers]  # the latest states stay
            del self.kept[next((key for key in others if key not in self.retained), others[0])]


def _checked_pooling(settings: TitleSettings) -> str:
    if settings.title_pooling not in POOLINGS:
        raise LayerSelError(f"title_pooling={settings.title_pooling!r} is not supported; use one of "
                            f"{POOLINGS}.")
    return settings.title_pooling


def _spans(count: int, batch_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def _title_batches(tokenizer, titles: list[str], max_tokens: int, spans, device):
    """(rows, token ids, attention mask) of each (start, stop) span of the titles taken from fewest to most
    tokens: so batched, titles are padded to about their own length (batched as given, ml-100k's titles
    would be 3.4 times their tokens). Right-padded, truncated to ``max_tokens``."""
    pad_right(tokenizer)
    lengths = [len(ids) for ids in tokenizer(titles, truncation=True, max_length=max_tokens)["input_ids"]]
    order = torch.tensor(sorted(range(len(titles)), key=lengths.__getitem__), dtype=torch.long)
    for start, stop in spans:
        rows = order[start:stop]
        batch = tokenizer([titles[row] for row in rows], padding=True, truncation=True, max_length=max_tokens,
                          return_tensors="pt").to(device)
        yield rows, batch["input_ids"], batch["attention_mask"]


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
