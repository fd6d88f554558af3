"""chunked_causal_lm_loss: transformers' causal-LM loss and gradients, without the whole batch's logits."""

import copy
import sys
from pathlib import Path

import peft
import pytest
import torch

import peft_edu
from peft_edu import chunked_causal_lm_loss
from peft_edu.chunked_loss import head_loss_in_chunks
from parity import build_batch, build_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import peak_bytes  # noqa: E402 (benchmarks/ is not a package)

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")


def loss_and_grads(model, loss_of):
    """(loss, {name: gradient}) of one backward pass; gradients of every parameter that trains."""
    model.zero_grad(set_to_none=True)
    loss = loss_of(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def reference(model, batch):
    return model(**batch).loss


@pytest.mark.parametrize("chunk_tokens", [1, 5, 8, 24, 1000])  # 24 = every position at once; 5 leaves a partial chunk
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_fine_tuning_loss_and_every_gradient_equal_transformers(chunk_tokens, dtype):
    model = build_tiny("llama", seed=chunk_tokens).to(dtype).train()
    batch = build_batch("llama")  # right-padded, labels -100 on the padding
    batch["labels"][0, :3] = -100  # a prompt whose tokens carry no loss
    theirs = loss_and_grads(model, lambda m: reference(m, batch))
    ours = loss_and_grads(model, lambda m: chunked_causal_lm_loss(m, chunk_tokens=chunk_tokens, **batch))
    assert ours[0].dtype == theirs[0].dtype == torch.float32
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(ours[0], theirs[0], **tolerance)
    assert ours[1].keys() == theirs[1].keys() and "lm_head.weight" in ours[1]  # the head trains too
    for name in theirs[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], **tolerance, msg=name)


@pytest.mark.parametrize("library", ["peft_edu", "PEFT"])
def test_lora_gradients_equal_transformers_loss_through_either_library(library):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    base = build_tiny("llama", seed=3)
    if library == "PEFT":
        model = peft.get_peft_model(base, peft.LoraConfig(**config))
    else:
        model = peft_edu.get_peft_model(base, peft_edu.LoraConfig(**config))
    for p in (p for n, p in model.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(p, std=0.1)  # B = 0 at the start would give A no gradient to compare
    model.train()
    batch = build_batch("llama", batch=4, seq=12)
    theirs = loss_and_grads(model, lambda m: reference(m, batch))
    ours = loss_and_grads(model, lambda m: chunked_causal_lm_loss(m, chunk_tokens=7, **batch))
    torch.testing.assert_close(ours[0], theirs[0])
    assert len(ours[1]) == 12 and ours[1].keys() == theirs[1].keys()
    for name in theirs[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], msg=name)


def test_the_loss_keeps_one_chunks_logits_not_the_batchs():
    # a vocabulary far wider than the model, as in SmolLM2 (576 against 49,152): the loss outweighs the rest
    model = build_tiny("llama", vocab_size=8000).train()
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # a gradient must flow back through the head, and little else trains
    batch = build_batch("llama", batch=4, seq=32)  # 128 positions
    logits_bytes = 128 * 8000 * 4  # one float32 copy of the batch's logits

    def peak(loss_of) -> int:
        model.zero_grad(set_to_none=True)
        return peak_bytes(lambda: loss_of(model).backward())

    whole = peak(lambda m: reference(m, batch))
    assert whole > 2.5 * logits_bytes  # the logits, their float32 log-softmax, then their gradient
    for chunk_tokens in (64, 16):
        chunked = peak(lambda m: chunked_causal_lm_loss(m, chunk_tokens=chunk_tokens, **batch))
        assert chunked < 1.2 * whole * chunk_tokens / 128, chunk_tokens  # one chunk's share, give or take


def test_bad_input_is_refused_with_what_would_be_valid():
    model = build_tiny("llama")
    batch = build_batch("llama")
    for bad in (0, -4, 2.5, True, "128"):
        with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
            chunked_causal_lm_loss(model, chunk_tokens=bad, **batch)
    with pytest.raises(ValueError, match=r"labels has shape \(3, 7\) but input_ids \(3, 8\)"):
        chunked_causal_lm_loss(model, batch["input_ids"], batch["labels"][:, 1:])
    with pytest.raises(ValueError, match="labels must be a 2-d torch.long tensor"):
        chunked_causal_lm_loss(model, batch["input_ids"], batch["labels"].float())
    with pytest.raises(ValueError, match="input_ids must be a 2-d torch.long tensor"):
        chunked_causal_lm_loss(model, batch["input_ids"][0], batch["labels"][0])
    with pytest.raises(TypeError, match="needs a transformers causal language model.*not LlamaModel"):
        chunked_causal_lm_loss(model.model, **batch)
    hidden = torch.randn(3, 8, 32)
    with pytest.raises(ValueError, match=r"hidden has shape \(3, 8, 32\), labels \(3, 7\)"):
        head_loss_in_chunks(hidden, model.lm_head, batch["labels"][:, 1:])
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        head_loss_in_chunks(hidden, model.lm_head, batch["labels"], chunk_tokens=0)
    softcapped = copy.deepcopy(model)
    softcapped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping = 30.0"):
        chunked_causal_lm_loss(softcapped, **batch)


@pytest.mark.parametrize("library", ["peft_edu", "PEFT"])
def test_prompt_learning_models_are_refused_because_their_virtual_tokens_would_be_missed(library):
    config = dict(num_virtual_tokens=4, task_type="CAUSAL_LM")
    base = build_tiny("llama")
    if library == "PEFT":
        model = peft.get_peft_model(base, peft.PromptTuningConfig(**config))
    else:
        model = peft_edu.get_peft_model(base, peft_edu.PromptTuningConfig(**config))
    with pytest.raises(ValueError, match="virtual tokens.*model\\(\\*\\*batch\\).loss"):
        chunked_causal_lm_loss(model, **build_batch("llama"))
