"""Gradient checkpointing works with every method of the course (see ``peft_edu/checkpointing.py``).

For each method, the gradients of every trainable tensor with transformers' gradient checkpointing on, in both
of torch's modes (``use_reentrant`` True, transformers' default, and False), equal the gradients without it.
Before peft_edu mended it, reentrant checkpointing gave LoRA, DoRA, IA³ and the adapters no gradient at all
(the frozen embeddings' output does not require grad) and prefix tuning lost its prefix (checkpointed layers
drop the cache that carries it).
"""

from __future__ import annotations

import copy

import pytest
import torch

import peft_edu
from parity import build_batch, build_tiny, forward_backward

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")

METHODS = {
    "lora": ("llama", lambda: peft_edu.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "dora": ("llama", lambda: peft_edu.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True)),
    "ia3": ("bert", lambda: peft_edu.IA3Config(target_modules=["key", "value", "output.dense"],
                                               feedforward_modules=["output.dense"])),
    "houlsby": ("bert", peft_edu.DoubleSeqBnConfig),
    "pfeiffer": ("llama", peft_edu.SeqBnConfig),
    "parallel": ("bert", peft_edu.ParBnConfig),
    "prefix_causal_lm": ("llama", lambda: peft_edu.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "p_tuning_v2_seq_cls": ("bert_cls", lambda: peft_edu.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3,
                                                                            prefix_projection=True)),
    "prompt_tuning": ("llama", lambda: peft_edu.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "mix_and_match": ("bert", lambda: peft_edu.MAMConfig(task_type="FEATURE_EXTRACTION")),
    "lora_seq_cls": ("bert_cls", lambda: peft_edu.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")),
}


def adapted(kind: str, make_config, seed: int = 1):
    """A tiny model with the method, its trainable tensors moved off their initial values (so that, e.g.,
    LoRA's B = 0 does not hide a missing gradient of A), in training mode without dropout."""
    model = peft_edu.get_peft_model(build_tiny(kind, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
                                    if kind.startswith("bert") else build_tiny(kind), make_config())
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    return model.train()


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("method", list(METHODS))
def test_gradients_with_checkpointing_equal_gradients_without(method, use_reentrant):
    kind, make_config = METHODS[method]
    batch = build_batch(kind)
    plain = adapted(kind, make_config)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert checkpointed.is_gradient_checkpointing

    expected, actual = forward_backward(plain, batch), forward_backward(checkpointed, batch)

    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-6, atol=1e-7)
    assert expected.grads.keys() == actual.grads.keys()
    for name, grad in expected.grads.items():
        assert grad is not None and grad.abs().sum() > 0, f"{name}: no gradient even without checkpointing"
        assert actual.grads[name] is not None, f"{name}: no gradient under checkpointing (use_reentrant={use_reentrant})"
        torch.testing.assert_close(actual.grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_turned_on_before_the_adapter_also_works():
    """The order of Trainer's own calls is the other one; both work (prefix tuning was refused before)."""
    kind, make_config = METHODS["prefix_causal_lm"]
    batch = build_batch(kind)
    expected = forward_backward(adapted(kind, make_config), batch)
    base = build_tiny(kind)
    base.gradient_checkpointing_enable()  # transformers' default mode: reentrant
    model = peft_edu.get_peft_model(base, make_config())
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    actual = forward_backward(model.train(), batch)
    for name, grad in expected.grads.items():
        torch.testing.assert_close(actual.grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_prefix_reaches_every_checkpointed_layer():
    """Each checkpointed layer attends over n + T keys: the prefix is not dropped (and the page would not lie)."""
    kind, make_config = METHODS["prefix_causal_lm"]
    model = adapted(kind, make_config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = build_batch(kind)
    seen = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, kw, out: seen.append(out[1].shape[-1]), with_kwargs=True)
             for layer in model.model.layers]
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = "eager"  # returns the attention weights: (…, T, n + T)
    model(**batch)
    for hook in hooks:
        hook.remove()
    assert seen == [3 + batch["input_ids"].shape[1]] * len(model.model.layers)


def test_evaluation_and_no_grad_are_untouched():
    """The hook acts only while training with checkpointing on: eval mode and torch.no_grad() keep the embeddings'
    output as it is, and unload takes the hook away."""
    kind, make_config = METHODS["lora"]
    model = adapted(kind, make_config)
    model.gradient_checkpointing_enable()
    embeddings = model.get_input_embeddings()
    outputs = []
    handle = embeddings.register_forward_hook(lambda m, a, out: outputs.append(out.requires_grad))
    batch = build_batch(kind)
    model(**batch)
    model.eval()
    model(**batch)
    with torch.no_grad():
        model.train()(**batch)
    handle.remove()
    assert outputs == [True, False, False]
    peft_edu.unload(model)
    assert not embeddings._forward_hooks, "unload left peft_edu's checkpointing hook on the embeddings"
