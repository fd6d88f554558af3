"""peft_edu's DoRA against Hugging Face PEFT: same numbers, same files, same report; a lighter norm.

Every comparison builds one seeded base model and deepcopies it for peft_edu and for PEFT. The
adapter is given non-zero B (at init B = 0 and DoRA equals its base) and a magnitude m moved away
from its initial value ‖W₀ + sBA‖ (with m equal to the norm, DoRA equals plain LoRA, so m would not
be tested). Names map one to one: PEFT's ``X.lora_magnitude_vector.default.weight`` is our
``X.lora_magnitude_vector`` (and both files say ``X.lora_magnitude_vector``).
"""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

import parity
import peft_edu
from parity import (
    assert_close,
    assert_same_report,
    assert_same_run,
    copy_peft_into_ours,
    forward,
    forward_backward,
    layers_of,
    ours_saved,
    pair_maker,
    peft_saved,
    peft_trainable,
    trainable,
)
from peft_edu.dora import DoraLinear

BERT_QV = ["query", "value"]
LLAMA_ATTN_MLP = ["q_proj", "v_proj", "o_proj", "gate_proj"]


# --- helpers (the shared ones are in parity.py) --------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")
make_pair = pair_maker("LoraConfig", use_dora=True)


def randomize_trainable(model, seed=0, std=0.1, magnitude_spread=0.3):
    """New random lora_A, lora_B and head; each magnitude scaled by 1 + spread·N(0, 1) (away from its init)."""
    parity.randomize_trainable(model, seed, draw=lambda name, p, noise: (
        p * (1 + magnitude_spread * noise) if "lora_magnitude_vector" in name else noise * std))


def dora_layers(model) -> dict[str, DoraLinear]:
    return layers_of(model, DoraLinear)


# --- 1. config and injection ----------------------------------------------------------------------
def test_config_and_injection_pick_dora(tiny_model):
    config = peft_edu.LoraConfig(r=4, target_modules=BERT_QV, use_dora=True)
    assert config.to_peft_dict()["use_dora"] is True
    assert peft_edu.config.config_from_peft_dict(config.to_peft_dict()).use_dora is True
    model = peft_edu.get_peft_model(tiny_model("bert"), config)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, peft_edu.LoraLinear)}
    assert len(layers) == 4 and all(type(m) is DoraLinear for m in layers.values())
    plain = peft_edu.get_peft_model(tiny_model("bert"), peft_edu.LoraConfig(r=4, target_modules=BERT_QV))
    assert not dora_layers(plain)
    layer = model.encoder.layer[0].attention.self.query
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == [
        "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"]
    assert layer.lora_magnitude_vector.shape == (32,)


# --- 2. initialisation --------------------------------------------------------------------------
@pytest.mark.parametrize("kind,targets", [("bert_cls", BERT_QV), ("llama", LLAMA_ATTN_MLP)], ids=["bert_cls", "llama"])
def test_init_magnitude_is_the_row_norm_and_equals_peft(kind, targets, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    ours, theirs = make_pair(base, r=4, lora_alpha=8, target_modules=targets)
    theirs_params = peft_trainable(theirs)
    for name, layer in dora_layers(ours).items():
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        row_norms = torch.linalg.vector_norm(layer.base_layer.weight, dim=1)
        torch.testing.assert_close(layer.lora_magnitude_vector, row_norms, rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.lora_magnitude_vector, theirs_params[name + ".lora_magnitude_vector"],
                                   rtol=1e-6, atol=0)
        # Same RNG state -> the very same A as PEFT (DoRA's init draws no random numbers).
        assert torch.equal(layer.lora_A.weight, theirs_params[name + ".lora_A.weight"])
    # g = m/‖W₀‖ = 1 and B = 0: the base model, up to the rounding of W₀x + b.
    assert_close(forward(ours, batch), forward(base, batch))


# --- 3. same weights -> same outputs and gradients as PEFT --------------------------------------
EQUIV_CASES = [
    pytest.param("bert_cls", dict(r=4, lora_alpha=8, target_modules=BERT_QV, task_type="SEQ_CLS"), id="bert_cls-qv"),
    pytest.param("bert", dict(r=2, lora_alpha=5, target_modules=["query", "key", "value", "dense"], use_rslora=True),
                 id="bert-qkv,dense-rslora"),
    pytest.param("llama", dict(r=8, lora_alpha=16, target_modules=LLAMA_ATTN_MLP, task_type="CAUSAL_LM"),
                 id="llama-q,v,o,gate"),
    pytest.param("llama_cls", dict(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj"], task_type="SEQ_CLS"),
                 id="llama_cls-q,k"),
]


@pytest.mark.parametrize("mode", ["eval", "train-dropout", "train-no-dropout"])
@pytest.mark.parametrize("kind,config", EQUIV_CASES)
def test_outputs_and_gradients_equal_peft(kind, config, mode, tiny_model, tiny_batch):
    # BERT keeps its own hidden/attention dropout 0.1 in train mode: the RNG order must agree too.
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    dropout = 0.3 if mode == "train-dropout" else 0.0
    ours, theirs = make_pair(base, lora_dropout=dropout, **config)
    randomize_trainable(theirs, seed=config["r"])
    copy_peft_into_ours(theirs, ours)
    ours.train(mode != "eval"), theirs.train(mode != "eval")

    out_ours, _, grads_ours = assert_same_run(ours, theirs, batch, seed=5)
    n_layers = len(dora_layers(ours))
    assert sum(n.endswith("lora_magnitude_vector") for n in grads_ours) == n_layers > 0

    if mode == "train-dropout":  # dropout really acts: another seed, other masks, another output
        assert not torch.allclose(forward_backward(ours, batch, seed=6).output, out_ours, atol=1e-4)
    # The adapter changes the output, and so does m on its own: with m = ‖W₀ + sBA‖ (g = 1) DoRA is
    # plain LoRA with the same A and B, which the perturbed m must not give.
    ours.eval()
    out_eval = forward(ours, batch)
    assert not torch.allclose(out_eval, forward(base, batch), atol=1e-3)
    with torch.no_grad():
        for layer in dora_layers(ours).values():
            layer.lora_magnitude_vector.copy_(layer.weight_norm())
    as_lora = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(**config)).eval()
    with torch.no_grad():
        for name, p in trainable(as_lora).items():
            p.copy_(trainable(ours)[name])
    assert_close(forward(ours, batch), forward(as_lora, batch))
    assert not torch.allclose(out_eval, forward(as_lora, batch), atol=1e-3)


def test_training_steps_follow_peft(tiny_model, tiny_batch):
    """Five AdamW steps in train mode with dropout: the parameters stay equal to PEFT's."""
    base = tiny_model("llama_cls")
    ours, theirs = make_pair(base, r=4, lora_alpha=8, lora_dropout=0.2, target_modules=LLAMA_ATTN_MLP,
                             task_type="SEQ_CLS")
    randomize_trainable(theirs, std=0.05, magnitude_spread=0.1)
    copy_peft_into_ours(theirs, ours)
    start = {n: p.detach().clone() for n, p in trainable(ours).items()}
    ours.train(), theirs.train()
    opt_ours = torch.optim.AdamW(trainable(ours).values(), lr=1e-2)
    opt_theirs = torch.optim.AdamW(peft_trainable(theirs).values(), lr=1e-2)
    for step in range(5):
        batch = tiny_batch("llama_cls", seed=step)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            torch.manual_seed(step)
            model(**batch).loss.backward()
            opt.step()
    final_theirs = peft_trainable(theirs)
    for name, p in trainable(ours).items():
        assert not torch.equal(p, start[name]), f"{name} did not train"
        assert_close(p, final_theirs[name], rel=1e-5)


# --- 4. the layer's formula, dropout and the detached norm ---------------------------------------
def make_layer(d_in=16, d_out=8, r=4, lora_alpha=8, lora_dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = DoraLinear(nn.Linear(d_in, d_out), r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B.weight, std=0.3)
        layer.lora_magnitude_vector.mul_(1 + 0.5 * torch.rand(d_out))
    return layer


def test_layer_formula_eval_and_train_with_dropout():
    layer = make_layer(lora_dropout=0.5)
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight, layer.lora_B.weight
    m, s = layer.lora_magnitude_vector, layer.scaling
    x = torch.randn(6, 16)
    with torch.no_grad():
        V = W + s * B @ A
        g = m / V.norm(dim=1)
        layer.eval()
        assert_close(layer(x), x @ (g[:, None] * V).T + b)  # W' = m ⊙ V / ‖V‖
        layer.train()
        torch.manual_seed(3)
        y = layer(x)
        torch.manual_seed(3)
        xd = F.dropout(x, 0.5, training=True)
        assert (xd == 0).any()
        # PEFT's train-mode value: the base output keeps x, the DoRA part sees dropout(x), W₀ included.
        assert_close(y, x @ W.T + b + (g - 1) * (xd @ W.T) + g * s * (xd @ A.T @ B.T))
        assert not torch.allclose(y, xd @ (g[:, None] * V).T + b, atol=1e-3)  # not DoRA applied to dropout(x)
        assert not torch.allclose(y, x @ (g[:, None] * V).T + b, atol=1e-3)


def test_dropout_zero_gives_the_eval_formula_in_train_mode():
    layer = make_layer(lora_dropout=0.0)
    assert isinstance(layer.lora_dropout, nn.Identity)
    x = torch.randn(5, 16)
    layer.eval()
    expected = layer(x).detach()
    layer.train()
    assert torch.equal(layer(x).detach(), expected)


def test_norm_is_a_constant_in_backward():
    layer = make_layer()
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, m, s = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, layer.scaling
    x = torch.randn(7, 16)
    target = torch.randn(7, 8)
    ((layer(x) - target) ** 2).sum().backward()
    grads = [p.grad.clone() for p in (A, B, m)]

    def reference(detach: bool):
        A_, B_, m_ = (p.detach().clone().requires_grad_() for p in (A, B, m))
        V = W + s * B_ @ A_
        norm = V.norm(dim=1)
        y = x @ ((m_ / (norm.detach() if detach else norm))[:, None] * V).T + b
        ((y - target) ** 2).sum().backward()
        return [A_.grad, B_.grad, m_.grad]

    for ours, ref in zip(grads, reference(detach=True)):
        assert_close(ours, ref)
    # With the norm in the graph, the gradients of A and B differ (m's does not: ∂h/∂m is the same).
    with_graph = reference(detach=False)
    assert not torch.allclose(grads[0], with_graph[0], atol=1e-4)
    assert not torch.allclose(grads[1], with_graph[1], atol=1e-4)


# --- 5. the memory-light norm -------------------------------------------------------------------
def layer_like(d_out, d_in, r, b_std, dtype, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    nn.init.normal_(base.weight, std=0.04)  # the scale of MiniLM's and SmolLM2's projection weights
    layer = DoraLinear(base, r=r, lora_alpha=2 * r).to(dtype)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B.weight, std=b_std)
    return layer


def dense_norm_float64(layer):
    W = layer.base_layer.weight.double()
    return torch.linalg.vector_norm(W + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double(),
                                    dim=1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)], ids=["float32", "float64"])
@pytest.mark.parametrize("b_std", [0.0, 0.01, 0.1, 1.0])  # ‖sBA‖/‖W₀‖ from 0 to about 4
@pytest.mark.parametrize("shape", [(384, 384), (576, 1536), (1536, 576)], ids=["384x384", "576x1536", "1536x576"])
def test_light_norm_equals_dense_norm(shape, b_std, dtype, tol):
    # Observed (max relative error over rows, vs the dense float64 norm): float32 up to 2.4e-7 for
    # the light norm and 2.0e-7 for the dense one; float64 up to 1.7e-15.
    layer = layer_like(*shape, r=8, b_std=b_std, dtype=dtype)
    exact = dense_norm_float64(layer)
    light, dense = layer.weight_norm(), layer.dense_weight_norm()
    assert light.dtype == dtype and light.shape == (shape[0],)
    assert ((light.double() - exact).abs() / exact).max() < tol
    assert ((dense.double() - exact).abs() / exact).max() < tol
    if b_std > 0:  # the update changes the norm by more than the tolerance: the test can see B
        row_norms = torch.linalg.vector_norm(layer.base_layer.weight.double(), dim=1)
        assert ((row_norms - exact).abs() / exact).max() > 100 * tol


def test_light_norm_when_the_update_cancels_w0():
    """The one weak spot of the expanded form: ‖w + sBA‖ ≪ ‖w‖ (the update erases a row).

    The error of ‖w‖² + 2s⟨w, BA⟩ + s²‖BA‖² is about ε‖w‖², so the relative error of the norm
    grows like ε‖w‖²/‖w + sBA‖². A rank-r update can only do this to rows inside the span of A,
    which training does not produce; here it is forced with r = d_in and BA = −(1 − δ)W₀.
    """
    for dtype, eps in ((torch.float32, 2.0 ** -24), (torch.float64, 2.0 ** -53)):
        layer = layer_like(64, 64, r=64, b_std=0, dtype=dtype)
        W = layer.base_layer.weight
        for delta in (1e-1, 1e-2, 1e-3, 0.0):
            with torch.no_grad():
                layer.lora_A.weight.copy_(torch.eye(64))
                layer.lora_B.weight.copy_(-(1 - delta) * W / layer.scaling)
            light = layer.weight_norm()
            assert torch.isfinite(light).all() and (light >= 0).all()  # clamped at 0: no NaN from sqrt(<0)
            exact = dense_norm_float64(layer)
            w2 = torch.linalg.vector_norm(W.double(), dim=1) ** 2
            bound = 64 * 64 * eps * w2  # a loose bound on the error of the squared norm
            assert ((light.double() ** 2 - exact ** 2).abs() <= bound).all(), (dtype, delta)
    # In float32 a shortening to 1e-3 is already visible (a relative error far above 1e-6) ...
    layer = layer_like(64, 64, r=64, b_std=0, dtype=torch.float32)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.eye(64))
        layer.lora_B.weight.copy_(-(1 - 1e-3) * layer.base_layer.weight / layer.scaling)
    exact = dense_norm_float64(layer)
    assert ((layer.weight_norm().double() - exact).abs() / exact).max() > 1e-4
    # ... while the dense float32 norm is not affected.
    assert ((layer.dense_weight_norm().double() - exact).abs() / exact).max() < 1e-6


def test_cached_base_norm_follows_w0():
    layer = make_layer()
    before = layer.weight_norm()
    with torch.no_grad():
        layer.base_layer.weight.mul_(2)  # in place: the version counter changes
    assert_close(layer.weight_norm(), layer.dense_weight_norm())
    assert not torch.allclose(layer.weight_norm(), before)
    with torch.no_grad():
        layer.base_layer.weight = nn.Parameter(torch.randn(8, 16), requires_grad=False)  # a new tensor
    assert_close(layer.weight_norm(), layer.dense_weight_norm())
    copied = copy.deepcopy(layer)
    with torch.no_grad():
        copied.base_layer.weight.add_(1)
    assert_close(copied.weight_norm(), copied.dense_weight_norm())
    assert_close(layer.weight_norm(), layer.dense_weight_norm())
    # A write through .data bypasses the version counter; clear_norm_cache() is the way out.
    layer.base_layer.weight.data.mul_(3)
    layer.clear_norm_cache()
    assert_close(layer.weight_norm(), layer.dense_weight_norm())
    assert "lora_magnitude_vector" in layer.state_dict() and len(layer.state_dict()) == 5  # the cache is not saved


# --- 6. merge / unmerge -------------------------------------------------------------------------
@pytest.mark.parametrize("kind,targets,task_type", [("bert_cls", BERT_QV, "SEQ_CLS"),
                                                    ("llama", LLAMA_ATTN_MLP, "CAUSAL_LM")], ids=["bert_cls", "llama"])
def test_merge_equals_peft_and_unmerge_restores_w0(kind, targets, task_type, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    ours, theirs = make_pair(base, r=4, lora_alpha=8, target_modules=targets, task_type=task_type)
    randomize_trainable(theirs)
    copy_peft_into_ours(theirs, ours)
    ours.eval(), theirs.eval()
    originals = {n: m.base_layer.weight.detach().clone() for n, m in dora_layers(ours).items()}
    unmerged_out = forward(ours, batch)

    peft_edu.merge(ours)
    assert all(m.merged for m in dora_layers(ours).values())
    assert_close(forward(ours, batch), unmerged_out, rel=1e-5)
    merged_by_peft = theirs.merge_and_unload()
    for name, layer in dora_layers(ours).items():
        W0, V = originals[name], originals[name] + layer.delta_weight()
        m = layer.lora_magnitude_vector
        assert_close(layer.base_layer.weight, (m / V.norm(dim=1))[:, None] * V)  # W' = m ⊙ V / ‖V‖
        assert_close(layer.base_layer.weight, merged_by_peft.get_submodule(name).weight)
        assert not torch.allclose(layer.base_layer.weight, W0 + layer.delta_weight(), atol=1e-4)  # not LoRA's merge

    peft_edu.unmerge(ours)
    for name, layer in dora_layers(ours).items():
        torch.testing.assert_close(layer.base_layer.weight, originals[name], rtol=0, atol=1e-6)
    assert_close(forward(ours, batch), unmerged_out, rel=1e-5)
    peft_edu.merge(ours)
    peft_edu.unload(ours)  # unmerges first
    assert_close(forward(ours, batch), forward(base, batch), rel=1e-5)


def test_unmerge_uses_the_merge_factor_even_if_m_changed():
    layer = make_layer().eval()
    W0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(2)  # e.g. an optimizer step on a merged model
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=0, atol=1e-6)


def test_merge_refuses_a_zero_magnitude():
    layer = make_layer().eval()
    W0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_magnitude_vector[2] = 0
    with pytest.raises(ValueError, match="could not be unmerged"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, W0)


# --- 7. adapter files ---------------------------------------------------------------------------
FILE_CASES = [
    pytest.param("bert_cls", dict(r=4, lora_alpha=8, target_modules=BERT_QV, task_type="SEQ_CLS"), id="bert_cls"),
    pytest.param("llama", dict(r=8, lora_alpha=16, target_modules=LLAMA_ATTN_MLP, task_type="CAUSAL_LM",
                               use_rslora=True, lora_dropout=0.1), id="llama"),
    pytest.param("llama_cls", dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"),
                 id="llama_cls"),
]


@pytest.mark.parametrize("kind,config", FILE_CASES)
def test_peft_edu_file_loads_in_peft(kind, config, tmp_path, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    ours = ours_saved(base, peft_edu.LoraConfig(use_dora=True, **config), tmp_path, randomize_trainable)

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["use_dora"] is True and written["peft_type"] == "LORA"
    assert peft.LoraConfig.from_pretrained(tmp_path).use_dora is True
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    magnitude_keys = [k for k in keys if k.endswith(".lora_magnitude_vector")]
    assert len(magnitude_keys) == len(dora_layers(ours)) > 0
    assert "base_model.model." + next(iter(dora_layers(ours))) + ".lora_magnitude_vector" in keys
    # The same tensor names as the file PEFT itself writes for this config.
    fresh = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(use_dora=True, **config))
    fresh.save_pretrained(tmp_path / "peft")
    assert keys == sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    for name, p in peft_trainable(fresh).items():  # every tensor arrived, the magnitudes included
        if "lora_magnitude_vector" in name:
            loaded = theirs.get_submodule("base_model.model." + name.removesuffix(".lora_magnitude_vector"))
            assert torch.equal(loaded.lora_magnitude_vector["default"].weight,
                               dict(ours.named_parameters())[name])
    assert_close(forward(theirs, batch), forward(ours, batch))
    assert not torch.allclose(forward(theirs, batch), forward(base, batch), atol=1e-3)


@pytest.mark.parametrize("kind,config", FILE_CASES)
def test_peft_file_loads_in_peft_edu(kind, config, tmp_path, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    theirs = peft_saved(base, peft.LoraConfig(use_dora=True, **config), tmp_path, randomize_trainable)
    ours = peft_edu.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert ours.peft_edu_config.use_dora is True
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for name, layer in dora_layers(ours).items():
        assert torch.equal(layer.lora_magnitude_vector, saved[f"base_model.model.{name}.lora_magnitude_vector"])
    assert_close(forward(ours, batch), forward(theirs, batch))
    assert not torch.allclose(forward(ours, batch), forward(base, batch), atol=1e-3)
    # And our own round trip is bit exact.
    peft_edu.save_adapter(ours, tmp_path / "again")
    again = peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "again").eval()
    assert torch.equal(forward(again, batch), forward(ours, batch))


def test_wrong_magnitude_shape_names_the_tensor(tmp_path, tiny_model):
    base = tiny_model("bert")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(r=4, target_modules=BERT_QV,
                                                                             use_dora=True))
    peft_edu.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.encoder.layer.1.attention.self.value.lora_magnitude_vector"
    tensors[key] = torch.ones(31)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"Shape mismatch at encoder\.layer\.1\.attention\.self\.value: the file has "
                                         r"lora_magnitude_vector of shape \(31,\), the model expects \(32,\).*"
                                         r"r=4, use_dora=True"):
        peft_edu.load_adapter(copy.deepcopy(base), tmp_path)


def test_plain_lora_file_does_not_load_as_dora(tmp_path, tiny_model):
    """A DoRA file has one more tensor per layer: loading it as LoRA (or back) must fail, not drop m."""
    base = tiny_model("bert")
    dora = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(r=4, target_modules=BERT_QV,
                                                                            use_dora=True))
    peft_edu.save_adapter(dora, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"4 tensors in the file have no place in the model.*lora_magnitude_vector"):
        peft_edu.load_adapter(copy.deepcopy(base), tmp_path)


# --- 8. trainable parameter report --------------------------------------------------------------
@pytest.mark.parametrize("kind,config", [
    ("bert_cls", dict(r=4, target_modules=BERT_QV, task_type="SEQ_CLS")),
    ("bert", dict(r=2, target_modules=["query", "key", "value", "dense"])),
    ("llama", dict(r=8, target_modules=LLAMA_ATTN_MLP + ["up_proj", "down_proj"], task_type="CAUSAL_LM")),
], ids=["bert_cls", "bert-all", "llama-all"])
def test_parameter_report_equals_peft(kind, config, capsys, tiny_model):
    ours, theirs = make_pair(tiny_model(kind), **config)
    assert peft_edu.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert_same_report(ours, theirs, capsys)
    plain = peft_edu.get_peft_model(tiny_model(kind), peft_edu.LoraConfig(**config))
    # DoRA adds one magnitude per output feature of every adapted layer.
    extra = sum(m.base_layer.out_features for m in dora_layers(ours).values())
    assert peft_edu.count_parameters(ours)[0] == peft_edu.count_parameters(plain)[0] + extra > 0


# --- 9. the real pretrained models (slow) -------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    try:
        from peft_edu.assets import load_encoder

        torch.manual_seed(0)  # the new classification head is random
        tokenizer, model = load_encoder(num_labels=2)
    except Exception as e:  # noqa: BLE001 - a missing asset package
        pytest.skip(f"MiniLM is not available offline: {type(e).__name__}: {e}")
    batch = tokenizer(["DoRA rescales each output feature.", "A short one."], padding=True, return_tensors="pt")
    batch = dict(batch)
    batch["labels"] = torch.tensor([1, 0])
    return model.eval(), batch


@pytest.fixture(scope="module")
def smollm2():
    try:
        from peft_edu.assets import load_causal_lm

        tokenizer, model = load_causal_lm()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SmolLM2 is not available offline: {type(e).__name__}: {e}")
    batch = dict(tokenizer(["What is DoRA?", "A magnitude and a direction for every row."], padding=True,
                           return_tensors="pt"))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model.eval(), batch


def check_real_model(base, batch, config, tmp_path, capsys):
    ours, theirs = make_pair(base, **config)
    randomize_trainable(theirs, std=0.02, magnitude_spread=0.05)
    copy_peft_into_ours(theirs, ours)
    for mode in ("eval", "train"):  # train: dropout 0.1 in the adapters and in the model itself
        ours.train(mode == "train"), theirs.train(mode == "train")
        assert_same_run(ours, theirs, batch, seed=0, rel=1e-5)
    ours.eval(), theirs.eval()
    assert not torch.allclose(forward(ours, batch), forward(base, batch), atol=1e-3)

    line_ours = assert_same_report(ours, theirs, capsys)

    peft_edu.save_adapter(ours, tmp_path / "ours")
    loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert_close(forward(loaded_by_peft, batch), forward(ours, batch), rel=1e-5)
    theirs.save_pretrained(tmp_path / "peft")
    loaded_by_us = peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert_close(forward(loaded_by_us, batch), forward(theirs, batch), rel=1e-5)

    merged = theirs.merge_and_unload()
    peft_edu.merge(ours)
    for name, layer in dora_layers(ours).items():
        assert_close(layer.base_layer.weight, merged.get_submodule(name).weight, rel=1e-5)
    return line_ours


@pytest.mark.slow
def test_real_encoder_minilm(minilm, tmp_path, capsys):
    base, batch = minilm
    line = check_real_model(base, batch, dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=BERT_QV,
                                              task_type="SEQ_CLS"), tmp_path, capsys)
    # 6 layers x (query, value) x (8 (384 + 384) + 384) + head 384*2 + 2
    assert line.startswith(f"trainable params: {6 * 2 * (8 * 768 + 384) + 770:,} || ")


@pytest.mark.slow
def test_real_causal_lm_smollm2(smollm2, tmp_path, capsys):
    base, batch = smollm2
    check_real_model(base, batch, dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                       task_type="CAUSAL_LM"), tmp_path, capsys)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("zero_magnitude", [False, True], ids=["recovered", "kept"])
def test_scale_by_magnitude_gradients_are_exact(with_bias, zero_magnitude):
    """The output-keeping backward (u recovered as (h − b)/g, or kept where some g = 0) against finite differences,
    for u, m, the norm (in case a variant keeps it in the graph) and the bias."""
    from peft_edu.dora import ScaleByMagnitude

    torch.manual_seed(0)
    u = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    magnitude = torch.rand(5, dtype=torch.float64) + 0.5
    if zero_magnitude:
        magnitude[1] = 0.0
    norm = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True) if with_bias else None
    assert torch.autograd.gradcheck(ScaleByMagnitude.apply, (u, magnitude.requires_grad_(), norm, bias))


def test_recomputing_backward_gradients_are_exact():
    """The backward that recomputes u = W₀x + s·Bz from x and z, against finite differences (u, m, norm, bias)."""
    from peft_edu.dora import ScaleLinearByMagnitude

    torch.manual_seed(0)
    x, z = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 2, dtype=torch.float64)
    weight, lora_B = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    u = (F.linear(x, weight) + F.linear(z, lora_B) * 0.5).requires_grad_()  # the u the layer would hand over
    magnitude = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    norm = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    scale = lambda u, m, n, b: ScaleLinearByMagnitude.apply(u, m, n, b, x, z, weight, lora_B, 0.5)  # noqa: E731
    assert torch.autograd.gradcheck(scale, (u, magnitude, norm, bias))


def kept_for_backward(model, batch) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps in one training forward (as the benchmarks)."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(0)  # the same dropout masks for both models
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    return sum(storages.values())


@pytest.mark.parametrize("kind, targets", [("bert_cls", ["query", "key", "value", "dense"]),
                                           ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"])])
def test_dora_keeps_what_lora_keeps_plus_vectors(kind, targets, tiny_model, tiny_batch):
    """Issue 13's target: DoRA keeps ≤ 1.15 × LoRA's bytes for backward. Without dropout it keeps exactly LoRA's
    bytes plus the norm (d_out numbers) per layer: no (tokens × d_out) tensor of its own (deterministic bytes)."""
    base, batch = tiny_model(kind), tiny_batch(kind)
    kept = {}
    for use_dora in (False, True):
        config = peft_edu.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora)
        model = peft_edu.get_peft_model(copy.deepcopy(base), config).train()
        kept[use_dora] = kept_for_backward(model, batch)
        layers = dora_layers(model)
    vectors = sum(layer.lora_magnitude_vector.numel() * 4 for layer in layers.values())  # the float32 norms
    assert kept[True] <= 1.15 * kept[False]
    assert kept[False] < kept[True] <= kept[False] + vectors, (kept, vectors)
