"""peft_edu's (IA)³ against Hugging Face PEFT: same placement, numbers, merges, files and report; clear errors.

Every comparison builds one seeded base model and deepcopies it for peft_edu and for PEFT. At init the
vectors are ones and every (IA)³ model equals its base, so where the vectors matter they are drawn from
N(0, 1), far from 1 (some negative). Names map one to one: PEFT's ``base_model.model.X.ia3_l.default``
is our ``X.ia3_l``.
"""

from __future__ import annotations

import copy
import json
import re

import peft
import pytest
import torch
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)
from safetensors.torch import load_file
from torch import nn

import parity
import peft_edu
import peft_edu.assets
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
    trainable,
)
from peft_edu.ia3 import DEFAULT_FEEDFORWARD_MODULES, DEFAULT_TARGET_MODULES

BERT_KVO = ["key", "value", "output.dense"]  # PEFT's BERT default (output.dense: two modules per layer)
LLAMA_KVD = ["k_proj", "v_proj", "down_proj"]  # PEFT's Llama default


# --- helpers ------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")
make_pair = pair_maker("IA3Config")


@pytest.fixture
def tiny_model(tiny_model):
    """conftest's tiny models with non-zero biases in every nn.Linear (BERT initialises them to 0), so that
    a bias scaled or left alone by mistake, in the forward pass or in a merge, changes the results."""
    def build(kind, seed=0, hidden_size=32, **overrides):
        model = tiny_model(kind, seed=seed, hidden_size=hidden_size, **overrides)
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
        return model
    return build


def randomize_trainable(model, seed=0):
    """Vectors from N(0, 1) (far from the init 1), the head's copy from N(0, 0.5²)."""
    parity.randomize_trainable(model, seed, draw=lambda name, p, noise: noise * (1.0 if "ia3_l" in name else 0.5))


def ia3_layers(model) -> dict[str, peft_edu.IA3Linear]:
    return layers_of(model, peft_edu.IA3Linear)


def peft_layers(model) -> dict:
    """PEFT's IA³ layers by our module name."""
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, peft.tuners.ia3.IA3Layer)}


# --- 1. the layer: which side is scaled --------------------------------------------------------
@pytest.mark.parametrize("feedforward", [False, True], ids=["output", "feedforward-input"])
def test_layer_scales_the_right_side(feedforward):
    torch.manual_seed(0)
    layer = peft_edu.IA3Linear(nn.Linear(6, 4), is_feedforward=feedforward)
    assert layer.ia3_l.shape == ((1, 6) if feedforward else (4, 1))  # PEFT's shapes
    assert torch.equal(layer.ia3_l, torch.ones_like(layer.ia3_l))

    base = nn.Linear(5, 5)  # square, so that scaling the wrong side would run too
    layer = peft_edu.IA3Linear(base, is_feedforward=feedforward)
    x = torch.randn(3, 5)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # × 1.0 is exact
        layer.ia3_l.copy_(torch.randn(layer.ia3_l.shape))
        W, b, l = base.weight, base.bias, layer.ia3_l.flatten()
        input_scaled = (x * l) @ W.T + b  # h = W (l ⊙ x) + b
        output_scaled = (x @ W.T + b) * l  # h = l ⊙ (W x + b)
        assert not torch.allclose(input_scaled, output_scaled, atol=1e-3)
        assert_close(layer(x), input_scaled if feedforward else output_scaled)
        if not feedforward:
            assert not torch.allclose(layer(x), (x @ W.T) * l + b, atol=1e-3)  # the bias is scaled too


# --- 2. placement and shapes equal PEFT's --------------------------------------------------------
PLACEMENT_CASES = [
    pytest.param("bert_cls", dict(task_type="SEQ_CLS"), id="bert_cls-defaults"),
    pytest.param("bert", dict(target_modules=["query", "value", "intermediate.dense", "output.dense"],
                              feedforward_modules=["output.dense"]), id="bert-explicit"),
    pytest.param("bert", dict(target_modules=r".*\.(key|value|dense)", feedforward_modules=r".*layer\.\d\.output\.dense"),
                 id="bert-regex"),
    pytest.param("llama", dict(task_type="CAUSAL_LM"), id="llama-defaults"),
    pytest.param("llama", dict(target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                               feedforward_modules=["down_proj"], task_type="CAUSAL_LM"), id="llama-explicit"),
    pytest.param("llama_cls", dict(target_modules=LLAMA_KVD, feedforward_modules=["down_proj"], task_type="SEQ_CLS"),
                 id="llama_cls"),
]


@pytest.mark.parametrize("kind,config", PLACEMENT_CASES)
def test_placement_and_shapes_equal_peft(kind, config, tiny_model):
    ours, theirs = make_pair(tiny_model(kind), **config)
    mine = {n: (m.is_feedforward, tuple(m.ia3_l.shape)) for n, m in ia3_layers(ours).items()}
    theirs_ = {n: (m.is_feedforward, tuple(m.ia3_l["default"].shape)) for n, m in peft_layers(theirs).items()}
    assert mine == theirs_
    assert any(ff for ff, _ in mine.values()) and not all(ff for ff, _ in mine.values())
    for name, (ff, shape) in mine.items():
        base = ours.get_submodule(name).base_layer
        assert shape == ((1, base.in_features) if ff else (base.out_features, 1)), name


def test_bert_default_output_dense_also_selects_attention_output(tiny_model):
    ours, _ = make_pair(tiny_model("bert"))
    layer0 = {n.removeprefix("encoder.layer.0."): (m.is_feedforward, tuple(m.ia3_l.shape))
              for n, m in ia3_layers(ours).items() if n.startswith("encoder.layer.0.")}
    assert layer0 == {"attention.self.key": (False, (32, 1)), "attention.self.value": (False, (32, 1)),
                      "attention.output.dense": (True, (1, 32)), "output.dense": (True, (1, 64))}


def test_attention_output_vector_is_redundant_with_the_value_vector(tiny_model, tiny_batch):
    """Attention mixes positions, not features: scaling the context's features = scaling the values'."""
    base = tiny_model("bert")
    batch = tiny_batch("bert")
    a = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.IA3Config())
    b = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.IA3Config())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        l_v, l_o = torch.randn(32, generator=g), torch.randn(32, generator=g)
        a.get_submodule("encoder.layer.0.attention.self.value").ia3_l.copy_(l_v[:, None])
        a.get_submodule("encoder.layer.0.attention.output.dense").ia3_l.copy_(l_o[None, :])
        b.get_submodule("encoder.layer.0.attention.self.value").ia3_l.copy_((l_v * l_o)[:, None])
    assert_close(forward(a, batch), forward(b, batch), rel=1e-5)
    assert not torch.allclose(forward(a, batch), forward(base, batch), atol=1e-3)


# --- 3. initialisation ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind,task_type", [("bert_cls", "SEQ_CLS"), ("llama", "CAUSAL_LM")], ids=["bert_cls", "llama"])
def test_init_ones_equals_base_exactly(kind, task_type, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    ours, theirs = make_pair(base, task_type=task_type)
    layers = ia3_layers(ours)
    assert len(layers) == {"bert_cls": 8, "llama": 6}[kind]
    for name, layer in layers.items():
        assert torch.equal(layer.ia3_l, torch.ones_like(layer.ia3_l)), name
        assert layer.ia3_l.requires_grad and not layer.base_layer.weight.requires_grad
    assert torch.equal(forward(ours, batch), forward(base, batch))
    assert torch.equal(forward(theirs, batch), forward(base, batch))


def test_injection_leaves_the_random_stream_where_peft_leaves_it(tiny_model):
    """PEFT draws N(0, 1) for every vector before setting it to ones; so do we, so that code that draws
    random numbers after get_peft_model (a new head, dropout masks) sees the same numbers with both."""
    base = tiny_model("llama")
    torch.manual_seed(3)
    peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.IA3Config())
    ours_next = torch.randn(4)
    torch.manual_seed(3)
    peft.get_peft_model(copy.deepcopy(base), peft.IA3Config())
    theirs_next = torch.randn(4)
    assert torch.equal(ours_next, theirs_next)
    torch.manual_seed(3)
    assert not torch.equal(torch.randn(4), theirs_next)  # PEFT did draw


def test_init_false_draws_the_same_vectors_as_peft(tiny_model, tiny_batch):
    base = tiny_model("llama")
    ours, theirs = make_pair(base, init_ia3_weights=False, seed=7)
    theirs_params = peft_trainable(theirs)
    assert set(theirs_params) == set(trainable(ours))
    for name, p in trainable(ours).items():
        assert torch.equal(p, theirs_params[name]), name
        assert not torch.equal(p, torch.ones_like(p))
    batch = tiny_batch("llama")
    assert_close(forward(ours, batch), forward(theirs, batch))


# --- 4. same vectors -> same outputs and gradients as PEFT ---------------------------------------
@pytest.mark.parametrize("kind,config", PLACEMENT_CASES)
def test_outputs_and_gradients_equal_peft(kind, config, tiny_model, tiny_batch):
    base = tiny_model(kind)
    ours, theirs = make_pair(base, **config)
    randomize_trainable(theirs)
    copy_peft_into_ours(theirs, ours)
    batch = tiny_batch(kind)
    assert (batch["attention_mask"] == 0).any()

    grads_ours = assert_same_run(ours, theirs, batch, base=base).grads
    assert sum(n.endswith("ia3_l") for n in grads_ours) == len(ia3_layers(ours)) > 0


# --- 5. merge / unmerge --------------------------------------------------------------------------
def assert_restored(unmerged, original, l):
    """W₀ · l / (l + 1e-8) is W₀ up to a relative 1e-8/|l| (PEFT's guard) plus two float32 roundings."""
    assert original.abs().min() > 0
    bound = original.abs() * (1e-8 / l.abs() + 3 * 2.0**-24)
    assert ((unmerged - original).abs() <= bound).all()


@pytest.mark.parametrize("kind,task_type", [("bert_cls", "SEQ_CLS"), ("llama", "CAUSAL_LM")], ids=["bert_cls", "llama"])
def test_merge_unmerge_equal_peft(kind, task_type, tiny_model, tiny_batch, tmp_path):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    ours, theirs = make_pair(base, task_type=task_type)
    randomize_trainable(theirs)
    copy_peft_into_ours(theirs, ours)
    ours.eval(), theirs.eval()
    layers = ia3_layers(ours)
    originals = {n: (m.base_layer.weight.detach().clone(), None if m.base_layer.bias is None
                     else m.base_layer.bias.detach().clone()) for n, m in layers.items()}
    unmerged_out = forward(ours, batch)

    peft_edu.merge(ours)
    assert all(m.merged for m in layers.values())
    assert_close(forward(ours, batch), unmerged_out, rel=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        peft_edu.merge(ours)
    with pytest.raises(RuntimeError, match="Save the adapter before merging"):
        peft_edu.save_adapter(ours, tmp_path / "merged")

    # PEFT's merge, then its unmerge, on a copy: our merged and unmerged tensors equal PEFT's bit for bit.
    theirs_copy = copy.deepcopy(theirs)
    theirs_copy.merge_adapter()
    merged_peft = {n: m.get_base_layer() for n, m in peft_layers(theirs_copy).items()}
    for name, layer in layers.items():
        w0, b0 = originals[name]
        w, b = layer.base_layer.weight, layer.base_layer.bias
        assert torch.equal(w, merged_peft[name].weight), name
        assert not torch.allclose(w, w0)
        if b is not None:
            assert torch.equal(b, merged_peft[name].bias), name
            if layer.is_feedforward:  # input scaling leaves the bias alone
                assert torch.equal(b, b0), name
            else:  # output scaling scales the bias too: b ← l ⊙ b
                assert_close(b, b0 * layer.ia3_l.flatten())
    assert (kind == "bert_cls") == any(m.base_layer.bias is not None for m in layers.values())
    merged_and_unloaded = copy.deepcopy(theirs).merge_and_unload()
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight, merged_and_unloaded.get_submodule(name).weight), name

    peft_edu.unmerge(ours)
    theirs_copy.unmerge_adapter()
    for name, layer in layers.items():
        w0, b0 = originals[name]
        w, b = layer.base_layer.weight, layer.base_layer.bias
        assert torch.equal(w, merged_peft[name].weight), name  # PEFT divides by l + 1e-8; so do we
        assert_restored(w, w0, layer.ia3_l)
        if b is not None:
            assert torch.equal(b, merged_peft[name].bias), name
            assert_restored(b, b0, layer.ia3_l.flatten() if not layer.is_feedforward else torch.ones(()))
    assert_close(forward(ours, batch), unmerged_out, rel=1e-5)

    peft_edu.merge(ours)  # unload unmerges first
    peft_edu.unload(ours)
    assert not has_adapter_parts(ours)
    assert_close(forward(ours, batch), forward(base, batch), rel=1e-5)


# --- 6. adapter files ----------------------------------------------------------------------------
FILE_CASES = [
    pytest.param("bert_cls", dict(task_type="SEQ_CLS"), id="bert_cls-defaults"),
    pytest.param("bert", dict(target_modules=r".*\.(key|value|dense)", feedforward_modules=r".*layer\.\d\.output\.dense"),
                 id="bert-regex"),
    pytest.param("llama", dict(target_modules=LLAMA_KVD, feedforward_modules=["down_proj"], task_type="CAUSAL_LM"),
                 id="llama"),
    pytest.param("llama_cls", dict(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                   feedforward_modules=["down_proj", "up_proj"], task_type="SEQ_CLS"), id="llama_cls"),
]


@pytest.mark.parametrize("kind,config", FILE_CASES)
def test_peft_edu_file_loads_in_peft(kind, config, tmp_path, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    ours = ours_saved(base, peft_edu.IA3Config(**config), tmp_path, randomize_trainable)

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "IA3" and written["task_type"] == config.get("task_type")
    assert written["fan_in_fan_out"] is False and written["init_ia3_weights"] is True
    resolved = ours.peft_edu_config
    for field in ("target_modules", "feedforward_modules"):
        value = resolved.__dict__[field]
        assert written[field] == (value if isinstance(value, str) else sorted(value)), field

    # Same tensor names as the file PEFT itself writes; the vectors end in ia3_l.
    peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**copy.deepcopy(config))).save_pretrained(tmp_path / "peft")
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sum(k.endswith(".ia3_l") for k in keys) == len(ia3_layers(ours)) > 0
    assert all(k.startswith("base_model.model.") for k in keys)
    if config.get("task_type") is None:  # PEFT's own file has the defaults it resolved: the same lists as ours
        peft_written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        assert (peft_written["target_modules"], peft_written["feedforward_modules"]) == (
            written["target_modules"], written["feedforward_modules"])

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert {n: m.is_feedforward for n, m in peft_layers(theirs).items()} == {
        n: m.is_feedforward for n, m in ia3_layers(ours).items()}
    assert_close(forward(theirs, batch), forward(ours, batch))
    assert not torch.allclose(forward(theirs, batch), forward(base, batch), atol=1e-3)


@pytest.mark.parametrize("kind,config", FILE_CASES)
def test_peft_file_loads_in_peft_edu(kind, config, tmp_path, tiny_model, tiny_batch):
    base = tiny_model(kind)
    batch = tiny_batch(kind)
    theirs = peft_saved(base, peft.IA3Config(**copy.deepcopy(config)), tmp_path, randomize_trainable)
    ours = peft_edu.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert isinstance(ours.peft_edu_config, peft_edu.IA3Config)
    assert_close(forward(ours, batch), forward(theirs, batch))
    assert not torch.allclose(forward(ours, batch), forward(base, batch), atol=1e-3)
    saved = {k.removeprefix("base_model.model."): v for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    state = peft_edu.model.adapter_state_dict(ours)  # our tensors under the file's names
    assert state.keys() == saved.keys() and all(torch.equal(state[k], v) for k, v in saved.items())
    # And back: our round trip of that adapter is bit exact.
    peft_edu.save_adapter(ours, tmp_path / "again")
    again = peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "again").eval()
    assert torch.equal(forward(again, batch), forward(ours, batch))


def test_targets_without_feedforward_on_bert_save_a_loadable_config(tmp_path, tiny_model, tiny_batch):
    """IA3Config(target_modules=["key", "value"]) on BERT: PEFT fills in its default feedforward_modules
    ["output.dense"], writes them to adapter_config.json and then cannot load its own file (0.21.2)."""
    base = tiny_model("bert")
    batch = tiny_batch("bert")
    ours = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.IA3Config(target_modules=["key", "value"]))
    assert ours.peft_edu_config.feedforward_modules == []
    randomize_trainable(ours)
    peft_edu.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert_close(forward(theirs, batch), forward(ours, batch))

    peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["key", "value"])).save_pretrained(
        tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["feedforward_modules"] == ["output.dense"]
    with pytest.raises(ValueError, match="should be a subset of `target_modules`"):
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    with pytest.raises(ValueError, match=r"feedforward_modules entries \['output.dense'\] are not in target_modules"):
        peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "peft")


# --- 7. defaults ---------------------------------------------------------------------------------
def test_default_tables_equal_peft():
    assert DEFAULT_TARGET_MODULES.keys() == DEFAULT_FEEDFORWARD_MODULES.keys()
    for model_type, targets in DEFAULT_TARGET_MODULES.items():
        assert targets == TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type], model_type
        assert DEFAULT_FEEDFORWARD_MODULES[model_type] == TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[
            model_type], model_type
    assert {"bert", "llama"} <= DEFAULT_TARGET_MODULES.keys()


def test_defaults_are_resolved_into_a_copy(tiny_model):
    config = peft_edu.IA3Config(task_type="CAUSAL_LM")
    model = peft_edu.get_peft_model(tiny_model("llama"), config)
    assert config.target_modules is None and config.feedforward_modules is None  # PEFT mutates the user's config
    assert model.peft_edu_config.target_modules == LLAMA_KVD
    assert model.peft_edu_config.feedforward_modules == ["down_proj"]
    assert sorted(n.rsplit(".", 1)[-1] for n, m in ia3_layers(model).items() if m.is_feedforward) == ["down_proj"] * 2


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_defaults_need_a_known_model_type():
    with pytest.raises(ValueError, match=r"target_modules=None.*TwoLayers has model_type=None.*"
                                         r"target_modules=\['k_proj', 'v_proj', 'down_proj'\]"):
        peft_edu.get_peft_model(TwoLayers(), peft_edu.IA3Config())
    with pytest.raises(ValueError, match=r"feedforward_modules=None.*feedforward_modules=\[\] if none is"):
        peft_edu.get_peft_model(TwoLayers(), peft_edu.IA3Config(target_modules=["up", "down"]))
    model = peft_edu.get_peft_model(TwoLayers(), peft_edu.IA3Config(target_modules=["up", "down"],
                                                                    feedforward_modules=["down"]))
    assert {n: m.is_feedforward for n, m in ia3_layers(model).items()} == {"up": False, "down": True}


def test_default_feedforward_outside_the_targets_is_an_error(tiny_model):
    # PEFT accepts this, treats both output.dense layers as feed-forward, and writes a config it cannot load.
    with pytest.raises(ValueError, match=r"target_modules=\['dense'\] with PEFT's default feedforward_modules for bert"
                                         r".*'encoder\.layer\.0\.attention\.output\.dense'.*cannot load"):
        peft_edu.get_peft_model(tiny_model("bert"), peft_edu.IA3Config(target_modules=["dense"]))
    ok = peft_edu.get_peft_model(tiny_model("bert"), peft_edu.IA3Config(target_modules=["dense", "output.dense"]))
    assert sum(m.is_feedforward for m in ia3_layers(ok).values()) == 4  # 2 layers x (attention.output, output)


# --- 8. trainable parameter report ---------------------------------------------------------------
REPORT_CASES = [
    pytest.param("bert_cls", dict(task_type="SEQ_CLS"), id="bert_cls-defaults"),
    pytest.param("bert", dict(target_modules=["query", "intermediate.dense"], feedforward_modules=[]), id="bert"),
    pytest.param("llama", dict(task_type="CAUSAL_LM"), id="llama-defaults"),
    pytest.param("llama", dict(target_modules=["k_proj"], modules_to_save=["lm_head"], feedforward_modules=[],
                               task_type="CAUSAL_LM"), id="llama-lm_head"),
    pytest.param("llama_cls", dict(target_modules=LLAMA_KVD, feedforward_modules=["down_proj"], task_type="SEQ_CLS"),
                 id="llama_cls"),
]


@pytest.mark.parametrize("kind,config", REPORT_CASES)
def test_parameter_report_equals_peft(kind, config, capsys, tiny_model):
    ours, theirs = make_pair(tiny_model(kind), **config)
    assert peft_edu.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert re.fullmatch(REPORT_LINE, assert_same_report(ours, theirs, capsys))


def test_parameter_count_by_hand(tiny_model):
    base = tiny_model("bert_cls")
    n_base = sum(p.numel() for p in base.parameters())
    ours = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.IA3Config(task_type="SEQ_CLS"))
    # 2 layers x (key 32 + value 32 + attention.output.dense input 32 + output.dense input 64), head 32*3 + 3.
    vectors, head = 2 * (32 + 32 + 32 + 64), 32 * 3 + 3
    assert peft_edu.count_parameters(ours) == (vectors + head, n_base + vectors + head) == (419, n_base + 419)


# --- 9. bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,message", [
    (dict(target_modules=["key", "value"], feedforward_modules=["output.dense"]), ValueError,
     r"feedforward_modules entries \['output.dense'\] are not in target_modules \['key', 'value'\]: .*subset"),
    (dict(target_modules=["key"], fan_in_fan_out="yes"), ValueError, r"fan_in_fan_out='yes': must be True or False"),
    (dict(target_modules=["key"], init_ia3_weights="ones"), ValueError, r"init_ia3_weights='ones'"),
    (dict(target_modules=["key"], feedforward_modules=7), TypeError, r"feedforward_modules must be a list"),
    (dict(target_modules=["key"], feedforward_modules=[""]), ValueError, r"feedforward_modules=\[''\]"),
    (dict(target_modules=[]), ValueError, r"non-empty list of module names"),
])
def test_bad_config_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        peft_edu.IA3Config(**kwargs)


def test_feedforward_not_a_subset_is_rejected_by_peft_too():
    with pytest.raises(ValueError, match=r"^`feedforward_modules` should be a subset of `target_modules`$"):
        peft.IA3Config(target_modules=["key", "value"], feedforward_modules=["output.dense"])


@pytest.mark.parametrize("config,error,message", [
    (dict(target_modules=["key", "valeu"], feedforward_modules=[]), ValueError,
     r"target_modules entry 'valeu' matches no module of BertForSequenceClassification"),
    (dict(target_modules=["attention"], feedforward_modules=[]), TypeError,
     r"'bert\.encoder\.layer\.0\.attention', a BertAttention; .* only Linear"),
    (dict(target_modules=r".*\.(key|value)", feedforward_modules=["output.dense"]), ValueError,
     r"feedforward_modules entry 'output.dense' matches none of the targeted modules"),
    (dict(target_modules=["key", "output.dense"], feedforward_modules=r"output\.dense"), ValueError,
     r"feedforward_modules='output\\\\.dense' matches none of the targeted modules \(a regex must match the whole name\)"),
], ids=["unknown-target", "not-linear", "feedforward-list-matches-no-target", "feedforward-regex-matches-nothing"])
def test_bad_targets_leave_the_model_unchanged(config, error, message, tiny_model, tiny_batch):
    base = tiny_model("bert_cls")
    batch = tiny_batch("bert_cls")
    model = copy.deepcopy(base)
    with pytest.raises(error, match=message):
        peft_edu.get_peft_model(model, peft_edu.IA3Config(task_type="SEQ_CLS", **config))
    assert_unchanged(model, base, batch)


def test_load_adapter_other_hidden_size(tmp_path, tiny_model, tiny_batch):
    model = peft_edu.get_peft_model(tiny_model("bert_cls"), peft_edu.IA3Config(task_type="SEQ_CLS"))
    randomize_trainable(model)
    peft_edu.save_adapter(model, tmp_path)
    other = tiny_model("bert_cls", hidden_size=48)
    pristine = copy.deepcopy(other)
    with pytest.raises(ValueError, match=r"Shape mismatch at bert\.encoder\.layer\.0\.attention\.self\.key: the file has "
                                         r"ia3_l of shape \(32, 1\), the model expects \(48, 1\)\..*"
                                         r"feedforward_modules=\['output.dense'\]"):
        peft_edu.load_adapter(other, tmp_path)
    assert_unchanged(other, pristine, tiny_batch("bert_cls"))


def test_load_adapter_with_other_feedforward_modules(tmp_path, tiny_model, tiny_batch):
    """A file whose config says other feed-forward modules than the vectors were trained for fails on the shapes."""
    base = tiny_model("llama")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.IA3Config(target_modules=["down_proj"],
                                                                           feedforward_modules=["down_proj"]))
    peft_edu.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"feedforward_modules": [\n    "down_proj"\n  ]', '"feedforward_modules": []'))
    with pytest.raises(ValueError, match=r"Shape mismatch at model\.layers\.0\.mlp\.down_proj: the file has ia3_l of "
                                         r"shape \(1, 64\), the model expects \(32, 1\).*feedforward_modules=\[\]"):
        peft_edu.load_adapter(copy.deepcopy(base), tmp_path)


# --- 10. the real pretrained models (slow) -------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)  # the new classification head is random
    tokenizer, model = peft_edu.assets.load_encoder(num_labels=2)
    batch = tokenizer(["IA3 rescales keys, values and the FFN.", "Short."], padding=True, return_tensors="pt")
    return model.eval(), dict(batch)


@pytest.fixture(scope="module")
def smollm2():
    tokenizer, model = peft_edu.assets.load_causal_lm()
    batch = tokenizer(["IA3 rescales inner activations of the model.", "Hi"], padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    return model.eval(), dict(batch)


def check_real_model(base, batch, config, tmp_path, capsys):
    ours = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.IA3Config(**config))
    # far from 1, not so far that 30 layers explode
    parity.randomize_trainable(ours, draw=lambda name, p, noise: 1 + 0.3 * noise)
    ours.eval()
    out_base = forward(base, batch)
    peft_edu.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True).eval()
    out_ours, out_theirs = forward(ours, batch), forward(theirs, batch)
    assert_close(out_ours, out_theirs, rel=1e-5)
    assert not torch.allclose(out_ours, out_base, atol=1e-2)

    line_ours = assert_same_report(ours, theirs, capsys)

    peft_edu.merge(ours)
    assert_close(forward(ours, batch), out_ours, rel=1e-4)
    peft_edu.unmerge(ours)
    # And back: PEFT's file into peft_edu.
    theirs.save_pretrained(tmp_path / "peft")
    again = peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert_close(forward(again, batch), out_theirs, rel=1e-5)
    return line_ours


@pytest.mark.slow
def test_real_encoder_minilm(minilm, tmp_path, capsys):
    base, batch = minilm
    line = check_real_model(base, batch, dict(task_type="SEQ_CLS"), tmp_path, capsys)
    # 6 layers x (key 384 + value 384 + attention.output.dense 384 + output.dense 1536) + head 384*2 + 2
    assert line.startswith("trainable params: 16,898 || ")


@pytest.mark.slow
def test_real_causal_lm_smollm2(smollm2, tmp_path, capsys):
    base, batch = smollm2
    line = check_real_model(base, batch, dict(task_type="CAUSAL_LM"), tmp_path, capsys)
    # 30 layers x (k_proj 192 + v_proj 192 + down_proj input 1536)
    assert line.startswith("trainable params: 57,600 || ")
