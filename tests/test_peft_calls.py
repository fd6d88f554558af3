"""The PEFT calls people use beyond get_peft_model: merge_and_unload, disable_adapter, safe_merge; equal to PEFT."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch

import peft_edu
from parity import (copy_peft_into_ours, forward, has_adapter_parts, make_pair, peft_trainable, randomize_trainable,
                    trainable)

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")

LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"])


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_and_unload_gives_the_plain_merged_model_as_peft(tiny_model, tiny_batch, use_dora):
    base, batch = tiny_model("bert_cls"), tiny_batch("bert_cls")
    ours, theirs = make_pair(base, "LoraConfig", task_type="SEQ_CLS", use_dora=use_dora, **LORA)
    randomize_trainable(theirs)
    copy_peft_into_ours(theirs, ours)
    expected = forward(ours, batch)
    plain = peft_edu.merge_and_unload(ours)
    merged_peft = theirs.merge_and_unload()
    assert not has_adapter_parts(plain) and not hasattr(plain, "peft_edu_config")
    assert type(plain.classifier) is torch.nn.Linear  # the trained head, as PEFT keeps it
    torch.testing.assert_close(forward(plain, batch), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(forward(plain, batch), forward(merged_peft, batch), atol=1e-5, rtol=1e-4)
    assert set(plain.state_dict()) == set(base.state_dict())
    assert all(p.requires_grad for p in plain.parameters())


def test_merge_and_unload_refuses_what_cannot_merge_and_changes_nothing(tiny_model, tiny_batch):
    base, batch = tiny_model("bert"), tiny_batch("bert")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.SeqBnConfig())
    expected = forward(model, batch)
    with pytest.raises(NotImplementedError, match="nothing was merged.*cannot be merged"):
        peft_edu.merge_and_unload(model)
    assert has_adapter_parts(model) and hasattr(model, "peft_edu_config")
    torch.testing.assert_close(forward(model, batch), expected)
    prompt = peft_edu.get_peft_model(tiny_model("llama"), peft_edu.PromptTuningConfig(num_virtual_tokens=3,
                                                                                       task_type="CAUSAL_LM"))
    with pytest.raises(TypeError, match="nothing to merge"):
        peft_edu.merge_and_unload(prompt)


@pytest.mark.parametrize("kind, method, config", [
    ("bert_cls", "LoraConfig", dict(task_type="SEQ_CLS", **LORA)),
    ("bert", "IA3Config", dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])),
    ("llama", "PrefixTuningConfig", dict(num_virtual_tokens=3, task_type="CAUSAL_LM")),
    ("llama", "PromptTuningConfig", dict(num_virtual_tokens=3, task_type="CAUSAL_LM")),
], ids=["lora-head", "ia3", "prefix", "prompt"])
def test_disable_adapter_computes_the_base_model_as_peft_does(tiny_model, tiny_batch, kind, method, config):
    base, batch = tiny_model(kind), tiny_batch(kind)
    ours, theirs = make_pair(base, method, **config)
    randomize_trainable(theirs)
    copy_peft_into_ours(theirs, ours)
    adapted = forward(ours, batch)
    with peft_edu.disable_adapter(ours) as same, theirs.disable_adapter():
        assert same is ours and not has_adapter_parts(ours)
        torch.testing.assert_close(forward(ours, batch), forward(theirs, batch))
        torch.testing.assert_close(forward(ours, batch), forward(base, batch))
    torch.testing.assert_close(forward(ours, batch), adapted)
    assert has_adapter_parts(ours)


def test_disable_adapter_on_a_merged_model_and_after_an_error(tiny_model, tiny_batch):
    base, batch = tiny_model("bert"), tiny_batch("bert")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(**LORA))
    randomize_trainable(model)
    adapted = forward(model, batch)
    peft_edu.merge(model)
    with pytest.raises(KeyError):
        with peft_edu.disable_adapter(model):
            torch.testing.assert_close(forward(model, batch), forward(base, batch), atol=1e-5, rtol=1e-4)
            raise KeyError("the block failed")
    assert all(layer.merged for layer in model.modules() if isinstance(layer, peft_edu.LoraLinear))
    torch.testing.assert_close(forward(model, batch), adapted, atol=1e-5, rtol=1e-4)


def test_safe_merge_refuses_non_finite_weights_and_keeps_w0(tiny_model):
    base = tiny_model("bert")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(**LORA))
    randomize_trainable(model)
    layers = [m for m in model.modules() if isinstance(m, peft_edu.LoraLinear)]
    with torch.no_grad():
        layers[1].lora_B.weight[0, 0] = math.inf
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match="safe_merge: the merged weight has NaN or infinite values"):
        peft_edu.merge(model, safe_merge=True)
    assert not any(layer.merged for layer in layers)
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=1e-5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA))
    with torch.no_grad():
        next(m for m in theirs.modules() if isinstance(m, peft.tuners.lora.Linear)).lora_B["default"].weight[0, 0] = math.inf
    with pytest.raises(ValueError):  # PEFT refuses it too
        theirs.merge_adapter(safe_merge=True)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_init_lora_weights_draws_what_peft_draws(tiny_model, tiny_batch, init, use_dora):
    base, batch = tiny_model("bert"), tiny_batch("bert")
    ours, theirs = make_pair(base, "LoraConfig", init_lora_weights=init, use_dora=use_dora, **LORA)
    mine, peft_own = trainable(ours), peft_trainable(theirs)
    assert mine.keys() == peft_own.keys()
    for name, tensor in mine.items():
        torch.testing.assert_close(tensor, peft_own[name], msg=name)
    starts_at_base = torch.allclose(forward(ours, batch), forward(base, batch), atol=1e-5)
    assert starts_at_base is (init is not False)  # False: A and B both random, ΔW ≠ 0


def test_init_lora_weights_that_change_the_base_are_refused_at_creation():
    with pytest.raises(ValueError, match="init_lora_weights='corda' is not supported.*convert it to plain LoRA"):
        peft_edu.LoraConfig(**LORA, init_lora_weights="corda")
