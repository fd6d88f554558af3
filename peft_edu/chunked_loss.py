"""A causal language model's loss without the whole batch's logits: the cross-entropy over the vocabulary in chunks.

A language model ends by turning each position's hidden state (d numbers) into logits over the vocabulary (V
numbers: SmolLM2 has d = 576 and V = 49,152) and taking the cross-entropy with the next token. transformers does it
for all N positions of a batch at once, and in float32 (its ``ForCausalLMLoss`` upcasts the logits): forward keeps
the N × V logits and their float32 log-softmax for backward, and backward allocates N × V gradients on top. For 8
rows of 64 tokens on SmolLM2 that is about 300 MB, nearly half of a bfloat16 QLoRA step's peak
(``benchmarks/qlora_bench.py``): at that size the loss, more than the 4-bit base, sets what a step needs.

``chunked_causal_lm_loss`` (``head_loss_in_chunks`` once the hidden states are there) sends ``chunk_tokens``
positions at a time through the head and the loss, each chunk under activation checkpointing: forward keeps only
the chunk's summed loss, and backward recomputes that chunk's logits, takes their gradient and frees them before
the next chunk. What the loss needs falls to one chunk's share. The price is a second pass through the head,
2·N·d·V more FLOPs: about a tenth of a SmolLM2 step's (the head holds a fifth of its weights), and 2-7 % more step
time in ``benchmarks/qlora_bench.py``'s run 5. The value and every gradient are transformers' (the mean over the
positions whose next token is not -100, in float32), up to the order of a sum; tests/test_chunked_loss.py checks
both against ``model(input_ids, labels=labels).loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # transformers' label for "no loss here" (padding, or a prompt's tokens)


def _causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the decoder that gives the last hidden states, the output head) of a transformers causal LM, bare, with
    peft_edu's adapters injected, or wrapped in PEFT's PeftModel; a clear error for anything else."""
    config = getattr(model, "peft_config", None)  # PEFT's PeftModel: the transformers model is inside
    if isinstance(config, dict) and hasattr(model, "get_base_model"):
        if any(getattr(c, "is_prompt_learning", False) for c in config.values()):
            raise ValueError("chunked_causal_lm_loss cannot see a prompt-learning adapter's virtual tokens (PEFT adds "
                             "them in PeftModel.forward); compute this model's loss with model(**batch).loss.")
        model = model.get_base_model()
    if getattr(getattr(model, "peft_edu_config", None), "is_prompt_learning", False):
        raise ValueError("chunked_causal_lm_loss cannot see a prompt-learning adapter's virtual tokens (peft_edu adds "
                         "them in the model's forward); compute this model's loss with model(**batch).loss.")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, "base_model", model)
    if head is None or decoder is model:
        raise TypeError(f"chunked_causal_lm_loss needs a transformers causal language model (one with an output head "
                        f"and a decoder under it, such as AutoModelForCausalLM gives), not {type(model).__name__}.")
    for name in ("final_logit_softcapping", "logit_scale"):  # Gemma 2, Cohere: the logits are not just head(h)
        if getattr(model.config, name, None) is not None:
            raise ValueError(f"{type(model).__name__} transforms its logits after the head (config.{name} = "
                             f"{getattr(model.config, name)}), which chunked_causal_lm_loss does not; compute this "
                             "model's loss with model(**batch).loss.")
    return decoder, head


def chunked_causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                           attention_mask: torch.Tensor | None = None, chunk_tokens: int = 128) -> torch.Tensor:
    """transformers' causal-LM loss of ``model`` on the batch, computed ``chunk_tokens`` positions at a time.

    Use it in place of ``model(input_ids=..., attention_mask=..., labels=...).loss``: same value, same gradients,
    one chunk's logits in memory instead of the batch's.
    """
    _check_chunk_tokens(chunk_tokens)
    for name, tensor in (("input_ids", input_ids), ("labels", labels)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.dtype != torch.long:
            raise ValueError(f"{name} must be a 2-d torch.long tensor (batch × sequence of token ids), not "
                             f"{getattr(tensor, 'dtype', type(tensor).__name__)} of shape "
                             f"{tuple(getattr(tensor, 'shape', ()))}.")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids {tuple(input_ids.shape)}: give one "
                         f"label per token (transformers shifts them itself; {IGNORE_INDEX} where no loss is wanted).")
    decoder, head = _causal_lm_parts(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head_loss_in_chunks(hidden, head, labels, chunk_tokens)


def head_loss_in_chunks(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                        chunk_tokens: int = 128) -> torch.Tensor:
    """The mean next-token cross-entropy of ``head(hidden)`` against ``labels`` (batch × sequence, unshifted, as
    transformers takes them), ``chunk_tokens`` positions at a time, each chunk's logits recomputed in backward."""
    _check_chunk_tokens(chunk_tokens)
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}, labels {tuple(labels.shape)}: one label per "
                         "position (hidden is batch × sequence × width).")
    # position t predicts token t + 1; the last position predicts nothing (transformers' shift, padded with -100)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])

    def chunk_loss_sum(hidden_chunk: torch.Tensor, target_chunk: torch.Tensor) -> torch.Tensor:
        logits = head(hidden_chunk).float()  # float32, as ForCausalLMLoss computes it
        return F.cross_entropy(logits, target_chunk, ignore_index=IGNORE_INDEX, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        total = total + checkpoint(chunk_loss_sum, hidden[rows], targets[rows], use_reentrant=False)
    return total / (targets != IGNORE_INDEX).sum()


def _check_chunk_tokens(chunk_tokens) -> None:
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int (positions per chunk, e.g. 128), not {chunk_tokens!r}.")
