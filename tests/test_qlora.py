"""QLoRA in peft_edu against PEFT's LoRA on bitsandbytes' Linear4bit: same 4-bit base, same outputs and gradients,
adapter files that move both ways, merging into a 4-bit base measured, and clear errors.

Two 4-bit bases of one seeded tiny Llama (``parity.tiny_llama_for_4bit``): peft_edu's (``quantize_model``) and the
one transformers loads with ``BitsAndBytesConfig`` (``parity.load_in_4bit``), which store the same bytes. The real
SmolLM2 runs the same checks in the ``slow`` tests.
"""

from __future__ import annotations

import ast
import copy
import warnings
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import peft_edu
from parity import (
    assert_close,
    assert_same_run,
    build_batch,
    copy_peft_into_ours,
    forward,
    forward_backward,
    load_in_4bit,
    peft_trainable,
    randomize_trainable,
    tiny_llama_for_4bit,
    trainable,
)
from peft_edu.injection import adapter_layers, dense_weight
from peft_edu.model import adapter_state_dict
from peft_edu.qlora import BitsAndBytesLinear4bit, Linear4bit
from peft_edu.quantization import dequantize_nf4, quantize_nf4

pytestmark = [pytest.mark.usefixtures("one_thread_for_tiny_models"),
              pytest.mark.filterwarnings("ignore:Merge lora module to 4-bit linear:UserWarning"),
              pytest.mark.filterwarnings("ignore:Unmerge lora module to 4-bit linear:UserWarning")]

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    return tiny_llama_for_4bit()


@pytest.fixture(scope="module")
def base_folder(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    base.save_pretrained(folder)
    return folder


@pytest.fixture
def batch():
    return build_batch("llama")


def four_bit_layers(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (Linear4bit, BitsAndBytesLinear4bit))}


def stored_bytes(layer) -> tuple[torch.Tensor, ...]:
    """(codes, 8-bit absmax codes, their scales, their mean) of either library's 4-bit layer."""
    if isinstance(layer, Linear4bit):
        return layer.weight, layer.absmax, layer.absmax_scales, layer.absmax_offset
    state = layer.weight.quant_state
    return layer.weight.data, state.absmax, state.state2.absmax, state.offset


def lora_pair(ours_base, theirs_base, **config):
    """peft_edu's LoRA on ``ours_base`` and PEFT's on ``theirs_base`` (a bitsandbytes model), PEFT's random A and B
    (init_lora_weights=False, so B ≠ 0) copied into ours."""
    config = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **config}
    ours = peft_edu.get_peft_model(ours_base, peft_edu.LoraConfig(**copy.deepcopy(config)))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(theirs_base, peft.LoraConfig(**copy.deepcopy(config)))
    copy_peft_into_ours(theirs, ours)
    return ours, theirs


# --- the same 4-bit base ------------------------------------------------------------------------------------
def test_quantize_model_stores_what_transformers_and_bitsandbytes_store(base, base_folder, batch):
    ours = peft_edu.quantize_model(copy.deepcopy(base))
    theirs = load_in_4bit(base_folder)
    assert set(four_bit_layers(ours)) == set(four_bit_layers(theirs)) and "lm_head" not in four_bit_layers(ours)
    for name, layer in four_bit_layers(ours).items():
        for mine, its in zip(stored_bytes(layer), stored_bytes(four_bit_layers(theirs)[name]), strict=True):
            assert torch.equal(mine, its), name
        assert torch.equal(dense_weight(layer), dense_weight(four_bit_layers(theirs)[name]))
    assert torch.equal(forward(ours, batch), forward(theirs, batch))
    assert not torch.allclose(forward(ours, batch), forward(base, batch), atol=1e-3)  # it is 4-bit


def test_parameter_counts_of_a_4bit_model_are_peft_s(base, base_folder):
    """PEFT counts a packed 4-bit weight as two parameters per byte; so does print_trainable_parameters."""
    ours, theirs = lora_pair(peft_edu.quantize_model(copy.deepcopy(base)), load_in_4bit(base_folder))
    assert peft_edu.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert peft_edu.count_parameters(ours)[1] == sum(p.numel() for p in base.parameters()) + peft_edu.count_parameters(ours)[0]


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_qlora_on_peft_edus_4bit_base_equals_peft_on_bitsandbytes(base, base_folder, batch, use_dora):
    ours, theirs = lora_pair(peft_edu.quantize_model(copy.deepcopy(base)), load_in_4bit(base_folder), use_dora=use_dora)
    assert isinstance(theirs.base_model.model.model.layers[0].self_attn.q_proj, peft.tuners.lora.bnb.Linear4bit)
    assert_same_run(ours, theirs, batch, base=peft_edu.quantize_model(copy.deepcopy(base)))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_edu_adapts_the_model_transformers_loaded_in_4bit_as_peft_does(base_folder, batch, use_dora):
    """peft_edu's LoRA and DoRA on bitsandbytes' own Linear4bit layers, read through the registered accessor."""
    ours, theirs = lora_pair(load_in_4bit(base_folder), load_in_4bit(base_folder), use_dora=use_dora)
    assert all(isinstance(layer.base_layer, BitsAndBytesLinear4bit) for layer in adapter_layers(ours).values())
    assert_same_run(ours, theirs, batch, base=load_in_4bit(base_folder))


@pytest.mark.parametrize("ours_4bit", ["peft_edu", "bitsandbytes"])
def test_ia3_on_a_4bit_base_equals_peft_on_bitsandbytes(base, base_folder, batch, ours_4bit):
    """The accessor is all IA³ needs too; unlike PEFT's, peft_edu's IA³ also merges into a 4-bit base."""
    config = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    four_bit = peft_edu.quantize_model(copy.deepcopy(base)) if ours_4bit == "peft_edu" else load_in_4bit(base_folder)
    ours = peft_edu.get_peft_model(four_bit, peft_edu.IA3Config(**config))
    theirs = peft.get_peft_model(load_in_4bit(base_folder), peft.IA3Config(**config))
    randomize_trainable(theirs, seed=0)
    copy_peft_into_ours(theirs, ours)
    assert_same_run(ours, theirs, batch, base=load_in_4bit(base_folder))
    peft_edu.merge(ours)
    assert all(layer.merged for layer in adapter_layers(ours).values())


def test_qlora_training_steps_equal_peft_on_bitsandbytes(base, base_folder, batch):
    ours, theirs = lora_pair(peft_edu.quantize_model(copy.deepcopy(base)), load_in_4bit(base_folder))
    before = {n: p.detach().clone() for n, p in trainable(ours).items()}
    for model, params in ((ours, trainable(ours)), (theirs, peft_trainable(theirs))):
        model.train()
        optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
    theirs_trained = peft_trainable(theirs)
    for name, param in trainable(ours).items():
        assert not torch.equal(param, before[name])
        assert_close(param.detach(), theirs_trained[name].detach(), rel=1e-5)


def test_the_4bit_layer_keeps_only_the_packed_weight_for_backward():
    """The frozen weight stays 4-bit during training: autograd keeps no dense (d_out, d_in) copy of it."""
    layer = Linear4bit.from_linear(nn.Linear(128, 96))
    x = torch.randn(5, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = layer(x)
    assert (96, 128) not in saved and (128, 96) not in saved
    out.pow(2).sum().backward()
    expected_x = x.detach().clone().requires_grad_()
    nn.functional.linear(expected_x, layer.dequantized_weight(), layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, expected_x.grad)  # ∂L/∂x through the dequantised W₀, dequantised again


@pytest.mark.parametrize("input_needs_grad", [True, False], ids=["input-grad", "no-input-grad"])
def test_the_4bit_layer_dequantises_once_in_forward_and_in_backward_only_for_the_inputs_gradient(
        monkeypatch, input_needs_grad):
    """Two dequantisations per training step at most, as bitsandbytes does: backward needs W₀ only for ∂L/∂x
    (the frozen W₀ gets no gradient), so a layer whose input needs none (the first layer's) dequantises once."""
    import peft_edu.qlora

    calls = []
    counting = lambda weight, dtype=None: calls.append(dtype) or dequantize_nf4(weight, dtype)  # noqa: E731
    monkeypatch.setattr(peft_edu.qlora, "dequantize_nf4", counting)
    layer = Linear4bit.from_linear(nn.Linear(128, 96))
    layer.bias.requires_grad_(True)  # something to backpropagate into when x needs no gradient
    x = torch.randn(5, 128, requires_grad=input_needs_grad)
    out = layer(x)
    assert calls == [torch.float32]
    out.pow(2).sum().backward()
    assert calls == [torch.float32] * (2 if input_needs_grad else 1)


def test_bitsandbytes_layers_read_right_after_repacking_for_their_fused_cpu_kernel(base_folder, batch):
    """On a CPU with AVX-512 BF16, an eval forward repacks bitsandbytes' layers for its fused kernel, rounding the
    absmax to bfloat16. The reader undoes the repacking on a copy, as bitsandbytes' state_dict does, which quantises
    the rounded absmax to 8 bits again: the weights read back move by up to 1 % of the layer's largest weight
    (measured: 0.47 %), and LoRA adapts the model. Elsewhere nothing is repacked and the weights are the same."""
    plain, repacked = load_in_4bit(base_folder), load_in_4bit(base_folder, fused_cpu_kernel=True)
    expected = {n: dense_weight(m) for n, m in four_bit_layers(plain).items()}
    forward(repacked, batch)
    for name, layer in four_bit_layers(repacked).items():
        assert (dense_weight(layer) - expected[name]).abs().max() <= 0.01 * expected[name].abs().max(), name
    model = peft_edu.get_peft_model(repacked, peft_edu.LoraConfig(r=2, target_modules=TARGETS))
    assert torch.isfinite(forward(model, batch)).all()


# --- merging into a 4-bit base ---------------------------------------------------------------------------------
def test_merging_into_a_4bit_base_requantises_exactly_as_peft_does(base, base_folder, batch):
    ours, theirs = lora_pair(peft_edu.quantize_model(copy.deepcopy(base)), load_in_4bit(base_folder))
    bnb_ours, _ = lora_pair(load_in_4bit(base_folder), load_in_4bit(base_folder))
    copy_peft_into_ours(theirs, bnb_ours)
    peft_edu.merge(ours)
    peft_edu.merge(bnb_ours)
    theirs.merge_adapter()
    layers_theirs = {n: m.base_layer for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")}
    for layers in (adapter_layers(ours), adapter_layers(bnb_ours)):
        for name, layer in layers.items():
            for mine, its in zip(stored_bytes(layer.base_layer), stored_bytes(layers_theirs[name]), strict=True):
                assert torch.equal(mine, its), name
    assert torch.equal(forward(ours, batch), forward(theirs, batch))


@pytest.mark.parametrize("std, kept", [(0.5, (0.9, 1.1)), (0.005, (-0.1, 0.2))], ids=["large-update", "small-update"])
def test_a_4bit_merge_rounds_w0_plus_delta_w_to_the_nf4_grid(base, batch, std, kept):
    """Measured: merged = dequant(quant(W₀ + ΔW)), each weight rounded to the NF4 grid of its block (within half a
    level gap, test_quantization). A ΔW far above that step survives the merge (share of ΔW kept ≈ 1), one far
    below it is rounded away (≈ 0.01 here): the merged model is then the base model, not the adapted one.
    Unmerging rounds again and does not give W₀ back."""
    model = peft_edu.get_peft_model(peft_edu.quantize_model(copy.deepcopy(base)),
                                    peft_edu.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_trainable(model, seed=3, std=std)
    layers = adapter_layers(model)
    w0 = {n: layer.base_weight().clone() for n, layer in layers.items()}
    target = {n: w0[n] + layer.delta_weight().detach() for n, layer in layers.items()}
    with peft_edu.disable_adapter(model):
        base_logits = forward(model, batch)
    adapted = forward(model, batch)
    peft_edu.merge(model)
    shares = []
    for name, layer in layers.items():
        merged, delta = layer.base_weight(), target[name] - w0[name]
        assert torch.equal(merged, dequantize_nf4(quantize_nf4(target[name], double_quant=True), merged.dtype)), name
        shares.append(float(((merged - w0[name]) * delta).sum() / delta.pow(2).sum()))  # ΔW's part that was kept
    share = sum(shares) / len(shares)
    assert kept[0] <= share <= kept[1], share
    merged_logits = forward(model, batch)
    if std < 0.05:  # rounded away: the merged model stays nearer the base than the adapter moved it
        assert (merged_logits - base_logits).abs().max() < (adapted - base_logits).abs().max()
    peft_edu.unmerge(model)
    assert any(not torch.equal(layer.base_weight(), w0[n]) for n, layer in layers.items())


def test_a_merge_that_would_store_nan_in_a_4bit_base_is_refused_and_undone(base, batch):
    model = peft_edu.get_peft_model(peft_edu.quantize_model(copy.deepcopy(base)),
                                    peft_edu.LoraConfig(r=2, target_modules=TARGETS))
    randomize_trainable(model, seed=0)
    before = {n: [t.clone() for t in stored_bytes(layer.base_layer)] for n, layer in adapter_layers(model).items()}
    last = list(adapter_layers(model).values())[-1]
    with torch.no_grad():
        last.lora_B.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        peft_edu.merge(model)
    assert not any(layer.merged for layer in adapter_layers(model).values())  # the others were unmerged again
    name = next(n for n, layer in adapter_layers(model).items() if layer is last)
    assert all(torch.equal(a, b) for a, b in zip(stored_bytes(last.base_layer), before[name]))  # never written


def test_a_nan_merge_into_a_bitsandbytes_layer_is_refused(base_folder):
    model = peft_edu.get_peft_model(load_in_4bit(base_folder), peft_edu.LoraConfig(r=2, target_modules=["q_proj"]))
    layer = next(iter(adapter_layers(model).values()))
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("inf"))
    data = layer.base_layer.weight.data.clone()
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight.data, data) and not layer.merged


# --- adapter files both ways ----------------------------------------------------------------------------------------
def test_an_adapter_trained_on_peft_edus_4bit_base_loads_into_peft_on_bitsandbytes(base, base_folder, batch, tmp_path):
    ours = peft_edu.get_peft_model(peft_edu.quantize_model(copy.deepcopy(base)),
                                   peft_edu.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_trainable(ours, seed=2)
    peft_edu.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_in_4bit(base_folder), tmp_path)
    assert_close(forward(theirs, batch), forward(ours, batch))
    unadapted = forward(peft_edu.quantize_model(copy.deepcopy(base)), batch)
    assert not torch.allclose(forward(ours, batch), unadapted, atol=1e-3)


def test_an_adapter_peft_trained_on_bitsandbytes_loads_into_peft_edus_4bit_base(base, base_folder, batch, tmp_path):
    theirs = peft.get_peft_model(load_in_4bit(base_folder), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_trainable(theirs, seed=2)
    theirs.save_pretrained(tmp_path)
    ours = peft_edu.load_adapter(peft_edu.quantize_model(copy.deepcopy(base)), tmp_path)
    assert_close(forward(ours, batch), forward(theirs, batch))
    assert not torch.allclose(forward(theirs, batch), forward(load_in_4bit(base_folder), batch), atol=1e-3)


@pytest.mark.parametrize("trained_on_4bit", [True, False], ids=["4bit-adapter-into-fp32", "fp32-adapter-into-4bit"])
def test_an_adapter_moves_between_a_4bit_and_a_full_precision_base_as_it_is(base, batch, tmp_path, trained_on_4bit):
    """Documented behaviour, not an error: an adapter file does not say which precision its base had (PEFT's does
    not either), and A and B mean the same update on either base. It loads unchanged; the outputs then differ by
    what 4-bit storage changes in the base (how QLoRA adapters are deployed on a 16-bit base)."""
    four_bit = peft_edu.quantize_model(copy.deepcopy(base))
    source, target = (four_bit, copy.deepcopy(base)) if trained_on_4bit else (copy.deepcopy(base), four_bit)
    trained = peft_edu.get_peft_model(source, peft_edu.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_trainable(trained, seed=2, std=0.05)
    peft_edu.save_adapter(trained, tmp_path)
    loaded = peft_edu.load_adapter(target, tmp_path)
    for name, tensor in adapter_state_dict(trained).items():
        assert torch.equal(adapter_state_dict(loaded)[name], tensor)
    base_gap = (forward(base, batch) - forward(peft_edu.quantize_model(copy.deepcopy(base)), batch)).abs().max()
    adapted_gap = (forward(loaded, batch) - forward(trained, batch)).abs().max()
    assert 0 < adapted_gap < 2 * base_gap  # measured: 1.0-1.1 × the gap of the bases alone


def test_no_module_of_peft_edu_imports_bitsandbytes_at_import_time():
    """bitsandbytes' layers are recognised once bitsandbytes is loaded (BitsAndBytesLinear4bit), so ``import
    peft_edu`` need not import it: that would cost every chapter seconds and, on some CPUs, a warning about an
    optional kernel package. Only function bodies may import it."""
    package = Path(peft_edu.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}:{node.lineno}" for name in names if name.split(".")[0] == "bitsandbytes"]
    assert not offenders, offenders


# --- bad input ------------------------------------------------------------------------------------------------
def test_quantising_an_already_4bit_model_is_refused(base, base_folder):
    with pytest.raises(ValueError, match="already 4-bit"):
        peft_edu.quantize_model(peft_edu.quantize_model(copy.deepcopy(base)))
    with pytest.raises(ValueError, match="already 4-bit"):
        peft_edu.quantize_model(load_in_4bit(base_folder))
    with pytest.raises(TypeError, match="already 4-bit"):
        Linear4bit.from_linear(Linear4bit.from_linear(nn.Linear(64, 8)))


def test_quantise_before_adding_the_adapter(base):
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="quantise the base model first"):
        peft_edu.quantize_model(model)


def test_quantize_model_targets_are_checked_and_nothing_changes_on_error(base):
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="matches no module"):
        peft_edu.quantize_model(model, target_modules=["q_proj", "qproj"])
    with pytest.raises(TypeError, match="adapts only"):
        peft_edu.quantize_model(model, target_modules=["embed_tokens"])
    model.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        peft_edu.quantize_model(model)
    assert not four_bit_layers(model)  # all or nothing
    with pytest.raises(TypeError, match="torch.nn.Module"):
        peft_edu.quantize_model("a model")


def test_quantize_model_on_chosen_layers_and_settings(base, batch):
    model = peft_edu.quantize_model(copy.deepcopy(base), target_modules=["q_proj"], double_quant=False,
                                    compute_dtype=torch.bfloat16)
    layers = four_bit_layers(model)
    assert len(layers) == 2 and all(not m.double_quant and m.compute_dtype == torch.bfloat16 for m in layers.values())
    layer = layers["model.layers.0.self_attn.q_proj"]
    weight = base.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(layer.dequantized_weight(), dequantize_nf4(quantize_nf4(weight), torch.bfloat16))
    assert forward(model, batch).dtype == torch.float32  # the layer returns its input's dtype
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit.from_linear(nn.Linear(64, 8), compute_dtype=torch.float64)


def test_the_4bit_layer_cannot_be_trained_itself(base):
    model = peft_edu.quantize_model(copy.deepcopy(base))
    layer = four_bit_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    with pytest.raises(RuntimeError, match="floating point"):
        layer.weight.requires_grad_(True)


# --- the real model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    """(tokenizer, fp32 SmolLM2, peft_edu's 4-bit SmolLM2, transformers + bitsandbytes' 4-bit SmolLM2), built once."""
    from peft_edu.assets import load_causal_lm

    tokenizer, model = load_causal_lm()
    ours = peft_edu.quantize_model(copy.deepcopy(model.eval()))
    theirs = load_in_4bit(model.name_or_path)  # the folder load_causal_lm read the model from
    return tokenizer, model, ours, theirs


@pytest.fixture
def smollm2_batch(smollm2):
    tokenizer = smollm2[0]
    batch = tokenizer(["What is the capital of France?", "Tell me a joke about cats, please."],
                      return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch)


@pytest.mark.slow
def test_smollm2_in_4bit_stores_what_bitsandbytes_stores_and_qlora_equals_peft(smollm2, smollm2_batch):
    _, _, ours_base, theirs_base = smollm2
    assert len(four_bit_layers(ours_base)) == 30 * 7
    for name, layer in four_bit_layers(ours_base).items():
        for mine, its in zip(stored_bytes(layer), stored_bytes(four_bit_layers(theirs_base)[name]), strict=True):
            assert torch.equal(mine, its), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = lora_pair(copy.deepcopy(ours_base), copy.deepcopy(theirs_base),
                                 target_modules=["q_proj", "v_proj"])
    randomize_trainable(theirs, seed=0, std=0.02)
    copy_peft_into_ours(theirs, ours)
    run = forward_backward(ours, smollm2_batch)
    run_theirs = forward_backward(theirs, smollm2_batch)
    assert_close(run.output, run_theirs.output, rel=1e-5)
    assert_close(run.loss, run_theirs.loss, rel=1e-5)
    for name, grad in run_theirs.grads.items():
        assert grad.abs().sum() > 0
        assert_close(run.grads[name], grad, rel=1e-5)


@pytest.mark.slow
def test_a_smollm2_qlora_adapter_moves_between_peft_edu_and_peft_on_bitsandbytes(smollm2, smollm2_batch, tmp_path):
    _, _, ours_base, theirs_base = smollm2
    ours = peft_edu.get_peft_model(copy.deepcopy(ours_base),
                                   peft_edu.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    randomize_trainable(ours, seed=1, std=0.02)
    peft_edu.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(theirs_base), tmp_path / "ours")
    assert_close(forward(theirs, smollm2_batch), forward(ours, smollm2_batch), rel=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = peft_edu.load_adapter(copy.deepcopy(ours_base), tmp_path / "theirs")
    assert_close(forward(back, smollm2_batch), forward(theirs, smollm2_batch), rel=1e-5)
