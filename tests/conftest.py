"""Shared fixtures: tiny seeded models and padded batches, small enough for 2 CPU cores.

Each factory builds a fresh model from a seed, so a test can build the base once and deepcopy it
for peft_edu and for Hugging Face PEFT, which then start from identical weights.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

torch.set_num_threads(2)

VOCAB = 100
PAD_ID = 0
NUM_LABELS = 3


def tiny_bert_config(hidden_size: int = 32, **overrides) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, pad_token_id=PAD_ID,
                      num_labels=NUM_LABELS, **overrides)


def tiny_llama_config(hidden_size: int = 32, **overrides) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD_ID,
                       num_labels=NUM_LABELS, **overrides)


# kind -> (config factory, model class, task family)
KINDS = {
    "bert": (tiny_bert_config, BertModel, "features"),
    "bert_cls": (tiny_bert_config, BertForSequenceClassification, "cls"),
    "llama": (tiny_llama_config, LlamaForCausalLM, "lm"),
    "llama_cls": (tiny_llama_config, LlamaForSequenceClassification, "cls"),
}


def build_tiny(kind: str, seed: int = 0, hidden_size: int = 32, **config_overrides) -> torch.nn.Module:
    """A freshly initialised tiny model (see KINDS), in eval mode, same weights for the same seed."""
    make_config, cls, _ = KINDS[kind]
    torch.manual_seed(seed)
    return cls(make_config(hidden_size, **config_overrides)).eval()


def build_batch(kind: str, batch: int = 3, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch (rows 1 and 2 end in padding) with labels that fit ``kind``."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for row, length in ((1, seq - 3), (2, seq // 2)):
        if row < batch:
            attention_mask[row, length:] = 0
    input_ids[attention_mask == 0] = PAD_ID
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    family = KINDS[kind][2]
    if family == "cls":
        out["labels"] = torch.randint(0, NUM_LABELS, (batch,), generator=g)
    elif family == "lm":
        out["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    return out


@pytest.fixture
def tiny_model():
    """``tiny_model(kind, seed=0, hidden_size=32, **config_overrides)``; kinds: bert, bert_cls, llama, llama_cls."""
    return build_tiny


@pytest.fixture
def tiny_batch():
    """``tiny_batch(kind, batch=3, seq=8, seed=0)``: input_ids, attention_mask with zeros, labels."""
    return build_batch
