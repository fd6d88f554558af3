"""Stack and Fuse (AdapterFusion) of named bottleneck adapters against AdapterHub's ``adapters`` 1.3.0.

AdapterHub gets adapters "a" and "b" with random weights (and, for Fuse, random fusion weights), saves them with
its own ``save_adapter`` / ``save_adapter_fusion``; peft_edu loads those files as named adapters, composes them the
same way, and must give the same outputs and the same gradients (for every adapter of a Stack; for the fusion
layers only, adapters frozen, with Fuse).
"""

from __future__ import annotations

import copy
import functools
import re
import zlib

import adapters
import pytest
import torch
from adapters.composition import Fuse as HubFuse
from adapters.composition import Stack as HubStack

import peft_edu
from parity import assert_close, forward, loss_of, output_of
from peft_edu.composition import (Fuse, Stack, _bottleneck_parts, add_adapter_fusion, composition_parameters,
                                  load_adapter_fusion, save_adapter_fusion, set_active_adapters)

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")
# (a's config, b's config or None: a's). Pfeiffer with 8 ReLU units, not the default 2 of a 32-wide model: random
# weights can leave 2 units dead for every token, and a zero gradient would prove nothing.
PFEIFFER = functools.partial(adapters.SeqBnConfig, reduction_factor=4)
PRESETS = {"seq_bn": (PFEIFFER, None),
           "double_seq_bn": (adapters.DoubleSeqBnConfig, None),
           # b of another size and activation: AdapterHub composes them (each output is hidden_size wide)
           "seq_bn_other_sizes": (PFEIFFER, lambda: adapters.SeqBnConfig(reduction_factor=2, non_linearity="gelu"))}
NAMES = ("a", "b")


def hub_with_two(base, hub_config, directory, config_of_b=None):
    """AdapterHub's model with adapters a and b (random weights, eval), each saved under directory/<name>."""
    hub = copy.deepcopy(base)
    adapters.init(hub)
    torch.manual_seed(5)
    hub.add_adapter("a", config=hub_config())
    hub.add_adapter("b", config=(config_of_b or hub_config)())
    with torch.no_grad():
        for n, p in sorted(hub.named_parameters()):
            if ".adapters." in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(n.encode()))) * 0.3)
    hub.eval()
    for name in NAMES:
        hub.save_adapter(str(directory / name), name, with_head=False)
    return hub


def ours_with_two(base, directory):
    ours = peft_edu.load_adapter(copy.deepcopy(base), directory / "a", adapter_name="a")
    peft_edu.load_adapter(ours, directory / "b", adapter_name="b")
    return ours.eval()


def hub_grads(hub) -> dict:
    """AdapterHub's trainable tensors' gradients by (adapter or fusion, module, tensor) in peft_edu's terms."""
    grads = {}
    for n, p in hub.named_parameters():
        if not p.requires_grad or n.startswith("classifier."):  # AdapterHub leaves a head outside the base trainable
            continue
        m = re.match(r"(.*)\.adapters\.(\w+)\.(adapter_down|adapter_up)(?:\.\d)?\.(\w+)$", n)
        if m:
            grads[(m[2], m[1], f"{m[3]}.{m[4]}")] = p.grad
            continue
        m = re.match(r"(.*)\.adapter_fusion_layer\.[\w,]+\.(.*)$", n)
        assert m, f"unexpected trainable AdapterHub tensor {n}"
        grads[("fusion", m[1], m[2])] = p.grad
    return grads


def our_grads(ours, fusion=None) -> dict:
    grads = {}
    for name in NAMES:
        for module_name, module in _bottleneck_parts(ours, name).items():
            for t, p in module.named_parameters():
                if t.startswith(("adapter_down", "adapter_up")) and p.requires_grad:
                    grads[(name, module_name, t)] = p.grad
    if fusion is not None:
        for key, layer in fusion.layers.items():
            for t, p in layer.named_parameters():
                grads[("fusion", key.replace("-", "."), t)] = p.grad
    assert all(p.grad is None for n, p in ours.named_parameters() if not p.requires_grad)
    return grads


def _params(ours, names):
    return [(t, p) for name in names for m in _bottleneck_parts(ours, name).values()
            for t, p in m.named_parameters() if t.startswith("adapter_")]


def run(model, batch):
    out = model(**batch)
    loss_of(out, batch).backward()
    return output_of(out).detach()


def assert_same_grads(ours: dict, theirs: dict):
    assert set(ours) == set(theirs) and ours
    for key, g in theirs.items():
        assert g is not None and g.abs().sum() > 0, key
        assert_close(ours[key], g)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_stack_equals_adapterhub(preset, tmp_path, tiny_model, tiny_batch):
    base, batch = tiny_model("bert_cls"), tiny_batch("bert_cls")
    hub = hub_with_two(base, PRESETS[preset][0], tmp_path, PRESETS[preset][1])
    hub.set_active_adapters(HubStack(*NAMES))
    hub.train_adapter(HubStack(*NAMES))
    hub.eval()
    ours = ours_with_two(base, tmp_path)
    alone = forward(ours, batch)
    set_active_adapters(ours, Stack(*NAMES))
    expected = run(hub, batch)
    assert_close(run(ours, batch), expected)
    assert not torch.allclose(expected, alone, atol=1e-3)  # b on top of a is not a alone
    assert_same_grads(our_grads(ours), hub_grads(hub))
    assert {k[0] for k in hub_grads(hub)} == set(NAMES)  # both adapters get gradients
    assert {id(p) for p in composition_parameters(ours)} == {id(p) for n, p in _params(ours, NAMES)}

    set_active_adapters(ours, None)  # back to a alone
    assert_close(forward(ours, batch), alone)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_fuse_equals_adapterhub_and_loads_its_files(preset, tmp_path, tiny_model, tiny_batch):
    base, batch = tiny_model("bert_cls"), tiny_batch("bert_cls")
    hub = hub_with_two(base, PRESETS[preset][0], tmp_path, PRESETS[preset][1])
    hub.add_adapter_fusion(HubFuse(*NAMES))
    hub.set_active_adapters(HubFuse(*NAMES))
    hub.train_adapter_fusion(HubFuse(*NAMES))
    with torch.no_grad():  # random fusion weights: the softmax must matter
        for n, p in hub.named_parameters():
            if "adapter_fusion_layer" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.3)
    hub.eval()
    hub.save_adapter_fusion(str(tmp_path / "fusion"), ",".join(NAMES))
    ours = ours_with_two(base, tmp_path)
    fusion = load_adapter_fusion(ours, tmp_path / "fusion")
    set_active_adapters(ours, Fuse(*NAMES), fusion)
    expected = run(hub, batch)
    assert_close(run(ours, batch), expected)
    assert_same_grads(our_grads(ours, fusion), hub_grads(hub))
    assert_close(fusion.regularization_loss(), hub.get_fusion_regularization_loss().detach())
    assert not any(p.requires_grad for _, p in _params(ours, NAMES))  # train_adapter_fusion: adapters frozen
    assert {id(p) for p in composition_parameters(ours)} == {id(p) for p in fusion.parameters()}

    save_adapter_fusion(ours, fusion, tmp_path / "ours")  # AdapterHub reads what we write
    again = copy.deepcopy(hub)
    again.delete_adapter_fusion(HubFuse(*NAMES))
    again.load_adapter_fusion(str(tmp_path / "ours"), set_active=True)
    again.eval()
    assert_close(forward(again, batch), expected)


@pytest.mark.parametrize("fusion_config", ["dynamic", "static"])
def test_new_fusion_starts_as_adapterhubs(fusion_config, tmp_path, tiny_model, tiny_batch):
    """Same random stream, same initial fusion layers (dynamic: W_v = I up to 1e-6): outputs equal."""
    base, batch = tiny_model("bert_cls"), tiny_batch("bert_cls")
    hub = hub_with_two(base, PFEIFFER, tmp_path)
    torch.manual_seed(11)
    hub.add_adapter_fusion(HubFuse(*NAMES), config=fusion_config)
    hub.set_active_adapters(HubFuse(*NAMES))
    ours = ours_with_two(base, tmp_path)
    torch.manual_seed(11)
    fusion = add_adapter_fusion(ours, Fuse(*NAMES), fusion_config)
    assert (fusion.layer_at("bert.encoder.layer.0.output").value is None) == (fusion_config == "static")
    set_active_adapters(ours, Fuse(*NAMES), fusion)
    assert_close(forward(ours, batch), forward(hub.eval(), batch))


def test_fuse_in_training_mode_equals_adapterhub(tmp_path, tiny_model, tiny_batch):
    """The fusion's dropout (BERT's attention_probs_dropout_prob, on the scores) follows the model's train/eval mode
    and draws as AdapterHub's does: same seed, same output and fusion gradients."""
    base, batch = tiny_model("bert_cls"), tiny_batch("bert_cls")
    hub = hub_with_two(base, PFEIFFER, tmp_path)
    torch.manual_seed(11)
    hub.add_adapter_fusion(HubFuse(*NAMES))
    hub.train_adapter_fusion(HubFuse(*NAMES))
    ours = ours_with_two(base, tmp_path)
    torch.manual_seed(11)
    fusion = add_adapter_fusion(ours, Fuse(*NAMES))
    set_active_adapters(ours, Fuse(*NAMES), fusion)
    hub.train(), ours.train()
    torch.manual_seed(3)
    expected = run(hub, batch)
    torch.manual_seed(3)
    assert_close(run(ours, batch), expected)
    assert_same_grads(our_grads(ours, fusion), hub_grads(hub))
    torch.manual_seed(3)
    assert not torch.allclose(run(ours.eval(), batch), expected, atol=1e-4)  # the dropout did something


def test_set_adapter_and_unload_while_composed(tmp_path, tiny_model, tiny_batch):
    base, batch = tiny_model("bert_cls"), tiny_batch("bert_cls")
    hub_with_two(base, PFEIFFER, tmp_path)
    ours = ours_with_two(base, tmp_path)
    peft_edu.set_adapter(ours, "b")
    b_alone = forward(ours, batch)
    set_active_adapters(ours, Stack(*NAMES))
    assert peft_edu.active_adapter(ours) == "a"  # the first adapter anchors the composition
    assert ours.peft_edu_composition.names == list(NAMES)
    stacked = forward(ours, batch)
    set_active_adapters(ours, Stack("b", "a"))  # another order, another function
    reversed_stack = forward(ours, batch)
    assert not torch.allclose(reversed_stack, stacked, atol=1e-4)
    with pytest.raises(ValueError, match=r"is active; end it first with peft_edu.set_active_adapters\(model, None\)"):
        peft_edu.set_adapter(ours, "a")  # switching under a composition would leave it hanging on the modules
    assert_close(forward(ours, batch), reversed_stack)
    set_active_adapters(ours, None)
    with pytest.raises(ValueError, match="No composition is active"):
        composition_parameters(ours)
    peft_edu.set_adapter(ours, "b")
    assert_close(forward(ours, batch), b_alone)
    assert_close(forward(peft_edu.unload(ours), batch), forward(base, batch))


def test_bad_compositions_leave_the_model_unchanged(tmp_path, tiny_model, tiny_batch):
    base, batch = tiny_model("bert_cls"), tiny_batch("bert_cls")
    hub_with_two(base, PFEIFFER, tmp_path)
    ours = ours_with_two(base, tmp_path)
    peft_edu.add_adapter(ours, "lora", peft_edu.LoraConfig(target_modules=["query"]))
    peft_edu.add_adapter(ours, "houlsby", peft_edu.DoubleSeqBnConfig())
    peft_edu.add_adapter(ours, "par", peft_edu.ParBnConfig())
    before = forward(ours, batch)
    with pytest.raises(ValueError, match="two or more adapter names"):
        Stack("a")
    with pytest.raises(ValueError, match="twice"):
        Fuse("a", "a")
    cases = [
        (Stack("a", "nope"), ValueError, r"does not have: \['nope'\].*add_adapter"),
        (Stack("a", "lora"), ValueError, "LoraConfig.*one bottleneck config each"),
        (Stack("a", "par"), ValueError, "parallel adapter"),
        (Stack("a", "houlsby"), ValueError, "different positions"),
        (Fuse("a", "b"), ValueError, "needs its fusion layers.*add_adapter_fusion"),
        ("a", TypeError, "peft_edu.Stack"),
    ]
    for composition, error, message in cases:
        with pytest.raises(error, match=message):
            set_active_adapters(ours, composition)
        assert peft_edu.active_adapter(ours) == "a"
        assert_close(forward(ours, batch), before)
    with pytest.raises(ValueError, match="has no fusion layers"):
        set_active_adapters(ours, Stack("a", "b"), add_adapter_fusion(ours, Fuse("a", "b")))
    with pytest.raises(ValueError, match="needs its fusion layers"):
        set_active_adapters(ours, Fuse("b", "a"), add_adapter_fusion(ours, Fuse("a", "b")))
    assert_close(forward(ours, batch), before)
    with pytest.raises(ValueError, match="not implemented"):
        add_adapter_fusion(ours, Fuse("a", "b"), {"temperature": True})
    with pytest.raises(ValueError, match="one of"):
        add_adapter_fusion(ours, Fuse("a", "b"), "dynamik")
    with pytest.raises(FileNotFoundError, match="save_adapter_fusion"):
        load_adapter_fusion(ours, tmp_path)
    hub_dir = tmp_path / "fusion"
    hub = hub_with_two(base, PFEIFFER, tmp_path)
    hub.add_adapter_fusion(HubFuse("a", "b"))
    hub.save_adapter_fusion(str(hub_dir), "a,b")
    lonely = peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    with pytest.raises(ValueError, match=r"does not have: \['b'\]"):  # load the fused adapters first
        load_adapter_fusion(lonely, hub_dir)


def test_llama_compositions_are_refused(tiny_model):
    llama = peft_edu.get_peft_model(tiny_model("llama"), peft_edu.SeqBnConfig(), adapter_name="a")
    peft_edu.add_adapter(llama, "b", peft_edu.SeqBnConfig())
    with pytest.raises(ValueError, match="BERT-style"):
        set_active_adapters(llama, Stack("a", "b"))
