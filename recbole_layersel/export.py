"""Export a trained LayerSelLLM's compact model alone, and load it back without the full LLM or pickles.

    <dir>/model.safetensors   every tensor of the CompactRecommender: kept layers, bridges, head, item
                              vectors, title embeddings (and LoRA adapters, when trained with LoRA)
    <dir>/layersel.json       source model, selection, backbone config, sizes, LoRA settings; the
                              dataset's item ids, titles and training counts in the model's internal
                              order; each user's history (dataset ids, oldest first)

The directory is built beside its destination and renamed into place, so a crash never leaves a
half-written export where a complete one is expected.
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CONFIG_MAPPING

from recbole_layersel.backbone import CompactBackbone
from recbole_layersel.compact import CompactRecommender, HeadConfig, add_lora
from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import write_folder

FORMAT = "recbole_layersel.compact/3"  # 3: ID + text item vectors under a SASRec head
WEIGHTS_NAME, META_NAME = "model.safetensors", "layersel.json"


def export_compact(model, directory: str | Path) -> Path:
    """Write ``model`` (a LayerSelLLM) to ``directory`` as safetensors + JSON; returns the directory."""
    if model.quantized:
        raise LayerSelError(
            "quantize=int8 models cannot be exported: their int8 layers hold packed weights, not tensors. "
            "Export the float model (drop quantize) and quantise it where it is served."
        )
    compact, backbone = model.compact, model.compact.backbone
    meta = {
        "format": FORMAT,
        "llm_path": model.llm_path,
        "family": backbone.family,
        "selected_layers": backbone.selected_layers,
        "num_source_layers": backbone.num_source_layers,
        "bridges": [bridge.kind for bridge in backbone.bridges],
        "mlp_bridges": any(bridge.kind == "mlp" for bridge in backbone.bridges),
        "bridge_rank": backbone.bridge_rank,
        "backbone_config": backbone.config.to_dict(),
        "dtype": str(backbone.dtype).removeprefix("torch."),
        "head": asdict(compact.head_config),
        "lora": model.lora_settings if model.train_mode == "lora" else None,
        "item_field": model.ITEM_ID,
        "item_ids": model.item_tokens,
        "titles": model.item_title_texts,
        "item_counts": model.item_counts,
        "user_histories": model.user_histories,
    }
    directory = Path(directory).resolve()

    def write(staging: Path) -> None:
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in compact.state_dict().items()}
        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": FORMAT})
        (staging / META_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    write_folder(directory, write, META_NAME)
    return directory


def load_compact(directory: str | Path) -> tuple[CompactRecommender, dict]:
    """The exported CompactRecommender (eval mode) and its metadata; needs neither the LLM nor pickles."""
    directory = Path(directory)
    meta_path, weights_path = directory / META_NAME, directory / WEIGHTS_NAME
    if not (meta_path.is_file() and weights_path.is_file()):
        raise LayerSelError(
            f"{directory} is not a compact-model export: it needs {META_NAME} and {WEIGHTS_NAME}. "
            "Create one with recbole_layersel.export.export_compact(model, directory)."
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise LayerSelError(f"{meta_path} has format {meta.get('format')!r}; this version reads {FORMAT!r}.")
    config_dict = dict(meta["backbone_config"])
    config = CONFIG_MAPPING[config_dict.pop("model_type")].from_dict(config_dict)
    backbone = CompactBackbone.from_compact_config(
        config, meta["selected_layers"], meta["num_source_layers"], meta["mlp_bridges"],
        meta["bridge_rank"])
    backbone.to(getattr(torch, meta["dtype"]))
    state = load_file(weights_path)
    compact = CompactRecommender(backbone, state["title_inputs"], state["title_prior"],
                                 HeadConfig(**meta["head"]))
    if meta["lora"]:
        add_lora(backbone, **meta["lora"])
    compact.load_state_dict(state, strict=True)
    return compact.eval(), meta
