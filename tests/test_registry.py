"""The method contract (``peft_edu/registry.py``): a new method is one file plus its registry line, and the package
stays easy to extend (no import cycle, no long module, one accessor for the frozen weight)."""

from __future__ import annotations

import ast
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import peft_edu
from peft_edu.injection import AdapterLayer, dense_weight, set_dense_weight
from peft_edu.registry import METHODS, register_method

PACKAGE = Path(peft_edu.__file__).parent

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")


# --- the toy method, registered from its own file (tests/toy_method.py) ------------------------------
def test_a_toy_method_gets_every_verb_from_one_file_and_one_registry_line(tiny_model, tiny_batch, tmp_path, capsys):
    from toy_method import FeatureScaleConfig, FeatureScaleLinear

    assert METHODS["FEATURE_SCALE"].config_class is FeatureScaleConfig
    base = tiny_model("bert")
    batch = tiny_batch("bert")
    reference = base(**batch).last_hidden_state

    model = peft_edu.get_peft_model(copy.deepcopy(base), FeatureScaleConfig(target_modules=["query", "value"]))
    assert model.peft_edu_config == FeatureScaleConfig(target_modules=["query", "value"])  # stored by get_peft_model
    layers = [m for m in model.modules() if isinstance(m, FeatureScaleLinear)]
    assert len(layers) == 2 * base.config.num_hidden_layers
    torch.testing.assert_close(model(**batch).last_hidden_state, reference)  # s = 1: the base model

    peft_edu.print_trainable_parameters(model)
    expected = sum(layer.feature_scale.numel() for layer in layers)
    assert f"trainable params: {expected:,d} ||" in capsys.readouterr().out

    with torch.no_grad():
        for layer in layers:
            layer.feature_scale.uniform_(0.5, 1.5)
    changed = model(**batch).last_hidden_state
    assert not torch.allclose(changed, reference, atol=1e-3)

    peft_edu.merge(model)
    torch.testing.assert_close(model(**batch).last_hidden_state, changed, atol=1e-5, rtol=1e-4)
    peft_edu.unmerge(model)

    peft_edu.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "FEATURE_SCALE"
    loaded = peft_edu.load_adapter(copy.deepcopy(base), tmp_path)  # the config class found by peft_type
    assert isinstance(loaded.peft_edu_config, FeatureScaleConfig)
    torch.testing.assert_close(loaded(**batch).last_hidden_state, changed)

    unloaded = peft_edu.unload(model)
    assert not any(isinstance(m, FeatureScaleLinear) for m in unloaded.modules())
    torch.testing.assert_close(unloaded(**batch).last_hidden_state, reference, atol=1e-5, rtol=1e-4)
    assert all(p.requires_grad for p in unloaded.parameters())


def test_registering_checks_the_config_class():
    @dataclass
    class NoType(peft_edu.PeftConfig):
        pass

    with pytest.raises(ValueError, match="peft_type"):
        register_method(NoType, lambda model, configs, in_union: configs)
    with pytest.raises(TypeError, match="injector"):
        register_method(peft_edu.LoraConfig, "not a function")

    @dataclass
    class Impostor(peft_edu.PeftConfig):
        peft_type = "LORA"

    with pytest.raises(ValueError, match="already registered"):
        register_method(Impostor, lambda model, configs, in_union: configs)
    assert METHODS["LORA"].config_class is peft_edu.LoraConfig


def test_an_unregistered_config_is_refused_and_the_model_left_alone(tiny_model):
    @dataclass
    class Unknown(peft_edu.PeftConfig):
        peft_type = "UNKNOWN_METHOD"

    model = tiny_model("bert")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="UNKNOWN_METHOD.*registered"):
        peft_edu.get_peft_model(model, Unknown(target_modules=["query"]))
    assert not hasattr(model, "peft_edu_config") and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_every_course_method_is_registered_with_its_config_class():
    assert {t: m.config_class for t, m in METHODS.items() if t != "FEATURE_SCALE"} == {
        "LORA": peft_edu.LoraConfig, "IA3": peft_edu.IA3Config, "BOTTLENECK": peft_edu.BnConfig,
        "PREFIX_TUNING": peft_edu.PrefixTuningConfig, "PROMPT_TUNING": peft_edu.PromptTuningConfig}


def test_a_union_hands_each_method_only_its_own_members(tiny_model, monkeypatch):
    seen = {}
    for peft_type in ("BOTTLENECK", "PREFIX_TUNING"):
        method = METHODS[peft_type]

        def spy(model, configs, in_union, _inject=method.inject, _type=peft_type):
            seen[_type] = ([type(c).__name__ for c in configs], in_union)
            return _inject(model, configs, in_union)

        monkeypatch.setitem(METHODS, peft_type, type(method)(method.config_class, spy))
    config = peft_edu.ConfigUnion(
        peft_edu.PrefixTuningConfig(num_virtual_tokens=2, task_type="FEATURE_EXTRACTION"),
        peft_edu.DoubleSeqBnConfig(leave_out=[0]), peft_edu.ParBnConfig(leave_out=[1]),
        task_type="FEATURE_EXTRACTION")
    model = peft_edu.get_peft_model(tiny_model("bert"), config)
    assert seen == {"PREFIX_TUNING": (["PrefixTuningConfig"], True),
                    "BOTTLENECK": (["DoubleSeqBnConfig", "ParBnConfig"], True)}
    stored = model.peft_edu_config
    assert isinstance(stored, peft_edu.ConfigUnion) and stored.configs[0].token_dim == 32  # resolved by the method
    assert stored.configs[1:] == config.configs[1:]


# --- one accessor for the frozen weight ------------------------------------------------------------
class TransposedLinear(nn.Module):
    """A base layer that stores W as (d_in, d_out), like transformers' Conv1D: no method knows it."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().T.clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return x @ self.weight + self.bias


@dense_weight.register
def _(layer: TransposedLinear) -> torch.Tensor:
    return layer.weight.T


@set_dense_weight.register
def _(layer: TransposedLinear, weight: torch.Tensor) -> None:
    layer.weight.copy_(weight.T)


@pytest.mark.parametrize("layer_class, kwargs", [
    (peft_edu.LoraLinear, {"r": 2, "lora_alpha": 4}),
    (peft_edu.DoraLinear, {"r": 2, "lora_alpha": 4}),
    (peft_edu.IA3Linear, {"is_feedforward": False}),
    (peft_edu.IA3Linear, {"is_feedforward": True}),
], ids=["lora", "dora", "ia3-output", "ia3-feedforward"])
def test_one_weight_accessor_adapts_a_differently_stored_base_layer(layer_class, kwargs):
    """Registering how to read and write one base-layer type is all that LoRA, DoRA and IA³ need from it."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    x = torch.randn(4, 6)
    ours = layer_class(TransposedLinear(linear), **kwargs).eval()
    reference = layer_class(copy.deepcopy(linear), **kwargs).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if not name.startswith("base_layer."):
                param.copy_(torch.randn_like(param))
        ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("base_layer.")},
                             strict=False)
    torch.testing.assert_close(ours(x), reference(x))
    ours.merge()
    reference.merge()
    torch.testing.assert_close(ours.base_weight(), reference.base_weight())
    torch.testing.assert_close(ours(x), reference(x))
    ours.unmerge()
    torch.testing.assert_close(ours.base_layer.weight.T, linear.weight, atol=1e-5, rtol=1e-4)


def test_method_layers_read_the_frozen_weight_only_through_the_accessor():
    """No method module touches ``base_layer.weight`` / ``.bias`` itself (injection.py defines the accessor)."""
    offenders = []
    for path in PACKAGE.glob("*.py"):
        if path.name == "injection.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("weight", "bias")
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "base_layer"):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_an_adapter_layer_without_a_weight_reader_says_what_to_register():
    class Odd(nn.Module):
        pass

    with pytest.raises(TypeError, match="dense_weight.register"):
        AdapterLayer(Odd()).base_weight()


# --- the package's shape ------------------------------------------------------------------------------
def _internal_imports(path: Path) -> set[str]:
    """The top-level peft_edu modules (or sub-packages) that ``path`` imports, at the top or inside functions."""
    depth = len(path.relative_to(PACKAGE).parts)  # 1: peft_edu/x.py, 2: peft_edu/checks/x.py
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == depth:  # relative to peft_edu itself
            found.update([node.module.split(".")[0]] if node.module else [alias.name for alias in node.names])
        elif node.level == 0 and (node.module or "").startswith("peft_edu."):
            found.add(node.module.split(".")[1])
    return found


def _modules() -> dict[str, list[Path]]:
    """Top-level module or sub-package name -> its files (a sub-package counts as one node of the graph)."""
    modules = {p.stem: [p] for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    modules.update({p.name: sorted(p.glob("*.py")) for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()})
    return modules


def test_the_import_graph_of_peft_edu_has_no_cycle():
    modules = _modules()
    graph = {name: set().union(*map(_internal_imports, paths)) & set(modules) - {name}
             for name, paths in modules.items()}
    state: dict[str, str] = {}

    def visit(name, trail):
        state[name] = "open"
        for dep in sorted(graph[name]):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(trail + [name, dep])}"
            if dep not in state:
                visit(dep, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert "registry" in graph and not graph["registry"]  # the registry imports nothing of the package
    assert "lora" in graph["checks"] and "lora" in graph["dora"] and "dora" not in graph["lora"]  # the graph is read


def test_no_module_of_peft_edu_is_over_600_lines():
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(lengths.values()) <= 600, {k: v for k, v in lengths.items() if v > 600}
