r"""Composing bottleneck adapters as AdapterHub does: ``Stack`` (one adapter after the other) and ``Fuse``
(AdapterFusion, Pfeiffer et al., arXiv 2005.00247: attention over the adapters' outputs).

At one adapter position of a BERT layer, with h the sublayer's output, x its input and LN its LayerNorm, a serial
adapter i maps h to ``S_i(h) = A_i(z_i(h)) + r_i(h)`` (Pfeiffer: z = LN(h + x), r = h; Houlsby: z = r = h), and the
layer then computes LN(S_i(h) + x). AdapterHub's compositions replace S_i:

    Stack(a, b):   LN(S_b(S_a(h)) + x)         b reads a's output; x and LN stay the layer's own
    Fuse(a, b):    z, r = the *last* adapter's input and skip connection at h
                   u_i = s_i · (W_up,i f(W_down,i z + b_down,i) + b_up,i)         each adapter's output (no skip)
                   α = softmax_i( (W_q z + b_q) · (W_k u_i + b_k) )                attention over the adapters
                   LN(Σ_i α_i W_v u_i + r + x)                                   ("dynamic": W_v, no bias, starts as I)

The fusion layer (W_q, W_k, W_v at every position where all fused adapters sit) is trained while the adapters stay
frozen (AdapterHub's ``train_adapter_fusion``); a Stack trains all its adapters.

Design, in peft_edu's one-active-adapter model: the composed adapters are named adapters of the model
(``add_adapter`` / ``load_adapter(..., adapter_name=...)``). ``set_active_adapters(model, Stack("a", "b"))`` makes
the first one the active adapter (so every other verb sees the model as before) and hands each of its
``BottleneckAdapter`` modules a *site composition*: the modules of all composed adapters at that position (the
others' stay parked, and are called from there) and, for Fuse, that position's fusion layer. The fusion layers
live in an ``AdapterFusion`` module, returned by ``add_adapter_fusion``. The parked adapters and the fusion layers
are not submodules of the model, so ``model.parameters()`` does not list them: give the optimizer
``composition_parameters(model)``. ``set_active_adapters(model, None)`` ends the composition; it stays attached to
its first adapter's modules through ``set_adapter`` (switching back to that adapter brings it back), so end it first.

Limits (refused with an error): BERT-style (post-norm) models; serial adapters (``SeqBnConfig``,
``DoubleSeqBnConfig``...; AdapterHub's parallel adapters in a composition are not implemented); every composed
adapter at the same positions; nested compositions are not implemented. AdapterHub's trainer adds a fusion regularisation
to the loss (regularization=True, the "dynamic" default); here the caller does: ``loss + fusion.regularization_loss()``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .bottleneck import BnConfig, BottleneckAdapter
from .injection import adapter_modules
from .named_adapters import active_config, adapter_parts, list_adapters, set_adapter, set_trainable

FUSION_CONFIG_NAME, FUSION_WEIGHTS_NAME = "adapter_fusion_config.json", "pytorch_model_adapter_fusion.bin"  # AdapterHub's

# AdapterHub's fusion presets ("dynamic" is its default), with its field names.
FUSION_PRESETS = {
    "dynamic": {"key": True, "query": True, "value": True, "query_before_ln": False, "regularization": True,
                "residual_before": False, "temperature": False, "value_before_softmax": True,
                "value_initialized": True, "dropout_prob": None},
    "static": {"key": True, "query": True, "value": False, "query_before_ln": False, "regularization": False,
               "residual_before": False, "temperature": False, "value_before_softmax": True,
               "value_initialized": False, "dropout_prob": None},
}


class _Composition:
    kind = ""

    def __init__(self, *adapter_names: str):
        if len(adapter_names) < 2 or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError(f"{self.kind}{adapter_names!r}: give two or more adapter names, e.g. "
                             f"peft_edu.{self.kind}('a', 'b'); for one adapter use peft_edu.set_adapter(model, 'a').")
        if len(set(adapter_names)) != len(adapter_names):
            raise ValueError(f"{self.kind}{adapter_names!r} names an adapter twice; each adapter once.")
        self.names = list(adapter_names)

    @property
    def name(self) -> str:  # AdapterHub's name of a fusion: "a,b"
        return ",".join(self.names)

    def __repr__(self) -> str:
        return f"{self.kind}({', '.join(map(repr, self.names))})"


class Stack(_Composition):
    """The adapters one after the other at every position: ``Stack("a", "b")`` feeds a's output to b."""

    kind = "Stack"


class Fuse(_Composition):
    """AdapterFusion over the adapters' outputs at every position (needs ``add_adapter_fusion`` first)."""

    kind = "Fuse"


# --- the fusion layer ----------------------------------------------------------------------------
class FusionLayer(nn.Module):
    """AdapterHub's ``BertFusion``: query from the adapters' input, keys and values from their outputs."""

    def __init__(self, config: dict, hidden_size: int, dropout_prob: float, factory: dict):
        super().__init__()
        self.config = config
        # AdapterHub's order of random draws: each Linear (its default init) and at once BERT's init, N(0, 0.02²)
        # with a zero bias; then W_v ≈ I (1e-6 off the diagonal) with value_initialized.
        self.query = self._bert_linear(hidden_size, True, factory) if config["query"] else None
        self.key = self._bert_linear(hidden_size, True, factory) if config["key"] else None
        self.value = self._bert_linear(hidden_size, False, factory) if config["value"] else None
        if self.value is not None and config["value_initialized"]:
            with torch.no_grad():
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.dropout_prob = dropout_prob

    @staticmethod
    @torch.no_grad()
    def _bert_linear(size: int, bias: bool, factory: dict) -> nn.Linear:
        linear = nn.Linear(size, size, bias=bias, **factory)
        linear.weight.normal_(0.0, 0.02)
        if bias:
            linear.bias.zero_()
        return linear

    def forward(self, query: torch.Tensor, outputs: torch.Tensor, residual: torch.Tensor, training: bool) -> torch.Tensor:
        """query (batch, seq, d), outputs (batch, seq, n_adapters, d), residual (batch, seq, d). ``training``: the
        model's mode, not this module's (the fusion layers are not a submodule of the model, so model.eval() does not
        reach them)."""
        if self.config["residual_before"]:
            outputs = outputs + residual.unsqueeze(2)
        q = self.query(query) if self.query is not None else query
        k = self.key(outputs) if self.key is not None else outputs
        v = self.value(outputs) if self.value is not None and self.config["value_before_softmax"] else outputs
        scores = torch.einsum("bsd,bsnd->bsn", q, k)
        scores = nn.functional.dropout(scores, self.dropout_prob, training)  # AdapterHub drops scores, before the softmax
        mixed = torch.einsum("bsn,bsnd->bsd", scores.softmax(dim=-1), v)
        if self.value is not None and not self.config["value_before_softmax"]:
            mixed = self.value(mixed)
        return mixed if self.config["residual_before"] else mixed + residual


class AdapterFusion(nn.Module):
    """The fusion layers of one ``Fuse``, one per adapter position (keys: the positions' module names, dots as '-')."""

    def __init__(self, fuse: Fuse, config: dict, layers: dict[str, FusionLayer]):
        super().__init__()
        self.fuse, self.config = fuse, config
        self.layers = nn.ModuleDict({name.replace(".", "-"): layer for name, layer in layers.items()})

    def layer_at(self, module_name: str) -> FusionLayer:
        return self.layers[module_name.replace(".", "-")]

    def regularization_loss(self) -> torch.Tensor:
        """0.01 · Σ_positions ‖I − W_v‖², AdapterHub's ``get_fusion_regularization_loss`` (its trainer adds it to the
        loss when the fusion config has regularization=True): it keeps W_v near the identity."""
        values = [layer.value.weight for layer in self.layers.values() if layer.value is not None]
        if not values:
            raise ValueError("This fusion has no value matrices (config 'static'), so there is nothing to regularise.")
        eye = torch.eye(values[0].shape[0], device=values[0].device, dtype=values[0].dtype)
        return sum(0.01 * (eye - w).pow(2).sum() for w in values)


# --- what runs at one position --------------------------------------------------------------------
class SiteComposition:
    """The composed adapters' modules at one position, run by ``BottleneckAdapter._post_norm_forward``."""

    def __init__(self, members: list[BottleneckAdapter], fusion: FusionLayer | None):
        self.members, self.fusion = members, fusion

    def forward_site(self, anchor: BottleneckAdapter, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        layer_norm = anchor.base_layer.LayerNorm
        last = self.members[-1]
        if self.fusion is None:  # Stack: each adapter reads the previous one's output; x stays the layer's input
            for member in self.members:
                h = member._serial(h, x, layer_norm)
        else:  # Fuse: the last adapter decides the input, the query and the skip connection (as AdapterHub)
            z, r = last.serial_input(h, x, layer_norm)
            query = h if self.fusion.config["query_before_ln"] else z
            outputs = torch.stack([member.up_projection(z) for member in self.members], dim=2)
            h = self.fusion(query, outputs, r, anchor.training)
        return layer_norm(h + x) if last.original_ln_after else h


# --- the verbs -------------------------------------------------------------------------------------
def _bottleneck_parts(model: nn.Module, name: str) -> dict[str, BottleneckAdapter]:
    """The modules of adapter ``name`` (active or parked) by module name; an error if it is not a bottleneck adapter."""
    config, parts = adapter_parts(model, name)
    if not isinstance(config, BnConfig):
        raise ValueError(f"Adapter {name!r} is a {type(config).__name__}; Stack and Fuse compose adapters of one "
                         "bottleneck config each (SeqBnConfig, DoubleSeqBnConfig, ...), as AdapterHub's do.")
    modules = {n: m for n, m in parts if isinstance(m, BottleneckAdapter)}
    for module in modules.values():
        if module.style != "post_norm":
            raise ValueError(f"Adapter {name!r} sits in a pre-norm (Llama-style) model; peft_edu composes adapters in "
                             "BERT-style (post-norm) models only.")
        if module.is_parallel:
            raise ValueError(f"Adapter {name!r} is a parallel adapter (is_parallel=True); peft_edu composes serial "
                             "adapters only (SeqBnConfig, DoubleSeqBnConfig).")
    return modules


def _checked_members(model: nn.Module, composition) -> dict[str, dict[str, BottleneckAdapter]]:
    """{adapter name: its modules by module name}, after every check (nothing changes before this returns)."""
    if not isinstance(composition, (Stack, Fuse)):
        raise TypeError(f"{composition!r}: give peft_edu.Stack('a', 'b'), peft_edu.Fuse('a', 'b') or None "
                        "(nested compositions are not implemented).")
    active_config(model)
    unknown = [n for n in composition.names if n not in list_adapters(model)]
    if unknown:
        raise ValueError(f"{composition!r} names adapters the model does not have: {unknown}; its adapters are "
                         f"{list_adapters(model)} (add one with peft_edu.add_adapter or peft_edu.load_adapter(..., "
                         "adapter_name=...)).")
    members = {name: _bottleneck_parts(model, name) for name in composition.names}
    first, *others = composition.names
    for name in others:
        if set(members[name]) != set(members[first]):
            raise ValueError(f"Adapters {first!r} and {name!r} sit at different positions ({sorted(members[first])} "
                             f"vs {sorted(members[name])}); compose adapters of the same placement (same config "
                             "kind and leave_out).")
    return members


def add_adapter_fusion(model: nn.Module, fuse: Fuse, config: str | dict = "dynamic") -> AdapterFusion:
    """New fusion layers for ``fuse`` at every position of its adapters (AdapterHub's ``add_adapter_fusion``).

    config: "dynamic" (AdapterHub's default: query, key and value), "static" (no value) or a dict of AdapterHub's
    fields. Draws from torch's random stream as AdapterHub does (query, key, value per position, in layer order)."""
    if not isinstance(fuse, Fuse):
        raise TypeError(f"add_adapter_fusion(model, peft_edu.Fuse('a', 'b')), not {fuse!r}.")
    config = _fusion_config(config)
    members = _checked_members(model, fuse)
    first = members[fuse.names[0]]
    hidden_size = model.config.hidden_size
    dropout = config["dropout_prob"] or getattr(model.config, "attention_probs_dropout_prob", 0.0)
    layers = {}
    for module_name, module in first.items():
        weight = module.adapter_down.weight
        layers[module_name] = FusionLayer(config, hidden_size, dropout, {"device": weight.device, "dtype": weight.dtype})
    return AdapterFusion(fuse, config, layers)


def _fusion_config(config) -> dict:
    if isinstance(config, str):
        if config not in FUSION_PRESETS:
            raise ValueError(f"AdapterFusion config {config!r}: one of {list(FUSION_PRESETS)} or a dict of its fields.")
        return dict(FUSION_PRESETS[config])
    if not isinstance(config, dict) or set(config) - set(FUSION_PRESETS["dynamic"]) - {"architecture"}:
        raise ValueError(f"AdapterFusion config {config!r}: a dict with AdapterHub's fields "
                         f"{sorted(FUSION_PRESETS['dynamic'])}.")
    full = {**FUSION_PRESETS["dynamic"], **{k: v for k, v in config.items() if k != "architecture"}}
    if full["temperature"]:
        raise ValueError("temperature=True (AdapterHub's annealed softmax temperature) is not implemented; use False.")
    if not (full["query"] or full["key"] or full["value"]):
        raise ValueError("query=key=value=False (AdapterHub's single dense scorer) is not implemented; "
                         "keep query and key.")
    return full


def set_active_adapters(model: nn.Module, composition, fusion: AdapterFusion | None = None) -> None:
    """Run several named bottleneck adapters together (AdapterHub's ``set_active_adapters``): ``Stack("a", "b")``
    trains both adapters; ``Fuse("a", "b")`` with the ``AdapterFusion`` from ``add_adapter_fusion`` trains only the
    fusion layers (AdapterHub's ``train_adapter_fusion``), the adapters frozen. ``None`` ends any composition (the
    active adapter stays active, alone). A refused call leaves the model as it was."""
    if composition is None:
        _end_composition(model)
        return
    members = _checked_members(model, composition)
    if isinstance(composition, Fuse):
        if not isinstance(fusion, AdapterFusion) or fusion.fuse.names != composition.names:
            raise ValueError(f"{composition!r} needs its fusion layers: fusion = peft_edu.add_adapter_fusion(model, "
                             f"{composition!r}), then set_active_adapters(model, {composition!r}, fusion).")
    elif fusion is not None:
        raise ValueError(f"{composition!r} has no fusion layers; pass fusion= with a Fuse only.")
    _end_composition(model)
    set_adapter(model, composition.names[0])  # the anchor: every other verb sees this adapter
    anchors = adapter_modules(model)
    device = next(model.parameters()).device  # model.to(device) moved only the modules in the model
    for name in composition.names[1:]:
        for module in members[name].values():
            module.to(device)
    if fusion is not None:
        fusion.to(device)
    for module_name in members[composition.names[0]]:
        layer = fusion.layer_at(module_name) if fusion is not None else None
        anchors[module_name].__dict__["composition"] = SiteComposition(
            [members[name][module_name] for name in composition.names], layer)
    trains_adapters = isinstance(composition, Stack)
    for name in composition.names:
        set_trainable(list(members[name].items()), trains_adapters)
    if fusion is not None:
        fusion.requires_grad_(True)
    model.peft_edu_composition = composition
    model.__dict__["peft_edu_fusion"] = fusion  # not a submodule: the model's state_dict stays the base model's


def composition_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What trains under the active composition, for the optimizer: every composed adapter's parameters (Stack) or
    the fusion layers' (Fuse)."""
    composition = getattr(model, "peft_edu_composition", None)
    if composition is None:
        raise ValueError("No composition is active: call peft_edu.set_active_adapters(model, peft_edu.Stack('a', 'b')) "
                         "first (for one adapter, the trainable parameters of model.parameters() are the ones).")
    if isinstance(composition, Fuse):
        return list(model.peft_edu_fusion.parameters())
    return [p for name in composition.names for module in _bottleneck_parts(model, name).values()
            for p in module.parameters() if p.requires_grad]


def _end_composition(model: nn.Module) -> None:
    active_config(model)
    for module in adapter_modules(model).values():
        module.__dict__.pop("composition", None)
    model.__dict__.pop("peft_edu_composition", None)
    model.__dict__.pop("peft_edu_fusion", None)


# --- AdapterHub's fusion files ---------------------------------------------------------------------
def _hub_key(fusion: AdapterFusion, module_name: str, tensor: str) -> str:
    """AdapterHub's key: ``<model prefix>.encoder.layer.<i>.output.adapter_fusion_layer.a,b.query.weight``."""
    return f"{module_name}.adapter_fusion_layer.{fusion.fuse.name}.{tensor}"


def save_adapter_fusion(model: nn.Module, fusion: AdapterFusion, directory: str | Path) -> None:
    """Write the fusion layers as AdapterHub's ``save_adapter_fusion`` does (``adapter_fusion_config.json``,
    ``pytorch_model_adapter_fusion.bin``), keys relative to the model (BERT: ``bert.encoder.layer.0.output...``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {_hub_key(fusion, name.replace("-", "."), t): v.detach().cpu().clone()
             for name, layer in fusion.layers.items() for t, v in layer.state_dict().items()}
    torch.save(state, directory / FUSION_WEIGHTS_NAME)
    config = {"config": {**fusion.config}, "adapter_names": fusion.fuse.names, "model_type": model.config.model_type,
              "hidden_size": model.config.hidden_size, "name": fusion.fuse.name}
    (directory / FUSION_CONFIG_NAME).write_text(json.dumps(config, indent=2))


def load_adapter_fusion(model: nn.Module, directory: str | Path) -> AdapterFusion:
    """Read the fusion layers AdapterHub's ``save_adapter_fusion`` (or ``save_adapter_fusion`` here) wrote; the fused
    adapters must be named adapters of ``model`` already. Returns the ``AdapterFusion`` for ``set_active_adapters``."""
    directory = Path(directory)
    missing = [n for n in (FUSION_CONFIG_NAME, FUSION_WEIGHTS_NAME) if not (directory / n).exists()]
    if missing:
        raise FileNotFoundError(f"{directory} has no AdapterHub fusion ({', '.join(missing)} missing); AdapterHub's "
                                "model.save_adapter_fusion(directory, 'a,b') writes them.")
    saved_config = json.loads((directory / FUSION_CONFIG_NAME).read_text())
    fusion = add_adapter_fusion(model, Fuse(*saved_config["adapter_names"]), saved_config["config"])
    saved = torch.load(directory / FUSION_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    expected = {_hub_key(fusion, name.replace("-", "."), t): v for name, layer in fusion.layers.items()
                for t, v in layer.state_dict().items()}
    # AdapterHub's keys start at the model's own prefix (bert.encoder...), the module names here too, unless the
    # model was saved from its base (BertModel: encoder...): match by suffix.
    unmatched = set(expected)
    with torch.no_grad():
        for key, tensor in saved.items():
            target = next((k for k in unmatched if k == key or key.endswith("." + k) or k.endswith("." + key)), None)
            if target is None:
                raise ValueError(f"The fusion file's tensor {key!r} has no place in {type(model).__name__}; was it "
                                 "saved from another architecture?")
            if expected[target].shape != tensor.shape:
                raise ValueError(f"{key}: the file has shape {tuple(tensor.shape)}, the model "
                                 f"{tuple(expected[target].shape)} (another hidden size?).")
            expected[target].copy_(tensor)
            unmatched.discard(target)
    if unmatched:
        raise ValueError(f"The fusion file has no tensors for {sorted(unmatched)[:3]}...: it fuses adapters at other "
                         "positions.")
    return fusion
