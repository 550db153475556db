"""Tiny random models of every supported family, built from configs (nothing is downloaded)."""

import torch
from transformers import (
    AutoModel,
    BertConfig,
    BertTokenizer,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
)

HIDDEN = 32
NUM_LAYERS = 6
SEQ_LEN = 8
SLIDING_WINDOW = 3  # shorter than SEQ_LEN, so sliding-window layers see less than full-attention ones
DECODER = dict(
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    max_position_embeddings=64,
)
GEMMA3_TEXT = dict(
    DECODER,
    head_dim=8,
    sliding_window=SLIDING_WINDOW,
    layer_types=["sliding_attention", "full_attention"] * (NUM_LAYERS // 2),
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**DECODER),
    # Layers from index 2 on use a sliding window.
    "qwen2": lambda: Qwen2Config(
        **DECODER, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=2
    ),
    "qwen3": lambda: Qwen3Config(**DECODER, head_dim=8),
    "gemma": lambda: GemmaConfig(**DECODER, head_dim=8),
    "gemma3_text": lambda: Gemma3TextConfig(**GEMMA3_TEXT),
    "gemma3": lambda: Gemma3Config(
        text_config=dict(GEMMA3_TEXT, vocab_size=300),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
        boi_token_index=297,
        eoi_token_index=298,
        image_token_index=299,
    ),
    "gpt2": lambda: GPT2Config(
        n_embd=HIDDEN,
        n_layer=NUM_LAYERS,
        n_head=4,
        vocab_size=100,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "bert": lambda: BertConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=64,
    ),
}


def save_tiny_llm(directory, config):
    """A seeded random model of `config` plus a word-level tokenizer for the test titles."""
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(directory)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "item", "number", *map(str, range(20))]
    BertTokenizer(vocab={word: i for i, word in enumerate(words)}).save_pretrained(directory)
    return directory
