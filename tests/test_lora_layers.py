"""LoRA, DoRA and IA³ on the layer types beyond nn.Linear (peft_edu.lora_layers) against PEFT 0.21.2.

``tests/test_peft_case_matrix.py`` runs PEFT's own custom-model cases; the tests here add the settings those cases
leave out (other initialisations, rsLoRA, dropout on convolutions, grouped IA³, GPT-2), check the claims the
classes' docstrings make (a convolution's LoRA is LoRA on the patch matrix; an embedding starts with A = 0), and the
errors for what is not supported.
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import peft_edu
from custom_models import (CUSTOM_INPUT, assert_same_tensors, build_custom, check_against_peft, check_mha_against_peft,
                           custom_run, file_tensors, forward_custom, random_adapter)
from parity import assert_close, has_adapter_parts, make_pair
from peft_edu.lora_layers import LoraConv, LoraEmbedding

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")


# --- equal to PEFT, in the settings PEFT's cases leave out ---------------------------------------------
@pytest.mark.parametrize("model_id, method, config", [
    ("EmbConv1D", "LoraConfig", {"target_modules": ["emb", "conv1d"], "init_lora_weights": False}),
    ("EmbConv1D", "LoraConfig", {"target_modules": ["emb", "conv1d"], "init_lora_weights": "gaussian", "r": 4}),
    ("EmbConv1D", "LoraConfig", {"target_modules": ["emb", "conv1d"], "use_dora": True, "use_rslora": True}),
    ("Conv1d", "LoraConfig", {"target_modules": ["conv1d"], "r": 2, "lora_alpha": 5, "init_lora_weights": False}),
    ("Conv2d", "LoraConfig", {"target_modules": ["conv2d", "lin0"], "lora_dropout": 0.3, "use_rslora": True}),
    ("Conv2d", "LoraConfig", {"target_modules": ["conv2d"], "lora_dropout": 0.3, "use_dora": True}),
    ("Conv3d", "LoraConfig", {"target_modules": ["conv3d"], "r": 4, "use_dora": True, "init_lora_weights": False}),
    ("Conv2dGroups", "LoraConfig", {"target_modules": ["conv2d"], "r": 16, "lora_dropout": 0.2}),
    ("Conv2dGroups", "IA3Config", {"target_modules": ["conv2d"], "feedforward_modules": ["conv2d"]}),
    ("Conv2dGroups", "IA3Config", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": [],
                                   "init_ia3_weights": False}),
    ("MlpUsingParameters", "LoraConfig", {"target_parameters": ["lin0.weight", "lin1.weight"],
                                          "init_lora_weights": False}),
], ids=["emb-conv1D-init-false", "emb-conv1D-gaussian", "emb-conv1D-dora-rslora", "conv1d-init-false",
        "conv2d-dropout-rslora", "conv2d-dora-dropout", "conv3d-dora-init-false", "grouped-conv-dropout",
        "grouped-conv-ia3-feedforward", "grouped-conv-ia3-init-false", "two-parameters-init-false"])
def test_equal_to_peft(model_id, method, config, tmp_path):
    """Initial tensors, outputs, gradients, merge / unmerge / merge_and_unload, disable_adapter, files both ways."""
    checks = check_against_peft(model_id, method, config, tmp_path)
    assert checks[0] == "init" and "gradients" in checks and "peft_edu file -> PEFT" in checks


def test_an_attention_s_out_proj_update_is_added_once_where_peft_adds_it_twice(tmp_path):
    """PEFT 0.21.2 adds out_proj's update twice (huggingface/peft PR #3774); everything else agrees."""
    checks = check_mha_against_peft({"target_modules": ["mha"], "r": 4, "lora_alpha": 16}, tmp_path)
    assert checks[0].startswith("PEFT file -> peft_edu") and "disable_adapter" in checks


def _tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()


@pytest.mark.parametrize("method, config", [
    ("LoraConfig", {"target_modules": ["c_attn", "c_proj", "wte"], "r": 4}),
    ("LoraConfig", {"target_modules": ["c_attn", "mlp.c_fc"], "r": 4, "use_dora": True}),
    ("IA3Config", {}),  # PEFT's defaults for gpt2: c_attn and mlp.c_proj, the latter feed-forward
], ids=["lora", "dora", "ia3-defaults"])
def test_gpt2_s_conv1d_layers_as_peft(method, config):
    base = _tiny_gpt2()
    batch = {"input_ids": torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))}
    ours, theirs = make_pair(base, method, **config)
    with torch.no_grad():
        for key, p in sorted(((n, p) for n, p in theirs.named_parameters() if p.requires_grad), key=lambda t: t[0]):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(key))))
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                mine[peft_name(name)].copy_(p)
    out_ours, out_theirs = ours(**batch).logits, theirs(**batch).logits
    assert_close(out_ours, out_theirs)
    assert not torch.allclose(out_theirs, base(**batch).logits, atol=1e-4)
    if method == "IA3Config":
        assert ours.peft_edu_config.target_modules == ["c_attn", "mlp.c_proj"]
        assert ours.peft_edu_config.fan_in_fan_out is True  # what PEFT writes for Conv1D targets
    out_ours.sum().backward()
    out_theirs.sum().backward()
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            assert_close(mine[peft_name(name)].grad, p.grad)


def peft_name(name: str) -> str:
    """PEFT's parameter name in peft_edu's spelling (adapter name "default" dropped)."""
    name = name.removeprefix("base_model.model.").replace(".lora_magnitude_vector.default.weight",
                                                          ".lora_magnitude_vector")
    return name.replace(".default.", ".").removesuffix(".default")


# --- what the docstrings claim ------------------------------------------------------------------
def test_a_convolution_s_lora_is_lora_on_the_patch_matrix():
    """s·B(A(x)) equals ΔW applied to every im2col patch, with ΔW = s·BA on the flattened weights: what merging adds."""
    torch.manual_seed(0)
    layer = LoraConv(nn.Conv2d(3, 6, 3, stride=2, padding=1), r=2, lora_alpha=4, init_lora_weights=False)
    x = torch.randn(2, 3, 7, 7)
    update = layer.lora_B(layer.lora_A(x)) * layer.scaling
    patches = F.unfold(x, 3, padding=1, stride=2)  # (batch, 3·3·3, positions)
    by_patches = (layer.delta_weight() @ patches).reshape(update.shape)
    assert_close(update, by_patches)
    assert layer.delta_weight().shape == layer.base_weight().shape == (6, 27)


def test_an_embedding_starts_with_a_zero_and_b_normal_and_learns_only_the_tokens_it_sees():
    torch.manual_seed(0)
    table = nn.Embedding(50, 8, padding_idx=0)
    layer = LoraEmbedding(table, r=4, lora_alpha=4)
    assert torch.equal(layer.lora_embedding_A, torch.zeros(4, 50))
    assert 0.5 < layer.lora_embedding_B.std() < 1.5  # N(0, 1): ΔW = BA = 0 all the same
    tokens = torch.tensor([[0, 3, 3, 7]])
    assert torch.equal(layer(tokens), table(tokens))
    layer(tokens).sum().backward()
    touched = layer.lora_embedding_A.grad.abs().sum(dim=0).nonzero().flatten().tolist()
    assert touched == [3, 7]  # token 0 is the padding index: no gradient, as for the table itself


# --- what is refused, and how ------------------------------------------------------------------------
def test_targeting_an_attention_s_out_proj_is_refused_with_advice_that_works():
    base = build_custom("MHA")
    model = copy.deepcopy(base)
    with pytest.raises(TypeError, match=r"'mha\.out_proj'.*reads out_proj\.weight directly.*target the attention itself "
                                        r"\('mha'\)") as refusal:
        peft_edu.get_peft_model(model, peft_edu.LoraConfig(target_modules=["out_proj"]))
    assert "not supported" in str(refusal.value) and not has_adapter_parts(model)
    with pytest.raises(TypeError, match=r"'mha\.out_proj'.*nn\.MultiheadAttention"):
        peft_edu.get_peft_model(model, peft_edu.IA3Config(target_modules=["out_proj"], feedforward_modules=[]))
    followed = peft_edu.get_peft_model(model, peft_edu.LoraConfig(target_modules=["mha"], init_lora_weights=False))
    assert not torch.allclose(forward_custom(followed, CUSTOM_INPUT), forward_custom(base, CUSTOM_INPUT), atol=1e-4)
    _, grads = custom_run(followed, CUSTOM_INPUT)
    assert {key.removeprefix("base_model.model.") for key in grads} == {
        "mha.lora_A.weight", "mha.lora_B.weight", "mha.base_layer.out_proj.lora_A.weight",
        "mha.base_layer.out_proj.lora_B.weight"}
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("model_id, method, config, error, message", [
    ("EmbConv1D", "IA3Config", {"target_modules": ["emb", "conv1d"], "feedforward_modules": []}, TypeError,
     r"selects 'emb', a Embedding; this method does not support that layer type: it adapts only Linear, Conv1D, "
     r"Conv2d, Conv3d layers"),
    ("Conv1d", "IA3Config", {"target_modules": ["conv1d"], "feedforward_modules": []}, TypeError,
     r"selects 'conv1d', a Conv1d; this method does not support that layer type"),
    ("MHA", "LoraConfig", {"target_modules": ["mha", "lin0"], "use_dora": True}, TypeError,
     r"mha \(MultiheadAttention\): LoRA with use_dora=True is not supported for a MultiheadAttention layer; it is "
     r"supported for Linear, Conv1D, Embedding, Conv1d, Conv2d, Conv3d layers"),
    ("MHA", "LoraConfig", {"target_modules": ["mha"], "lora_dropout": 0.1}, ValueError,
     r"mha \(MultiheadAttention\): lora_dropout=0\.1 is not supported for an nn\.MultiheadAttention"),
    ("MHA", "LoraConfig", {"target_modules": ["mha"], "lora_bias": True}, ValueError,
     r"lora_bias=True is not supported for an nn\.MultiheadAttention"),
    ("EmbConv1D", "LoraConfig", {"target_modules": ["conv1d", "emb"], "lora_bias": True}, ValueError,
     r"emb \(Embedding\): lora_bias=True is not supported for an nn\.Embedding"),
    ("Conv2dGroups", "LoraConfig", {"target_modules": ["conv2d"], "use_dora": True}, ValueError,
     r"conv2d \(Conv2d\): DoRA on a convolution with groups=8 is not supported"),
    ("Conv2dGroups", "LoraConfig", {"target_modules": ["conv2d"], "r": 4}, ValueError,
     r"conv2d \(Conv2d\): r=4 with groups=8 is not supported: .* choose r = a multiple of 8"),
    ("MLP", "LoraConfig", {"target_parameters": ["lin0.bias"]}, ValueError,
     r"'lin0\.bias', a 1-D parameter: only matrices \(2-D\) are supported"),
    ("MLP", "LoraConfig", {"target_parameters": ["lin0.wieght"]}, ValueError,
     r"target_parameters entry 'lin0\.wieght' matches no parameter of CustomMLP"),
    ("MLP", "LoraConfig", {"target_modules": ["lin0"], "target_parameters": ["lin0.weight"]}, ValueError,
     r"'lin0\.weight', a parameter of a module that is already adapted .* not supported"),
], ids=["ia3-embedding", "ia3-nn-conv1d", "dora-attention", "attention-dropout", "attention-lora-bias",
        "embedding-lora-bias", "dora-grouped-conv", "grouped-conv-rank", "parameter-not-a-matrix",
        "parameter-typo", "parameter-already-adapted"])
def test_a_layer_that_is_not_supported_is_named_with_its_type_and_nothing_changes(model_id, method, config, error,
                                                                                   message):
    base = build_custom(model_id)
    model = copy.deepcopy(base)
    with pytest.raises(error, match=message):
        peft_edu.get_peft_model(model, getattr(peft_edu, method)(**config))
    assert not has_adapter_parts(model) and not hasattr(model, "peft_edu_config")
    assert torch.equal(forward_custom(model, CUSTOM_INPUT), forward_custom(base, CUSTOM_INPUT))


@pytest.mark.parametrize("layer, message", [
    (nn.Conv2d(4, 4, 3, dilation=2), r"dilation=\(2, 2\) and padding_mode='zeros' is not supported"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), r"padding_mode='reflect' is not supported"),
    (nn.Embedding(10, 4, max_norm=1.0), r"max_norm=1\.0 is not supported"),
    (nn.MultiheadAttention(8, 2, kdim=4), r"kdim or vdim other than embed_dim is not supported"),
], ids=["dilated-conv", "reflect-padding", "embedding-max-norm", "attention-kdim"])
def test_layers_lora_cannot_follow_are_refused(layer, message):
    with pytest.raises(ValueError, match=message):
        peft_edu.get_peft_model(nn.Sequential(layer), peft_edu.LoraConfig(target_modules=["0"]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(lora_bias=True, use_dora=True), r"lora_bias=True with use_dora=True is not supported"),
    (dict(target_parameters=["w"], lora_dropout=0.1), r"target_parameters with lora_dropout=0\.1 is not supported"),
    (dict(target_parameters="lin0.weight"), r"target_parameters='lin0\.weight': give a non-empty list"),
    (dict(lora_bias="yes"), r"lora_bias='yes': must be True or False"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peft_edu.LoraConfig(**{"target_modules": ["lin0"], **kwargs})


def test_peft_options_peft_edu_lacks_are_named_not_just_unexpected():
    with pytest.raises(TypeError, match=r"use_qalora=True: PEFT's LoraConfig option 'use_qalora' is not supported"):
        peft_edu.LoraConfig(target_modules=["lin0"], use_qalora=True)
    with pytest.raises(TypeError, match=r"no option 'lora_alpah' \(neither peft_edu's nor PEFT's\).*'lora_alpha'"):
        peft_edu.LoraConfig(target_modules=["lin0"], lora_alpah=16)


def test_merging_a_lora_bias_into_a_layer_without_bias_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    model = peft_edu.get_peft_model(model, peft_edu.LoraConfig(target_modules=["0", "1"], lora_bias=True,
                                                               init_lora_weights=False))
    x = torch.randn(3, 4)
    before = model(x)
    with pytest.raises(ValueError, match=r"Merging 0 failed.*lora_bias=True, but the base layer has no bias"):
        peft_edu.merge(model)
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, peft_edu.LoraLinear))
    assert torch.equal(model(x), before)


def test_a_grouped_convolution_trains_but_does_not_merge_as_in_peft():
    base = build_custom("Conv2dGroups")
    ours, theirs = make_pair(base, "LoraConfig", target_modules=["conv2d"])
    with pytest.raises(NotImplementedError, match=r"Merging conv2d failed.*groups=8 is not supported"):
        peft_edu.merge(ours)
    with pytest.raises(NotImplementedError):
        theirs.merge_adapter()


# --- fan_in_fan_out ----------------------------------------------------------------------------------
def test_fan_in_fan_out_follows_the_layer_type_and_is_saved_as_peft_sets_it(tmp_path):
    base = build_custom("EmbConv1D")
    conv1d = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(target_modules=["conv1d"]))
    linear = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(target_modules=["lin0"],
                                                                               fan_in_fan_out=True))
    assert conv1d.peft_edu_config.fan_in_fan_out is True and linear.peft_edu_config.fan_in_fan_out is False
    peft_edu.save_adapter(conv1d, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to True"):  # PEFT corrects the flag per layer
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["conv1d"]))
    theirs.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded = peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert_close(forward_custom(loaded, CUSTOM_INPUT), forward_custom(theirs, CUSTOM_INPUT))


# --- PiSSA and OLoRA: initialisations that change W₀ ----------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_pissa_and_olora_start_where_peft_starts(init, use_dora):
    """The same A₀, B₀ and residual W₀ − s·B₀A₀ as PEFT (pissa_niter_K: from the same RNG state), and the same output
    as the base model."""
    base = build_custom("MLP")
    ours, theirs = make_pair(base, "LoraConfig", target_modules=["lin0", "lin1"], r=2, lora_alpha=4,
                             init_lora_weights=init, use_dora=use_dora)
    assert_same_tensors(file_tensors(ours), file_tensors(theirs), rel=1e-6, what="initial factors")
    for name in ("lin0", "lin1"):
        residual = ours.get_submodule(name).base_layer.weight
        assert_close(residual, theirs.base_model.model.get_submodule(name).base_layer.weight)
        assert not torch.allclose(residual, base.get_submodule(name).weight, atol=1e-3)  # W₀ did change
    assert_close(forward_custom(ours, CUSTOM_INPUT), forward_custom(base, CUSTOM_INPUT), rel=1e-5)


@pytest.mark.parametrize("model_id, config", [
    ("MLP", {"target_modules": ["lin0", "lin1"], "r": 2, "init_lora_weights": "pissa"}),
    ("MLP", {"target_modules": ["lin0"], "r": 3, "init_lora_weights": "olora", "use_dora": True}),
    ("EmbConv1D", {"target_modules": ["conv1d", "lin0"], "r": 1, "init_lora_weights": "pissa"}),
], ids=["pissa", "olora-dora", "pissa-conv1D"])
def test_pissa_and_olora_adapters_travel_both_ways_on_the_pretrained_base(model_id, config, tmp_path):
    """A PEFT PiSSA/OLoRA adapter is loaded as PEFT loads it: the decomposition of the pretrained base is taken again
    (it is deterministic), then the trained A and B replace A₀ and B₀. The same file read by either library gives
    the same model."""
    base = build_custom(model_id)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    random_adapter(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    expected = forward_custom(theirs, CUSTOM_INPUT)
    ours = peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert_close(forward_custom(ours, CUSTOM_INPUT), expected, rel=1e-5)
    peft_edu.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == \
        config["init_lora_weights"]
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(forward_custom(again, CUSTOM_INPUT), expected, rel=1e-5)
    peft_edu.merge(ours)
    assert_close(forward_custom(ours, CUSTOM_INPUT), expected, rel=1e-5)


def test_taking_a_pissa_adapter_out_gives_back_the_pretrained_model_unlike_peft():
    """unload and disable_adapter put s·B₀A₀ back into W₀; PEFT leaves the residual W₀ − s·B₀A₀ (its documented
    behaviour), so its disabled model is not the pretrained one."""
    base = build_custom("MLP")
    ours, theirs = make_pair(base, "LoraConfig", target_modules=["lin0"], r=2, init_lora_weights="pissa")
    random_adapter(ours)
    with peft_edu.disable_adapter(ours):
        assert_close(ours.lin0.weight, base.lin0.weight, rel=1e-6)
    adapted = forward_custom(ours, CUSTOM_INPUT)
    assert not torch.allclose(ours.lin0.base_layer.weight, base.lin0.weight, atol=1e-3)  # the residual again
    with theirs.disable_adapter():
        assert not torch.allclose(theirs.base_model.model.lin0.base_layer.weight, base.lin0.weight, atol=1e-3)
    assert_close(forward_custom(ours, CUSTOM_INPUT), adapted, rel=0)
    plain = peft_edu.unload(ours)
    for name, param in base.named_parameters():
        assert_close(plain.get_parameter(name), param, rel=1e-6)


def test_a_pissa_niter_adapter_is_refused_at_load_with_the_conversion_advice(tmp_path):
    base = build_custom("MLP")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["lin0"], r=2,
                                                                       init_lora_weights="pissa_niter_3"))
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa_niter_3' cannot be loaded exactly: .*randomized "
                                         r"SVD.*path_initial_model_for_weight_conversion"):
        peft_edu.load_adapter(model, tmp_path)
    assert not has_adapter_parts(model) and torch.equal(model.lin0.weight, base.lin0.weight)


@pytest.mark.parametrize("model_id, config, message", [
    ("Conv2d", {"target_modules": ["conv2d"], "init_lora_weights": "pissa"},
     r"init_lora_weights='pissa' is not supported for a Conv2d layer, only for Linear, Conv1D layers"),
    ("EmbConv1D", {"target_modules": ["emb"], "init_lora_weights": "olora"},
     r"init_lora_weights='olora' is not supported for an Embedding layer, only for Linear layers"),
    ("EmbConv1D", {"target_modules": ["conv1d"], "r": 1, "init_lora_weights": "olora"},
     r"'olora' is not supported for a Conv1D layer"),
    ("MLP", {"target_modules": ["lin1"], "r": 4, "init_lora_weights": "pissa"},
     r"init_lora_weights='pissa' with r=4 is not supported for a 2×20 weight: .* choose r ≤ 2"),
], ids=["conv", "embedding", "olora-conv1D", "rank-too-large"])
def test_pissa_and_olora_where_they_cannot_work_are_refused(model_id, config, message):
    base = build_custom(model_id)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message):
        peft_edu.get_peft_model(model, peft_edu.LoraConfig(**config))
    assert not has_adapter_parts(model)
    assert torch.equal(forward_custom(model, CUSTOM_INPUT), forward_custom(base, CUSTOM_INPUT))
