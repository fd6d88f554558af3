"""Adapter arithmetic against PEFT 0.21.2's ``add_weighted_adapter``: every combination type, two and three LoRA
adapters with random A and B on a tiny Llama and a tiny BERT; the new adapter's factors and scaling, and the model's
output with it active, equal PEFT's. Then the errors, each of which leaves the model as it was."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer

import peft_edu
from peft_edu.adapter_arithmetic import add_weighted_adapter
from peft_edu.injection import adapter_modules
from custom_models import CUSTOM_INPUT, build_custom, forward_custom
from parity import assert_close, build_batch, build_tiny, forward

pytestmark = [pytest.mark.usefixtures("one_thread_for_tiny_models"),
              pytest.mark.filterwarnings("ignore:The density 1.0 is greater")]  # PEFT's, for density=1

# Random A and B (init_lora_weights=False), different targets (the new adapter covers their union, each layer
# combining the adapters present there), scalings and a negative weight (the sign goes on A only).
TARGETS = {"llama": (["q_proj", "v_proj"], ["v_proj", "k_proj", "down_proj"], ["q_proj", "down_proj"]),
           "bert": (["query", "value"], ["value", "key"], ["query", "intermediate.dense"]),
           # PEFT's custom model: nn.Embedding (100 × 5), Conv1D (5 -> 1, weight stored transposed), nn.Linear
           "EmbConv1D": (["emb", "conv1d"], ["conv1d"], ["emb", "lin0"])}  # PEFT warns at fan_in_fan_out on a mix
ALPHAS = (8, 6, 3)
WEIGHTS = (0.7, -0.4, 1.3)
SAME_RANKS, OTHER_RANKS = (4, 4, 4), (4, 2, 3)
DENSITY = {"ties": 0.5, "dare_linear": 0.6, "dare_ties": 0.6, "magnitude_prune": 0.3, "ties_svd": 0.5,
           "dare_linear_svd": 0.6, "dare_ties_svd": 0.6, "magnitude_prune_svd": 0.3}
NAMES = ("one", "two", "three")  # not "a": PEFT warns a name inside its prefix "lora_"


def adapters_on(base, kind, ranks, count=3, use_rslora=False):
    """(peft_edu model, PEFT model), each with LoRA adapters "one", "two"(, "three") drawn from the same seeds."""
    models = []
    for library in (peft_edu, peft):
        model = copy.deepcopy(base)
        for i in range(count):
            torch.manual_seed(10 + i)
            config = library.LoraConfig(r=ranks[i], lora_alpha=ALPHAS[i], target_modules=list(TARGETS[kind][i]),
                                        init_lora_weights=False, use_rslora=use_rslora and i == 0,
                                        fan_in_fan_out=kind == "EmbConv1D" and "conv1d" in TARGETS[kind][i])
            if i == 0:
                model = library.get_peft_model(model, config, adapter_name=NAMES[0])
            elif library is peft_edu:
                peft_edu.add_adapter(model, NAMES[i], config)
            else:
                model.add_adapter(NAMES[i], config)
        models.append(model.eval())
    return tuple(models)


def ours_factors(model, name):
    """{module name: (A, B, scaling)} of peft_edu adapter ``name`` (parked)."""
    return {module: (*layer.lora_factors(), layer.scaling) for module, layer in model.peft_edu_parked[name].parts}


def peft_factors(model, name):
    """The same of PEFT's adapter ``name``; an embedding's are PEFT's lora_embedding_A / _B, plain tensors."""
    factors = {}
    for module, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and name in layer.lora_A:
            factors[module] = (layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
        elif isinstance(layer, LoraLayer) and name in layer.lora_embedding_A:
            factors[module] = (layer.lora_embedding_A[name], layer.lora_embedding_B[name], layer.scaling[name])
    return {module.removeprefix("base_model.model."): value for module, value in factors.items()}


def combine_both(ours, theirs, count, **arguments):
    """The same call in both libraries, from the same random state (DARE's masks)."""
    names, weights = list(NAMES[:count]), list(WEIGHTS[:count])
    torch.manual_seed(123)
    add_weighted_adapter(ours, names, weights, "mix", **arguments)
    torch.manual_seed(123)
    theirs.add_weighted_adapter(names, weights, "mix", **arguments)


def assert_same_adapter(ours, theirs, batch):
    mine, peft_s = ours_factors(ours, "mix"), peft_factors(theirs, "mix")
    assert sorted(mine) == sorted(peft_s)  # the union of the targets
    for module, (A, B, scaling) in mine.items():
        A_peft, B_peft, scaling_peft = peft_s[module]
        assert scaling == scaling_peft, module
        assert torch.equal(A, A_peft) and torch.equal(B, B_peft), module  # the same operations in the same order
    assert "mix" in peft_edu.list_adapters(ours) and peft_edu.active_adapter(ours) == "one"  # parked, not active
    peft_edu.set_adapter(ours, "mix")
    theirs.set_adapter("mix")
    if isinstance(batch, torch.Tensor):  # the custom model's input
        assert_close(forward_custom(ours, batch), forward_custom(theirs, batch))
    else:
        assert_close(forward(ours, batch), forward(theirs, batch))


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties",
                                              "magnitude_prune"])
def test_combination_matches_peft(kind, count, combination_type):
    base, batch = build_tiny(kind), build_batch(kind)
    ranks = SAME_RANKS if combination_type in ("linear", "ties", "dare_linear", "dare_ties",
                                               "magnitude_prune") else OTHER_RANKS
    ours, theirs = adapters_on(base, kind, ranks, count)
    combine_both(ours, theirs, count, combination_type=combination_type, density=DENSITY.get(combination_type))
    assert_same_adapter(ours, theirs, batch)


@pytest.mark.parametrize("arguments", [dict(combination_type="cat"), dict(combination_type="svd", svd_rank=1),
                                       dict(combination_type="linear"),
                                       dict(combination_type="dare_ties", density=0.5),
                                       dict(combination_type="magnitude_prune_svd", density=0.5, svd_rank=1)])
def test_embedding_and_conv1d_layers_match_peft(arguments):
    """An embedding's factors are the other way round in PEFT (its ΔW is transposed before the SVD), Conv1D stores
    its weight transposed: the same factors all the same (svd_rank=1: the Conv1D has one output)."""
    ours, theirs = adapters_on(build_custom("EmbConv1D"), "EmbConv1D", (2, 2, 2))
    combine_both(ours, theirs, 3, **arguments)
    assert_same_adapter(ours, theirs, CUSTOM_INPUT)


def test_the_combined_adapter_saves_and_peft_loads_it(tmp_path):
    base, batch = build_tiny("llama"), build_batch("llama")
    ours, _ = adapters_on(base, "llama", OTHER_RANKS)
    add_weighted_adapter(ours, list(NAMES), list(WEIGHTS), "mix", combination_type="svd", svd_rank=3)
    peft_edu.set_adapter(ours, "mix")
    peft_edu.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mix").eval()
    assert_close(forward(loaded, batch), forward(ours, batch))


@pytest.mark.parametrize("combination_type", ["ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"])
def test_svd_forms_of_the_merges_match_peft(combination_type):
    base, batch = build_tiny("llama"), build_batch("llama")
    ours, theirs = adapters_on(base, "llama", OTHER_RANKS)
    combine_both(ours, theirs, 3, combination_type=combination_type, density=DENSITY[combination_type],
                 majority_sign_method="frequency" if "ties" in combination_type else "total", svd_rank=5)
    assert_same_adapter(ours, theirs, batch)


@pytest.mark.parametrize("arguments", [dict(combination_type="svd", svd_rank=2, svd_clamp=0.9),
                                       dict(combination_type="ties", density=1.0, majority_sign_method="frequency"),
                                       dict(combination_type="cat")])
def test_options_and_rslora_scaling_match_peft(arguments):
    """svd_rank/svd_clamp, density 1 (nothing pruned), and a first adapter with rsLoRA: the new adapter's scaling is
    α'/√r' = √r', not 1 (PEFT copies use_rslora with α' = r')."""
    base, batch = build_tiny("llama"), build_batch("llama")
    ranks = SAME_RANKS if arguments["combination_type"] == "ties" else OTHER_RANKS
    ours, theirs = adapters_on(base, "llama", ranks, use_rslora=True)
    combine_both(ours, theirs, 3, **arguments)
    assert_same_adapter(ours, theirs, batch)


def test_one_adapter_is_rescaled_linearly_as_peft_does():
    base, batch = build_tiny("llama"), build_batch("llama")
    ours, theirs = adapters_on(base, "llama", OTHER_RANKS, count=2)
    for model in (ours, theirs):
        torch.manual_seed(0)
        (add_weighted_adapter(model, ["two"], [-2.0], "mix") if model is ours
         else model.add_weighted_adapter(["two"], [-2.0], "mix"))  # "svd" by default, linear for one adapter
    assert_same_adapter(ours, theirs, batch)


def test_cat_is_exact_and_the_dare_masks_follow_the_seed():
    """cat: B'A' = Σ wᵢ ΔWᵢ in every layer. DARE: the same seed, the same masks; another seed, other masks."""
    base = build_tiny("llama")
    ours, _ = adapters_on(base, "llama", OTHER_RANKS)
    add_weighted_adapter(ours, list(NAMES), list(WEIGHTS), "cat", combination_type="cat")
    layers = {name: dict(ours.peft_edu_parked[name].parts) for name in ("two", "three", "cat")}
    layers["one"] = dict(adapter_modules(ours))  # the active adapter
    for module, layer in layers["cat"].items():
        expected = sum(w * layers[n][module].delta_weight() for n, w in zip(NAMES, WEIGHTS) if module in layers[n])
        assert_close(layer.delta_weight(), expected, rel=1e-5)
    ours, _ = adapters_on(base, "llama", SAME_RANKS)
    for seed, name in ((5, "x"), (5, "y"), (6, "z")):
        torch.manual_seed(seed)
        add_weighted_adapter(ours, list(NAMES), list(WEIGHTS), name, combination_type="dare_ties", density=0.5)
    x, y, z = (ours_factors(ours, name) for name in "xyz")
    assert all(torch.equal(x[m][0], y[m][0]) for m in x) and not all(torch.equal(x[m][0], z[m][0]) for m in x)


# --- bad input ---------------------------------------------------------------------------------------------------
def test_bad_combinations_are_refused_and_the_model_is_unchanged():
    base, batch = build_tiny("llama"), build_batch("llama")
    ours, _ = adapters_on(base, "llama", OTHER_RANKS)
    before, adapters = forward(ours, batch), peft_edu.list_adapters(ours)
    refused = [
        (dict(adapters=["one", "nope"]), r"no adapter named 'nope'.*\['one', 'two', 'three'\]"),
        (dict(weights=[1.0]), r"one weight per adapter, 2 numbers"),
        (dict(weights=[1.0, float("nan")]), r"finite number"),
        (dict(combination_type="linear"), r"same rank.*r=\[4, 2\].*'cat'.*'svd'"),
        (dict(combination_type="ties", density=0.5), r"same rank.*'cat'.*'svd'"),
        (dict(combination_type="mean"), r"choose one of \['cat', 'linear'"),
        (dict(combination_type="cat", density=0.5), r"density=0.5 is used only by"),
        (dict(combination_type="svd", svd_rank=0), r"svd_rank=0: a positive integer"),
        (dict(combination_type="svd", svd_rank=40), r"svd_rank=40 exceeds .*min\(d_out, d_in\) = 16"),
        (dict(combination_type="cat", svd_rank=4), r"used only by the svd combination types"),
        (dict(adapter_name="two"), r"already has an adapter named 'two'"),
        (dict(adapter_name="__base__"), r"'__base__'"),
    ]
    for density in (None, 0, 1.5, -0.1):
        refused.append((dict(adapters=["one", "three"], combination_type="magnitude_prune", density=density),
                        r"needs density.*in \(0, 1\]"))
    refused.append((dict(adapters=["one", "three"], combination_type="ties", density=0.5, majority_sign_method="mean"),
                    r"'total'.*'frequency'"))
    for change, message in refused:
        call = dict(adapters=["one", "two"], weights=[1.0, 0.5], adapter_name="mix", combination_type="svd") | change
        with pytest.raises(ValueError, match=message):
            add_weighted_adapter(ours, **call)
        assert peft_edu.list_adapters(ours) == adapters and torch.equal(forward(ours, batch), before)


def test_a_combination_that_fails_midway_leaves_no_adapter_behind(monkeypatch):
    base, batch = build_tiny("llama"), build_batch("llama")
    ours, _ = adapters_on(base, "llama", OTHER_RANKS)
    before, adapters = forward(ours, batch), peft_edu.list_adapters(ours)
    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")
    monkeypatch.setattr(torch.linalg, "svd", fail)
    with pytest.raises(torch.linalg.LinAlgError):
        add_weighted_adapter(ours, ["one", "two"], [1.0, 1.0], "mix")
    assert peft_edu.list_adapters(ours) == adapters and torch.equal(forward(ours, batch), before)


def test_adapters_that_cannot_be_combined_are_refused():
    base, batch = build_tiny("llama"), build_batch("llama")
    ours = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(r=2, target_modules=["q_proj"]))
    others = {"dora": peft_edu.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
              "bias": peft_edu.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True),
              "pissa": peft_edu.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"),
              "regex": peft_edu.LoraConfig(r=2, target_modules=r".*\.q_proj"),
              "saved": peft_edu.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
              "ia3": peft_edu.IA3Config(target_modules=["q_proj"], feedforward_modules=[])}
    for name, config in others.items():
        peft_edu.add_adapter(ours, name, config)
    before, adapters = forward(ours, batch), peft_edu.list_adapters(ours)
    for other, message in [("dora", r"use_dora=True: its magnitude vector would be dropped"),
                           ("bias", r"lora_bias=True: B's bias would be dropped"),
                           ("pissa", r"'pissa': its B A is relative to a changed W₀"),
                           ("regex", r"\['list', 'str'\].*all of them as lists"),
                           ("saved", r"modules_to_save=\['lm_head'\]: its trained copies"),
                           ("ia3", r"'ia3' is IA3, not LoRA")]:
        with pytest.raises(ValueError, match=message):
            add_weighted_adapter(ours, ["default", other], [1.0, 1.0], "mix", combination_type="cat")
        assert peft_edu.list_adapters(ours) == adapters and torch.equal(forward(ours, batch), before)
    peft_edu.merge(ours)
    with pytest.raises(RuntimeError, match=r"merged.*unmerge\(model\) before you combine adapters"):
        add_weighted_adapter(ours, ["default"], [1.0], "mix")
