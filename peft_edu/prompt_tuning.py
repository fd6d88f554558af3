r"""Prompt tuning (Lester, Al-Rfou & Constant, arXiv 2104.08691): a trainable soft prompt in front of the input.

The frozen model reads n trainable vectors P ∈ ℝ^{n×d} (d = the hidden size) before the embedded input:

    X' = [P ; E(x₁), …, E(x_T)] ∈ ℝ^{(n+T)×d},       mask' = [1ⁿ ; mask],       labels' = [-100ⁿ ; labels]

and everything downstream is the unchanged model on n + T positions. Unlike prefix tuning (which gives
every layer its own keys and values), P exists only at the input; deeper layers see it only through what
attention makes of it. n·d parameters, e.g. 20 × 576 = 11,520 for SmolLM2-135M. The paper's finding:
the gap to full fine-tuning closes as the model grows past ~10B parameters.

Initialisation (``prompt_tuning_init``, as PEFT):
* ``"RANDOM"``: ``nn.Embedding``'s N(0, 1), which for most models lies far off the word-embedding manifold;
* ``"SAMPLE_VOCAB"``: the embeddings of n token ids drawn uniformly from the vocabulary;
* ``"TEXT"``: the embeddings of ``prompt_tuning_init_text`` tokenised (special tokens included, as the
  tokenizer's ``__call__`` adds them), repeated or cut to n tokens. ``tokenizer_name_or_path`` may be a
  tokenizer object or a local folder (read with ``local_files_only=True`` unless ``tokenizer_kwargs`` say
  otherwise). In inference mode (a loaded adapter) no initialisation is done: the file supplies P.

How it gets into the model (``virtual_tokens.py``): a forward pre-hook on the model itself (the labels are
an argument of the top-level forward) replaces ``input_ids`` by ``inputs_embeds = [P; E(input_ids)]``,
prepends n ones to the attention mask and n × -100 to CAUSAL_LM labels (the virtual positions predict
nothing), and n zeros to SEQ_CLS ``token_type_ids``; ``position_ids`` (and ``cache_position``) are dropped so
the model counts positions over all n + T inputs, and ``token_type_ids`` are dropped for the other tasks,
both as PEFT does. Outputs therefore have n + T positions (logits, hidden states), as with PEFT.

Two consequences of matching PEFT that are worth knowing:
* With left padding the real tokens' positions count the pads (position_ids derived from the mask are
  dropped), so a left-padded row is not exactly the same computation as the row alone. Right padding is
  exact for causal LMs.
* Decoder classifiers (``LlamaForSequenceClassification``) then get no ``input_ids``, so transformers cannot find
  the last non-pad token and pools the last position, which with right padding is a pad (it warns). Use left
  padding there.
* ``generate()`` works through the same hook: on the first step (empty cache) the prompt goes in front of
  the input embeddings; later steps find it in the cache. The generated ids do not include the n virtual
  tokens (transformers returns the prompt ids it was given plus the new ones).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .registry import register_method
from .virtual_tokens import (
    BasePromptEncoder,
    PromptLearningConfig,
    batch_size_of,
    cache_is_empty,
    drop_with_warning,
    extend_attention_mask,
    resolve_config,
)

PROMPT_TUNING_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (arXiv 2104.08691): n trainable input embeddings in front of the input; see ``peft_edu.prompt_tuning``.

    prompt_tuning_init: "RANDOM" (N(0, 1), PEFT's default), "SAMPLE_VOCAB" (embeddings of random vocabulary tokens)
        or "TEXT" (embeddings of ``prompt_tuning_init_text``, repeated or cut to n tokens). PEFT's
        ``PromptTuningInit`` members are accepted too.
    tokenizer_name_or_path: for "TEXT": a tokenizer object or a local folder (read offline, ``local_files_only=True``,
        unless tokenizer_kwargs say otherwise). tokenizer_kwargs: passed to ``AutoTokenizer.from_pretrained``.
    """

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: object = None
    tokenizer_kwargs: dict | None = None

    peft_type = "PROMPT_TUNING"

    def __post_init__(self):
        super().__post_init__()
        init = self.prompt_tuning_init
        self.prompt_tuning_init = init = getattr(init, "value", init)  # PEFT's PromptTuningInit is a str enum
        if init not in PROMPT_TUNING_INITS:
            raise ValueError(f"prompt_tuning_init={init!r}: one of {PROMPT_TUNING_INITS}.")
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a tokenizer object or a local folder).")
        if init == "TEXT" and not isinstance(self.prompt_tuning_init_text, str):
            raise ValueError(f"prompt_tuning_init='TEXT' needs prompt_tuning_init_text, not {self.prompt_tuning_init_text!r}.")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ValueError("tokenizer_kwargs are used only with prompt_tuning_init='TEXT' (PEFT's rule).")

    def to_peft_dict(self) -> dict:
        tokenizer = self.tokenizer_name_or_path
        if tokenizer is not None and not isinstance(tokenizer, str):  # a tokenizer object: write where it came from
            return dataclasses.replace(self, tokenizer_name_or_path=getattr(tokenizer, "name_or_path", None) or
                                       type(tokenizer).__name__).to_peft_dict()
        return super().to_peft_dict()


def load_tokenizer(config: PromptTuningConfig):
    tokenizer = config.tokenizer_name_or_path
    if not isinstance(tokenizer, str):
        return tokenizer  # a tokenizer object
    from transformers import AutoTokenizer

    kwargs = {"local_files_only": True, **(config.tokenizer_kwargs or {})}
    kwargs.pop("trust_remote_code", None)  # as PEFT: loading an adapter must not run remote code
    return AutoTokenizer.from_pretrained(tokenizer, **kwargs)


def init_token_ids(config: PromptTuningConfig, vocab_size: int) -> torch.Tensor | None:
    """The token ids whose embeddings start P (None: RANDOM), drawn/tokenised exactly as PEFT does."""
    n = config.num_virtual_tokens
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (n,), dtype=torch.long)
    if config.prompt_tuning_init == "TEXT":
        ids = list(load_tokenizer(config)(config.prompt_tuning_init_text)["input_ids"])
        if not ids:
            raise ValueError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenises to no tokens.")
        ids = (ids * math.ceil(n / len(ids)))[:n]  # repeat, then cut to n
        return torch.tensor(ids, dtype=torch.long)
    return None


class PromptEmbedding(BasePromptEncoder):
    """The soft prompt: ``forward()`` gives P, shape (n, d) (PEFT's ``PromptEmbedding``, same parameter name)."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding):
        super().__init__(config)
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)  # RANDOM: N(0, 1)
        if not config.inference_mode:
            ids = init_token_ids(config, word_embeddings.num_embeddings)
            if ids is not None:
                with torch.no_grad():
                    self.embedding.weight.copy_(word_embeddings(ids.to(word_embeddings.weight.device)).float())

    def forward(self) -> torch.Tensor:
        return self.embedding.weight

    def hook_target(self, model: nn.Module) -> nn.Module:
        return model

    def rewrite(self, module: nn.Module, kwargs: dict) -> dict:
        n = self.num_virtual_tokens
        batch_size = batch_size_of(kwargs)
        first_step = cache_is_empty(kwargs.get("past_key_values"))
        extend_attention_mask(kwargs, n, batch_size)
        drop_with_warning(kwargs, "position_ids", "prompt tuning")
        kwargs.pop("cache_position", None)  # the model counts from the cache length: n + T inputs in the first step
        if self.task_type == "SEQ_CLS" and kwargs.get("token_type_ids") is not None:
            ids = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([ids.new_zeros(batch_size, n), ids], dim=1)
        else:
            drop_with_warning(kwargs, "token_type_ids", "prompt tuning for " + str(self.task_type))
        if first_step:
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                embeds = module.get_input_embeddings()(kwargs["input_ids"])
            prompt = self().to(embeds.dtype).unsqueeze(0).expand(batch_size, -1, -1)
            kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
            kwargs["input_ids"] = None
            if self.task_type == "CAUSAL_LM" and kwargs.get("labels") is not None:
                labels = kwargs["labels"]
                kwargs["labels"] = torch.cat([labels.new_full((batch_size, n), -100), labels], dim=1)
        return kwargs


def inject_prompt_tuning(model: nn.Module, configs: list[PromptTuningConfig],
                         in_union: bool = False) -> list[PromptTuningConfig]:
    """Attach a ``PromptEmbedding`` as ``model.prompt_encoder`` and hook the model (see the module docstring).

    Returns the config with the model's dimensions filled in.
    """
    (config,) = configs
    resolved = resolve_config(model, config, key_value_dims=False)
    word_embeddings = model.get_input_embeddings()
    encoder = PromptEmbedding(resolved, word_embeddings).to(word_embeddings.weight.device)
    encoder.attach(model)
    return [resolved]


register_method(PromptTuningConfig, inject_prompt_tuning)
