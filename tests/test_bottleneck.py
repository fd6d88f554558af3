"""peft_edu's bottleneck adapters against AdapterHub's ``adapters`` 1.3.0: placement, init, numbers, files, errors.

Every comparison builds one seeded base model and deepcopies it for AdapterHub (``adapters.init``,
``add_adapter``, ``train_adapter``) and for peft_edu. AdapterHub's "bert" init is close to the identity and
"mam_adapter" *is* the identity (W_up = 0), so where the adapter's path matters its weights are randomised;
AdapterHub then saves them (``save_adapter``) and ``peft_edu.load_adapter`` reads that directory.

Names map (AdapterHub -> peft_edu), a rule written here independently of the code under test:
``<i>.attention.output.adapters.a.adapter_down.0.weight`` -> ``<i>.attention.output.adapter_down.weight`` (BERT),
``<i>.attention_adapters.adapters.a.*`` -> ``<i>.self_attn.*`` and ``<i>.output_adapters.adapters.a.*`` ->
``<i>.mlp.*`` (Llama), a trained head ``classifier.weight`` -> ``classifier.modules_to_save.weight``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re

import adapters
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import parity
import peft_edu
import peft_edu.assets
from parity import (
    assert_close,
    assert_same_gradients,
    assert_same_run,
    assert_unchanged,
    forward,
    forward_backward,
    has_adapter_parts,
    layers_of,
    loss_of,
    trainable,
)
from peft_edu.bottleneck import MERGE_ERROR, BottleneckAdapter, ResidualTap
from peft_edu.injection import TrainedCopy

NAME = "a"

# id -> (AdapterHub config factory, peft_edu config factory)
PRESETS = {
    "seq_bn": (adapters.SeqBnConfig, peft_edu.SeqBnConfig),
    "double_seq_bn": (adapters.DoubleSeqBnConfig, peft_edu.DoubleSeqBnConfig),
    "par_bn": (adapters.ParBnConfig, peft_edu.ParBnConfig),
}
# Mixed adapters: per-layer sizes, left-out layers, and a different kind per layer (a union).
MIXED = {
    "sizes_per_layer": (lambda: adapters.SeqBnConfig(reduction_factor={"0": 4, "default": 16}),
                        lambda: peft_edu.SeqBnConfig(reduction_factor={0: 4, "default": 16})),
    "leave_out": (lambda: adapters.DoubleSeqBnConfig(leave_out=[0], non_linearity="gelu"),
                  lambda: peft_edu.DoubleSeqBnConfig(leave_out=[0], non_linearity="gelu")),
    "union": (lambda: adapters.ConfigUnion(adapters.DoubleSeqBnConfig(leave_out=[1]), adapters.ParBnConfig(leave_out=[0])),
              lambda: peft_edu.ConfigUnion(peft_edu.DoubleSeqBnConfig(leave_out=[1]), peft_edu.ParBnConfig(leave_out=[0]))),
    "seeded_init": (lambda: adapters.DoubleSeqBnConfig(init_weights_seed=3),  # every module reseeded: equal inits
                    lambda: peft_edu.DoubleSeqBnConfig(init_weights_seed=3)),
    "union_serial_attention_parallel_ffn": (
        lambda: adapters.ConfigUnion(adapters.SeqBnConfig(mh_adapter=True, output_adapter=False), adapters.ParBnConfig()),
        lambda: peft_edu.ConfigUnion(peft_edu.SeqBnConfig(mh_adapter=True, output_adapter=False), peft_edu.ParBnConfig())),
}
# AdapterHub's other placement options: new LayerNorms, what the skip connection carries, the "houlsby" init.
OPTIONS = {
    "norms_residual_from_input_houlsby_init": (
        lambda: adapters.SeqBnConfig(ln_before=True, ln_after=True, residual_before_ln=False, init_weights="houlsby"),
        lambda: peft_edu.SeqBnConfig(ln_before=True, ln_after=True, residual_before_ln=False, init_weights="houlsby")),
    "adapter_residual_before_ln": (
        lambda: adapters.DoubleSeqBnConfig(ln_after=True, adapter_residual_before_ln=True),
        lambda: peft_edu.DoubleSeqBnConfig(ln_after=True, adapter_residual_before_ln=True)),
    "parallel_with_norms": (lambda: adapters.ParBnConfig(ln_before=True, ln_after=True),
                            lambda: peft_edu.ParBnConfig(ln_before=True, ln_after=True)),
}
# Options that need the layer's own LayerNorm after the sublayer: post-norm (BERT) only.
POST_NORM_OPTIONS = {
    "post_add_without_original_ln_after": (
        lambda: adapters.SeqBnConfig(residual_before_ln="post_add", original_ln_after=False),
        lambda: peft_edu.SeqBnConfig(residual_before_ln="post_add", original_ln_after=False)),
    "double_without_original_ln_after": (lambda: adapters.DoubleSeqBnConfig(original_ln_after=False),
                                         lambda: peft_edu.DoubleSeqBnConfig(original_ln_after=False)),
}
ALL_CONFIGS = {**PRESETS, **MIXED, **OPTIONS}


# --- helpers (the shared ones are in parity.py) --------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")
randomize_trainable = functools.partial(parity.randomize_trainable, std=0.3)


@pytest.fixture
def tiny_model(tiny_model):
    """conftest's tiny models; Llama's embeddings scaled to std 1 (from 0.02) so that its residual stream, which no
    LayerNorm rescales, is O(1) as in a trained model: otherwise a serial adapter's ReLU units see only their bias
    and can be dead for every token, and the adapter's input would not matter."""
    def build(kind, seed=0, hidden_size=32, **overrides):
        model = tiny_model(kind, seed=seed, hidden_size=hidden_size, **overrides)
        if kind.startswith("llama"):
            with torch.no_grad():
                model.get_input_embeddings().weight.mul_(50.0)
        return model
    return build


def ours_name(name: str) -> str:
    """AdapterHub parameter name -> peft_edu parameter name."""
    name = re.sub(r"\.(\d+)\.attention_adapters\.adapters\.a\.", r".\1.self_attn.", name)
    name = re.sub(r"\.(\d+)\.output_adapters\.adapters\.a\.", r".\1.mlp.", name)
    name = re.sub(r"\.(\d+)\.(attention\.output|output)\.adapters\.a\.", r".\1.\2.", name)
    name = re.sub(r"\.adapter_down\.[01]\.", ".adapter_down.", name)  # .1 after an adapter_norm_before
    return re.sub(r"^(classifier|score)\.", r"\1.modules_to_save.", name)


def hub_trainable(model) -> dict[str, nn.Parameter]:
    """An AdapterHub model's trainable tensors under peft_edu's names."""
    return {ours_name(n): p for n, p in trainable(model).items()}


def hub_model(base, config, seed=5):
    """A deepcopy of ``base`` with AdapterHub's adapter ``a`` added (after torch.manual_seed(seed)) and active."""
    model = copy.deepcopy(base)
    adapters.init(model)
    torch.manual_seed(seed)
    model.add_adapter(NAME, config=config)
    model.train_adapter(NAME)
    return model


def hub_saved(base, config, directory, **save_kwargs):
    """AdapterHub's adapter with random weights, saved to ``directory``; returns the AdapterHub model (eval)."""
    hub = hub_model(base, config)
    randomize_trainable(hub)
    hub.eval()
    hub.save_adapter(str(directory), NAME, **save_kwargs)
    return hub


def bottleneck_layers(model) -> dict[str, BottleneckAdapter]:
    return layers_of(model, BottleneckAdapter)


# --- 1. the equations, by hand --------------------------------------------------------------------
def adapter_by_hand(layer: BottleneckAdapter, z, f):
    """A(z) = s · (W_up f(W_down z + b_down) + b_up)."""
    down, up = layer.adapter_down, layer.adapter_up
    return layer.scaling * (f(z @ down.weight.T + down.bias) @ up.weight.T + up.bias)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_post_norm_equation(preset, tiny_model):
    """BERT's BertOutput: Houlsby LN(h + A(h) + x), Pfeiffer LN(h + A(LN(h + x)) + x), parallel LN(h + A(x) + x)."""
    base_output = tiny_model("bert").encoder.layer[0].output  # dense 64 -> 32, dropout, LayerNorm
    config = PRESETS[preset][1]()
    layer = BottleneckAdapter(copy.deepcopy(base_output).requires_grad_(False), config, hidden_size=32, layer=0, location="output_adapter",
                              style="post_norm")
    randomize_trainable(layer)
    g = torch.Generator().manual_seed(1)
    h_in, x = torch.randn(3, 5, 64, generator=g), torch.randn(3, 5, 32, generator=g)
    f = {"seq_bn": torch.relu, "double_seq_bn": nn.functional.silu, "par_bn": torch.relu}[preset]
    with torch.no_grad():
        ln, h = base_output.LayerNorm, base_output.dense(h_in)
        placements = {
            "double_seq_bn": ln(h + adapter_by_hand(layer, h, f) + x),
            "seq_bn": ln(h + adapter_by_hand(layer, ln(h + x), f) + x),
            "par_bn": ln(h + adapter_by_hand(layer, x, f) + x),
            "after the LayerNorm": ln(h + x) + adapter_by_hand(layer, ln(h + x), f),
        }
        out = layer(h_in, x)
    assert layer.bottleneck == {"seq_bn": 2, "double_seq_bn": 2, "par_bn": 16}[preset]
    assert layer.scaling == (4.0 if preset == "par_bn" else 1.0)
    assert_close(out, placements[preset])
    for other, expected in placements.items():  # the placements differ, so the check above discriminates
        if other != preset:
            assert not torch.allclose(out, expected, atol=1e-3), other


@pytest.mark.parametrize("preset", list(PRESETS))
def test_pre_norm_equation(preset, tiny_model, tiny_batch):
    """Llama's MLP: Houlsby x + h + A(h), Pfeiffer x + h + A(h + x), parallel x + h + A(x), with x the residual
    stream before post_attention_layernorm and h the MLP's output; the attention is left alone."""
    model = peft_edu.get_peft_model(tiny_model("llama"), PRESETS[preset][1](mh_adapter=False))
    randomize_trainable(model)
    decoder = model.model.layers[1]
    adapter = decoder.mlp
    assert isinstance(adapter, BottleneckAdapter) and not isinstance(decoder.self_attn, BottleneckAdapter)
    assert isinstance(decoder.post_attention_layernorm, ResidualTap) == (preset != "double_seq_bn")
    norm = decoder.post_attention_layernorm
    norm = norm.base_layer if isinstance(norm, ResidualTap) else norm
    seen = {}
    hooks = [norm.register_forward_hook(lambda m, args, out: seen.update(x=args[0])),
             adapter.base_layer.register_forward_hook(lambda m, args, out: seen.update(h=out)),
             decoder.register_forward_hook(lambda m, args, out: seen.update(y=out[0] if isinstance(out, tuple) else out))]
    forward(model, tiny_batch("llama"))
    for hook in hooks:
        hook.remove()
    x, h, y = seen["x"], seen["h"], seen["y"]
    f = {"seq_bn": torch.relu, "double_seq_bn": nn.functional.silu, "par_bn": torch.relu}[preset]
    with torch.no_grad():
        placements = {"double_seq_bn": x + h + adapter_by_hand(adapter, h, f),
                      "seq_bn": x + h + adapter_by_hand(adapter, h + x, f),
                      "par_bn": x + h + adapter_by_hand(adapter, x, f),
                      "reads the normalised input": x + h + adapter_by_hand(adapter, norm(x), f)}
    assert_close(y, placements[preset])
    for other, expected in placements.items():
        if other != preset:
            assert not torch.allclose(y, expected, atol=1e-3), other


# --- 2. same parameters, same initial weights ------------------------------------------------------
INIT_CASES = [pytest.param(kind, cid, id=f"{kind}-{cid}") for kind in ("bert", "llama") for cid in ALL_CONFIGS] + [
    pytest.param("bert", cid, id=f"bert-{cid}") for cid in POST_NORM_OPTIONS]


@pytest.mark.parametrize("kind,config_id", INIT_CASES)
def test_same_parameters_and_initial_weights_as_adapterhub(kind, config_id, tiny_model, tiny_batch):
    """Same placement and shapes; and built in AdapterHub's order, the same seed draws the same weights."""
    base = tiny_model(kind)
    make_hub, make_ours = {**ALL_CONFIGS, **POST_NORM_OPTIONS}[config_id]
    hub = hub_model(base, make_hub(), seed=5)
    ours = copy.deepcopy(base)
    torch.manual_seed(5)
    peft_edu.get_peft_model(ours, make_ours())
    theirs = hub_trainable(hub)
    mine = trainable(ours)
    assert sorted(mine) == sorted(theirs)
    norms = sum(m.adapter_norm_before is not None for m in bottleneck_layers(ours).values()) + \
        sum(m.adapter_norm_after is not None for m in bottleneck_layers(ours).values())
    assert len(mine) == 4 * len(bottleneck_layers(ours)) + 2 * norms > 0
    for name, p in mine.items():
        assert torch.equal(p, theirs[name]), name
    assert peft_edu.count_parameters(ours)[0] == sum(p.numel() for p in hub.parameters() if p.requires_grad)
    for name, layer in bottleneck_layers(ours).items():
        assert not any(p.requires_grad for p in layer.base_layer.parameters()), name
        assert torch.equal(layer.adapter_down.bias, torch.zeros_like(layer.adapter_down.bias)), name
        assert torch.equal(layer.adapter_up.bias, torch.zeros_like(layer.adapter_up.bias)), name
        if layer.is_parallel:  # mam_adapter: W_up = 0, the adapter is the identity at the start
            assert torch.equal(layer.adapter_up.weight, torch.zeros_like(layer.adapter_up.weight)), name
        elif "houlsby" in config_id:  # N(0, 0.01²) truncated at ±0.02
            assert layer.adapter_up.weight.abs().max() <= 0.02 and layer.adapter_up.weight.std() > 0.003, name
        else:  # bert: N(0, 0.02²)
            assert 0.005 < layer.adapter_up.weight.std() < 0.05, name
    if config_id == "par_bn":
        assert torch.equal(forward(ours, tiny_batch(kind)), forward(base, tiny_batch(kind)))


def test_placement_per_architecture(tiny_model):
    bert = peft_edu.get_peft_model(tiny_model("bert"), peft_edu.DoubleSeqBnConfig())
    assert sorted(bottleneck_layers(bert)) == [f"encoder.layer.{i}.{p}" for i in (0, 1) for p in ("attention.output", "output")]
    llama = peft_edu.get_peft_model(tiny_model("llama"), peft_edu.ConfigUnion(
        peft_edu.DoubleSeqBnConfig(leave_out=[1]), peft_edu.ParBnConfig(leave_out=[0])))
    layers = bottleneck_layers(llama)
    assert {n: (m.is_parallel, m.bottleneck) for n, m in layers.items()} == {
        "model.layers.0.self_attn": (False, 2), "model.layers.0.mlp": (False, 2), "model.layers.1.mlp": (True, 16)}
    taps = [n for n, m in llama.named_modules() if isinstance(m, ResidualTap)]
    assert taps == ["model.layers.1.post_attention_layernorm"]  # only the parallel adapter needs x


def test_config_defaults_equal_adapterhub():
    for hub_config, ours_config in PRESETS.values():
        theirs, mine = hub_config().to_dict(), vars(ours_config())
        shared = set(theirs) & set(mine)
        assert {k: mine[k] for k in shared} == {k: theirs[k] for k in shared}, ours_config.__name__
        assert len(shared) == 16
    with pytest.raises(TypeError, match="mh_adapter"):
        peft_edu.BnConfig()  # AdapterHub's four required fields are required here too
    assert peft_edu.BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=8, non_linearity="relu").scaling == 1.0


# --- 3. AdapterHub's files: same outputs, gradients and counts ---------------------------------------
CASES = [pytest.param(kind, cid, id=f"{kind}-{cid}") for kind in ("bert", "llama") for cid in ALL_CONFIGS] + [
    pytest.param(kind, cid, id=f"{kind}-{cid}") for kind in ("bert_cls", "llama_cls") for cid in PRESETS] + [
    pytest.param("bert", cid, id=f"bert-{cid}") for cid in POST_NORM_OPTIONS]


@pytest.mark.parametrize("kind,config_id", CASES)
def test_adapterhub_file_outputs_and_gradients(kind, config_id, tmp_path, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    assert (batch["attention_mask"] == 0).any()
    hub = hub_saved(base, {**ALL_CONFIGS, **POST_NORM_OPTIONS}[config_id][0](), tmp_path)
    ours = peft_edu.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    assert ours.peft_edu_config.task_type == ("SEQ_CLS" if kind.endswith("_cls") else None)

    grads_ours = assert_same_run(ours, hub, batch, base=base, named_theirs=hub_trainable).grads
    assert peft_edu.count_parameters(ours)[0] == sum(p.numel() for p in hub.parameters() if p.requires_grad)
    assert sum(".adapter_up." in n for n in grads_ours) == 2 * len(bottleneck_layers(ours)) > 0


@pytest.mark.parametrize("kind", ["bert_cls", "llama"])
def test_adapterhub_safetensors_files(kind, tmp_path, tiny_model, tiny_batch):
    base = tiny_model(kind)
    hub = hub_saved(base, adapters.DoubleSeqBnConfig(), tmp_path, use_safetensors=True)
    assert (tmp_path / "adapter.safetensors").is_file() and not (tmp_path / "pytorch_adapter.bin").exists()
    assert (tmp_path / "model_head.safetensors").is_file()  # both models have a head AdapterHub saves
    ours = peft_edu.load_adapter(copy.deepcopy(base), tmp_path).eval()
    batch = tiny_batch(kind)
    assert_close(forward(ours, batch), forward(hub, batch))
    # The causal LM's lm_head is the pretrained one: not trained, not loaded as modules_to_save.
    assert ours.peft_edu_config.modules_to_save is None
    assert (kind == "bert_cls") == any(isinstance(m, TrainedCopy) for m in ours.modules())


def test_adapterhub_trained_lm_head_is_loaded(tmp_path, tiny_model, tiny_batch):
    base = tiny_model("llama")
    hub = hub_model(base, adapters.SeqBnConfig())
    randomize_trainable(hub)
    with torch.no_grad():
        hub.lm_head.weight.mul_(1.5)  # a head that differs from the base model's
    hub.eval().save_adapter(str(tmp_path), NAME)
    ours = peft_edu.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert ours.peft_edu_config.modules_to_save == ["lm_head"]
    assert_close(forward(ours, tiny_batch("llama")), forward(hub, tiny_batch("llama")))


def test_dropout_in_training_mode_equals_adapterhub(tmp_path, tiny_model, tiny_batch):
    """With dropout on (the base model's and the adapter's), the same seed drops the same units in both."""
    base = tiny_model("bert")
    hub = hub_saved(base, adapters.DoubleSeqBnConfig(dropout=0.3), tmp_path)
    ours = peft_edu.load_adapter(copy.deepcopy(base), tmp_path)
    assert ours.peft_edu_config.dropout == 0.3
    hub.train(), ours.train()
    batch = tiny_batch("bert")
    outs = []
    for model in (hub, ours):
        torch.manual_seed(0)
        outs.append(forward(model, batch))
    assert_close(outs[1], outs[0])
    torch.manual_seed(1)
    assert not torch.allclose(forward(ours, batch), outs[0], atol=1e-3)  # dropout is on


# --- 4. peft_edu's own files ------------------------------------------------------------------------
@pytest.mark.parametrize("kind,config_id", [("bert_cls", "seq_bn"), ("llama", "par_bn"), ("llama_cls", "union"),
                                            ("bert", "sizes_per_layer")])
def test_save_load_round_trip_is_bit_exact(kind, config_id, tmp_path, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    config = ALL_CONFIGS[config_id][1]()
    if kind.endswith("_cls"):
        config = peft_edu.ConfigUnion(*config.configs, task_type="SEQ_CLS") if config_id == "union" else \
            type(config)(**{**vars(config), "task_type": "SEQ_CLS"})
    ours = peft_edu.get_peft_model(copy.deepcopy(base), config)
    randomize_trainable(ours)
    ours.eval()
    peft_edu.save_adapter(ours, tmp_path)

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == ("UNION" if config_id == "union" else "BOTTLENECK")
    if config_id == "union":
        assert [c["peft_type"] for c in written["configs"]] == ["BOTTLENECK"] * 2
        assert [c["is_parallel"] for c in written["configs"]] == [False, True]
    else:
        assert written["reduction_factor"] == config.reduction_factor and written["is_parallel"] == config.is_parallel
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    expected = sorted(f"base_model.model.{m}.adapter_{p}.{t}" for m in bottleneck_layers(ours)
                      for p in ("down", "up") for t in ("weight", "bias"))
    if kind == "bert_cls":
        expected = sorted(expected + ["base_model.model.classifier.weight", "base_model.model.classifier.bias"])
    if kind == "llama_cls":
        expected = sorted(expected + ["base_model.model.score.weight"])
    assert keys == expected

    again = peft_edu.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(forward(again, batch), forward(ours, batch))
    mine, theirs = peft_edu.model.adapter_state_dict(ours), peft_edu.model.adapter_state_dict(again)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not torch.allclose(forward(again, batch), forward(base, batch), atol=1e-3)


# --- 5. merge, unload, the frozen model ----------------------------------------------------------------
def test_merge_is_refused(tiny_model, tiny_batch):
    base = tiny_model("llama")
    batch = tiny_batch("llama")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.SeqBnConfig())
    randomize_trainable(model)
    before = forward(model, batch)
    with pytest.raises(NotImplementedError, match=r"cannot be merged.*non-linearity f between the two projections"):
        peft_edu.merge(model)
    assert "non-linear function of the hidden state" in MERGE_ERROR
    assert not any(m.merged for m in peft_edu.injection.adapter_layers(model).values())
    assert torch.equal(forward(model, batch), before)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.model.layers[0].post_attention_layernorm.merge()  # the tap refuses too


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_frozen_model_unchanged_and_unload(kind, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.ConfigUnion(
        peft_edu.SeqBnConfig(leave_out=[1]), peft_edu.ParBnConfig(leave_out=[0]), peft_edu.DoubleSeqBnConfig(
            output_adapter=False)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        model.train()
        loss_of(model(**batch), batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert not torch.allclose(forward(model, batch), forward(base, batch), atol=1e-3)
    frozen = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen.keys() == dict(base.named_parameters()).keys()
    assert all(torch.equal(p, base.get_parameter(n)) for n, p in frozen.items())

    peft_edu.unload(model)
    assert not has_adapter_parts(model) and not hasattr(model, "peft_edu_config")
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(forward(model, batch), forward(base, batch))


# --- 6. bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(ln_before="yes"), r"ln_before='yes': must be True or False"),
    (dict(original_ln_after=None), r"original_ln_after=None: must be True or False"),
    (dict(residual_before_ln="pre"), r"residual_before_ln='pre': True, False or 'post_add'"),
    (dict(residual_before_ln="post_add", original_ln_before=False), r"'post_add' takes h \+ x, which only exists"),
    (dict(scaling="learned"), r"scaling='learned'.*'learned' and 'channel' scalings are not implemented"),
    (dict(init_weights="xavier"), r"init_weights='xavier': one of \('bert', 'mam_adapter', 'houlsby'\)"),
    (dict(non_linearity="sigmoidish"), r"non_linearity='sigmoidish' is not an activation transformers knows"),
    (dict(reduction_factor=0), r"reduction_factor=0: must be a positive number"),
    (dict(reduction_factor={"first": 8}), r"keys of a per-layer mapping are layer indices and 'default'"),
    (dict(leave_out=["1"]), r"leave_out=\['1'\]: a list of layer indices"),
    (dict(dropout=1.0), r"dropout=1.0"),
    (dict(target_modules=["output"]), r"placed by mh_adapter .* not by target_modules"),
    (dict(mh_adapter=False, output_adapter=False), r"adds no adapter anywhere"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peft_edu.SeqBnConfig(**kwargs)


@pytest.mark.parametrize("config,error,message", [
    (lambda: peft_edu.ConfigUnion(peft_edu.SeqBnConfig(), peft_edu.ParBnConfig()), ValueError,
     r"Layer 0 \(output_adapter, encoder\.layer\.0\.output\) would get an adapter from 2 members"),
    (lambda: peft_edu.SeqBnConfig(leave_out=[0, 1]), ValueError, r"places no adapter in BertModel"),
    (lambda: peft_edu.SeqBnConfig(leave_out=[2]), ValueError, r"leave_out=\[2\] names layers \[2\], but BertModel has 2"),
    (lambda: peft_edu.SeqBnConfig(reduction_factor={"1": 8}), ValueError, r"no entry for layer 0 and no 'default'"),
    (lambda: peft_edu.SeqBnConfig(task_type="SEQ_CLS"), ValueError, r"BertModel has no module named classifier"),
], ids=["union-conflict", "all-left-out", "leave-out-beyond", "sizes-without-default", "seq-cls-without-head"])
def test_bad_configs_leave_the_model_unchanged(config, error, message, tiny_model, tiny_batch):
    base = tiny_model("bert")
    model = copy.deepcopy(base)
    with pytest.raises(error, match=message):
        peft_edu.get_peft_model(model, config())
    assert_unchanged(model, base, tiny_batch("bert"))


def test_union_members():
    with pytest.raises(TypeError, match="combines bottleneck configs .* not LoraConfig"):
        peft_edu.ConfigUnion(peft_edu.SeqBnConfig(), peft_edu.LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="Give task_type and modules_to_save to the ConfigUnion"):
        peft_edu.ConfigUnion(peft_edu.SeqBnConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="needs at least one config"):
        peft_edu.ConfigUnion()


def test_other_architectures_are_refused():
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"BERT-style .* or Llama-style .*; NoLayers has no stack of transformer layers"):
        peft_edu.get_peft_model(NoLayers(), peft_edu.SeqBnConfig())


@pytest.mark.parametrize("hub_config,message", [
    (lambda: adapters.SeqBnInvConfig(), r"options peft_edu does not implement: inv_adapter='nice'"),
    (lambda: adapters.SeqBnConfig(use_gating=True), r"options peft_edu does not implement: use_gating=True"),
    (lambda: adapters.ParBnConfig(scaling="learned"), r"scaling='learned'"),
    (lambda: adapters.CompacterConfig(reduction_factor=4), r"phm_layer=True"),
    (lambda: adapters.LoRAConfig(), r"a 'lora' adapter; peft_edu reads AdapterHub's bottleneck adapters"),
], ids=["invertible", "gating", "learned-scaling", "compacter", "lora"])
def test_adapterhub_options_we_do_not_implement(hub_config, message, tmp_path, tiny_model, tiny_batch):
    base = tiny_model("bert")
    hub_saved(base, hub_config(), tmp_path)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message):
        peft_edu.load_adapter(model, tmp_path)
    assert_unchanged(model, base, tiny_batch("bert"))


def test_adapterhub_file_into_another_model(tmp_path, tiny_model, tiny_batch):
    hub_saved(tiny_model("bert"), adapters.SeqBnConfig(), tmp_path / "bert")
    hub_saved(tiny_model("bert_cls"), adapters.SeqBnConfig(), tmp_path / "bert_cls")
    other = tiny_model("bert", hidden_size=48)
    with pytest.raises(ValueError, match=r"saved from a model with hidden_size=32; BertModel has hidden_size=48"):
        peft_edu.load_adapter(other, tmp_path / "bert")
    with pytest.raises(ValueError, match=r"saved from a 'bert' model \(BertModel\); LlamaForCausalLM is a 'llama' model"):
        peft_edu.load_adapter(tiny_model("llama"), tmp_path / "bert")
    base = tiny_model("bert")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"holds a prediction head \(\['classifier\.weight', 'classifier\.bias'\]\) that "
                                         r"BertModel does not have; it was saved from BertForSequenceClassification"):
        peft_edu.load_adapter(model, tmp_path / "bert_cls")
    assert_unchanged(model, base, tiny_batch("bert"))
    # Without the head file, the adapter of BertForSequenceClassification fits BertModel (AdapterHub's names
    # start with "bert.", BertModel's do not: the layer index and location decide).
    for name in ("pytorch_model_head.bin", "head_config.json"):
        (tmp_path / "bert_cls" / name).unlink()
    loaded = peft_edu.load_adapter(model, tmp_path / "bert_cls")
    assert len(bottleneck_layers(loaded)) == 2


def test_shape_mismatch_names_the_module_and_both_shapes(tmp_path, tiny_model, tiny_batch):
    base = tiny_model("bert")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.SeqBnConfig())
    peft_edu.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"reduction_factor": 16', '"reduction_factor": 8'))
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"Shape mismatch at encoder\.layer\.0\.output: the file has adapter_down of "
                                         r"shape \(2, 32\), the model expects \(4, 32\)\..*reduction_factor=8"):
        peft_edu.load_adapter(fresh, tmp_path)
    assert_unchanged(fresh, base, tiny_batch("bert"))

    # An AdapterHub file whose tensors were changed behind its config's back.
    hub_saved(base, adapters.SeqBnConfig(), tmp_path / "hub", use_safetensors=True)
    weights = load_file(tmp_path / "hub" / "adapter.safetensors")
    key = "encoder.layer.1.output.adapters.a.adapter_up.weight"
    weights[key] = torch.zeros(32, 3)
    save_file(weights, tmp_path / "hub" / "adapter.safetensors")
    with pytest.raises(ValueError, match=r"Shape mismatch at encoder\.layer\.1\.output: the file has adapter_up of "
                                         r"shape \(32, 3\), the model expects \(32, 2\)"):
        peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "hub")
    weights["encoder.layer.1.output.adapters.a.gate.weight"] = torch.ones(1, 32)  # AdapterHub's gating
    del weights[key]
    save_file(weights, tmp_path / "hub" / "adapter.safetensors")
    with pytest.raises(ValueError, match=r"a tensor peft_edu cannot place: 'encoder\.layer\.1\.output\.adapters\.a\."
                                         r"gate\.weight'"):
        peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "hub")


@pytest.mark.parametrize("config,message", [
    (lambda: peft_edu.SeqBnConfig(original_ln_after=False), r"original_ln_after=False in a pre-norm layer"),
    (lambda: peft_edu.SeqBnConfig(residual_before_ln="post_add"), r"'post_add' needs the layer's own LayerNorm"),
], ids=["no-original-ln-after", "post-add"])
def test_post_norm_only_options_are_refused_in_pre_norm_models(config, message, tiny_model, tiny_batch):
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message):
        peft_edu.get_peft_model(model, config())
    assert not has_adapter_parts(model) and torch.equal(forward(model, tiny_batch("llama")),
                                                        forward(base, tiny_batch("llama")))


# --- 7. the real pretrained encoder (slow) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    tokenizer, model = peft_edu.assets.load_encoder()
    batch = tokenizer(["Bottleneck adapters sit after the attention and the FFN.", "Short."], padding=True,
                      return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    return model.eval(), dict(batch)


def check_real_model(base, batch, hub_config, directory, std):
    """AdapterHub's adapter with weights ~ N(0, std²), saved and read by peft_edu: equal outputs, not the base's."""
    hub = hub_model(base, hub_config)
    randomize_trainable(hub, std=std)
    hub.eval().save_adapter(str(directory), NAME)
    ours = peft_edu.load_adapter(copy.deepcopy(base), directory, is_trainable=True).eval()
    out_ours = forward(ours, batch)
    assert_close(out_ours, forward(hub, batch), rel=1e-5)
    assert not torch.allclose(out_ours, forward(base, batch), atol=1e-2)
    return hub, ours, out_ours


@pytest.mark.slow
@pytest.mark.parametrize("preset,count", [("seq_bn", 113_040), ("double_seq_bn", 226_080), ("par_bn", 888_192)])
def test_real_encoder_minilm(preset, count, minilm, tmp_path):
    """all-MiniLM-L6-v2 (d = 384, 6 layers): per adapter 2·d·m + m + d with m = 24 (d/16) or 192 (d/2)."""
    base, batch = minilm
    # std 0.05: gentler than the tiny models', so 6 layers stay sane
    hub, ours, out_ours = check_real_model(base, batch, PRESETS[preset][0](), tmp_path / "hub", std=0.05)
    assert peft_edu.count_parameters(ours)[0] == sum(p.numel() for p in hub.parameters() if p.requires_grad) == count
    peft_edu.save_adapter(ours, tmp_path / "ours")
    again = peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "ours").eval()
    assert torch.equal(forward(again, batch), out_ours)


# --- 8. mix-and-match: a prefix and parallel adapters in one union (He et al., arXiv 2110.04366) ------------
# AdapterHub's prefix is placed in the self-attention and leaves the real tokens' positions alone; so does a
# prefix in peft_edu's ConfigUnion (a PrefixTuningConfig alone follows PEFT, which numbers them after the prefix).
# AdapterHub 1.3.0's Llama prefix is right only with eager attention: with sdpa, a boolean padding mask is
# inverted over the prefix columns (the prefix is masked out) and without a mask the causal mask is aligned to
# the top-left corner. Llama comparisons therefore run with attn_implementation="eager" (see
# test_mam_does_not_depend_on_the_attention_implementation for ours).
def hub_mam(flat=False):
    return adapters.MAMConfig(adapters.PrefixTuningConfig(prefix_length=4, bottleneck_size=16, flat=flat))


def mam_model(tiny_model, kind):
    """``kind`` as in conftest; Llama with eager attention (see above)."""
    return tiny_model(kind, attn_implementation="eager") if kind.startswith("llama") else tiny_model(kind)


def prefix_parameter(hub):
    """AdapterHub's prefix tensor (flat=True): one vector, shared by every layer through the prefix pool."""
    (param,) = [p for n, p in trainable(hub).items() if n.endswith("control_trans")]
    return param


@pytest.mark.parametrize("kind", ["bert", "bert_cls", "llama"])
def test_adapterhub_mam_outputs_and_gradients(kind, tmp_path, tiny_model, tiny_batch):
    base = mam_model(tiny_model, kind)
    batch = tiny_batch(kind)
    hub = hub_saved(base, hub_mam(flat=True), tmp_path)
    ours = peft_edu.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    config = ours.peft_edu_config
    assert [type(c).__name__ for c in config.configs] == ["PrefixTuningConfig", "BnConfig"]
    assert config.task_type == {"bert": "FEATURE_EXTRACTION", "bert_cls": "SEQ_CLS", "llama": "CAUSAL_LM"}[kind]
    assert config.configs[0].num_virtual_tokens == 4

    out_ours, _, grads_ours = forward_backward(ours, batch)
    out_hub, _, grads_hub = forward_backward(hub, batch, named=hub_trainable)
    assert_close(out_ours, out_hub)
    assert not torch.allclose(out_ours, forward(base, batch), atol=1e-3)
    without_prefix = peft_edu.load_adapter(copy.deepcopy(base), tmp_path).eval()
    without_prefix.prompt_encoder.detach(without_prefix)
    assert not torch.allclose(out_ours, forward(without_prefix, batch), atol=1e-3)  # the prefix counts

    table = ours.prompt_encoder.embedding.weight
    assert table.grad.abs().sum() > 0
    assert_close(table.grad, prefix_parameter(hub).grad.view(table.shape))
    assert_same_gradients({n: g for n, g in grads_ours.items() if not n.startswith("prompt_encoder.")},
                          {n: g for n, g in grads_hub.items() if not n.endswith("control_trans")})


def test_adapterhub_mam_with_its_mlp_and_alone(tmp_path, tiny_model, tiny_batch):
    """The prefix MLP (flat=False) is read as its output P, PEFT's inference form; a prefix saved alone loads as a
    union of one. Placed as PEFT places a prefix (positions after it), the same P gives other outputs on BERT."""
    base, batch = tiny_model("bert_cls"), tiny_batch("bert_cls")
    hub = hub_saved(base, hub_mam(flat=False), tmp_path / "mam")
    ours = peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "mam").eval()
    assert not ours.prompt_encoder.prefix_projection
    assert_close(forward(ours, batch), forward(hub, batch))

    hub = hub_saved(base, adapters.PrefixTuningConfig(prefix_length=4, flat=True), tmp_path / "alone")
    alone = peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "alone").eval()
    assert isinstance(alone.peft_edu_config, peft_edu.ConfigUnion) and len(alone.peft_edu_config.configs) == 1
    assert_close(forward(alone, batch), forward(hub, batch))
    peft_placed = peft_edu.get_peft_model(copy.deepcopy(base), dataclasses.replace(
        alone.peft_edu_config.configs[0], inference_mode=False)).eval()
    with torch.no_grad():
        peft_placed.prompt_encoder.embedding.weight.copy_(alone.prompt_encoder.embedding.weight)
    assert not torch.allclose(forward(peft_placed, batch), forward(hub, batch), atol=1e-3)


def test_mam_config_is_adapterhubs(tiny_model, tiny_batch):
    """Defaults and trainable parameters as AdapterHub's MAMConfig (BERT: no grouped-query attention, so the prefix
    MLP has the same shape in both); training reaches the prefix MLP and the adapters' up projections (W_up = 0 at
    the start, so the down projections get no gradient on the first step, in AdapterHub too)."""
    base = tiny_model("bert_cls")
    config = peft_edu.MAMConfig(task_type="SEQ_CLS")
    prefix, adapter = config.configs
    assert (prefix.num_virtual_tokens, prefix.prefix_projection, prefix.encoder_hidden_size) == (30, True, 800)
    assert adapter == peft_edu.ParBnConfig()
    hub = hub_model(base, adapters.MAMConfig())
    ours = peft_edu.get_peft_model(copy.deepcopy(base), config)
    assert peft_edu.count_parameters(ours)[0] == sum(p.numel() for p in hub.parameters() if p.requires_grad)
    assert torch.equal(forward(ours.eval(), {k: v for k, v in tiny_batch("bert_cls").items() if k != "labels"}),
                       forward(_with_prefix_only(base, ours), tiny_batch("bert_cls")))  # the adapters start at 0
    ours.train()
    ours(**tiny_batch("bert_cls")).loss.backward()
    for name, p in trainable(ours).items():
        if ".adapter_down." not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def _with_prefix_only(base, mam):
    """``base`` with only the prefix of ``mam`` (same weights), as a union of one."""
    prefix = mam.peft_edu_config.configs[0]
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.ConfigUnion(prefix, task_type=prefix.task_type))
    model.prompt_encoder.load_state_dict(mam.prompt_encoder.state_dict())
    model.classifier.load_state_dict(mam.classifier.state_dict())
    return model.eval()


@pytest.mark.parametrize("kind", ["bert_cls", "llama"])
def test_mam_save_load_round_trip(kind, tmp_path, tiny_model, tiny_batch):
    base, batch = tiny_model(kind), tiny_batch(kind)
    task = "SEQ_CLS" if kind == "bert_cls" else "CAUSAL_LM"
    ours = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.MAMConfig(
        peft_edu.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8, task_type=task),
        peft_edu.ParBnConfig(reduction_factor=4), task_type=task))
    randomize_trainable(ours)
    peft_edu.save_adapter(ours, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "UNION"
    assert [c["peft_type"] for c in written["configs"]] == ["PREFIX_TUNING", "BOTTLENECK"]
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert "prompt_embeddings" in keys and all(k == "prompt_embeddings" or k.startswith("base_model.model.") for k in keys)
    again = peft_edu.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(forward(again, batch), forward(ours.eval(), batch))
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        peft_edu.merge(again)
    assert torch.equal(forward(peft_edu.unload(again), batch), forward(base, batch))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_mam_does_not_depend_on_the_attention_implementation(attn, tiny_model):
    """Greedy generate() (cache, positions continuing after the prompt) gives the tokens and logits of recomputing
    every step from scratch, and eager and sdpa attention agree, with and without padding."""
    def build(implementation):
        model = peft_edu.get_peft_model(tiny_model("llama", attn_implementation=implementation), peft_edu.MAMConfig(
            peft_edu.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"), task_type="CAUSAL_LM"))
        randomize_trainable(model)
        return model.eval()

    model, eager = build(attn), build("eager")
    prompt = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding
    assert_close(forward(model, {"input_ids": prompt, "attention_mask": mask}),
                 forward(eager, {"input_ids": prompt, "attention_mask": mask}))
    assert_close(forward(model, {"input_ids": prompt}), forward(eager, {"input_ids": prompt}))
    with torch.no_grad():
        out = model.generate(prompt[:1], max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        ids = prompt[:1]
        for step_logits in out.logits:
            logits = model(input_ids=ids).logits[:, -1]
            assert_close(step_logits, logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out.sequences, ids)
        # A cache reused by hand, without position_ids: the new tokens continue after the ones in the cache.
        first = model(input_ids=ids[:, :5], use_cache=True)
        later = model(input_ids=ids[:, 5:], past_key_values=first.past_key_values).logits
        assert_close(later, model(input_ids=ids).logits[:, 5:])


def test_mam_config_errors(tmp_path, tiny_model, tiny_batch):
    prefix = peft_edu.PrefixTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"MAMConfig needs a task_type"):
        peft_edu.MAMConfig()
    with pytest.raises(ValueError, match=r"member has task_type='SEQ_CLS', the ConfigUnion task_type='CAUSAL_LM'"):
        peft_edu.ConfigUnion(prefix, peft_edu.ParBnConfig(), task_type="CAUSAL_LM")
    with pytest.raises(ValueError, match=r"at most one PrefixTuningConfig"):
        peft_edu.ConfigUnion(prefix, prefix, task_type="SEQ_CLS")
    with pytest.raises(TypeError, match=r"MAMConfig\(prefix_tuning=PrefixTuningConfig\(...\), adapter=ParBnConfig"):
        peft_edu.MAMConfig(peft_edu.ParBnConfig(), task_type="SEQ_CLS")
    base = tiny_model("bert")
    for i, (hub_config, message) in enumerate([
            (adapters.PrefixTuningConfig(prefix_length=2, dropout=0.1), r"dropout=0\.1"),
            (adapters.PrefixTuningConfig(prefix_length=2, use_gating=True), r"use_gating=True"),
            (adapters.PrefixTuningConfig(prefix_length=2, leave_out=[0]), r"leave_out=\[0\]"),
            (adapters.PrefixTuningConfig(prefix_length=2, non_linearity="relu"), r"non_linearity='relu'")]):
        hub_saved(base, hub_config, tmp_path / str(i))
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match=r"prefix tuning uses options peft_edu does not implement: " + message):
            peft_edu.load_adapter(model, tmp_path / str(i))
        assert_unchanged(model, base, tiny_batch("bert"))


@pytest.mark.slow
def test_real_encoder_minilm_mam(minilm, tmp_path):
    base, batch = minilm
    check_real_model(base, batch, adapters.MAMConfig(), tmp_path, std=0.05)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M with eager attention (AdapterHub's prefix needs it, see section 8) and a padded batch."""
    tokenizer, model = peft_edu.assets.load_causal_lm()
    model.set_attn_implementation("eager")
    batch = tokenizer(["Adapters sit next to the MLP of every decoder layer.", "Hi"], padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    return model.eval(), dict(batch)


@pytest.mark.slow
@pytest.mark.parametrize("config_id", [*PRESETS, "mam"])
def test_real_causal_lm_smollm2(config_id, smollm2, tmp_path):
    """SmolLM2-135M (d = 576, 30 layers, grouped-query attention): AdapterHub's directory, equal outputs."""
    base, batch = smollm2
    # std 0.02: small, as 30 pre-norm layers add up every adapter's output
    check_real_model(base, batch, adapters.MAMConfig() if config_id == "mam" else PRESETS[config_id][0](), tmp_path,
                     std=0.02)
