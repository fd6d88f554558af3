"""The adapters a model holds, by name (PEFT's vocabulary): which is active, switching, deleting.

A model that ``get_peft_model`` changed has one *active* adapter, whose modules are in the model, and any number of
*parked* ones (``add_adapter`` / ``load_adapter(..., adapter_name=...)`` in ``model.py``): their modules, which hold
the same frozen base layers, wait in ``model.peft_edu_parked`` until ``set_adapter`` swaps them in for the active
one. Every other verb (merge, save, disable, the parameter report) therefore sees one adapter at a time, as it did
before there were names; ``mixed_batch.py`` puts all of them to work in one batch.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .config import PeftConfig
from .injection import AdapterModule, adapter_layers, adapter_modules

BASE_MODEL_ROW = "__base__"  # PEFT's name for "no adapter": a row of a mixed batch, never an adapter's name


def active_config(model: nn.Module) -> PeftConfig:
    """The active adapter's config, as applied; the error says how to give the model one."""
    config = getattr(model, "peft_edu_config", None)
    if config is None:
        raise ValueError("This model has no peft_edu adapter: call peft_edu.get_peft_model(model, config) first.")
    return config


@dataclasses.dataclass
class ParkedAdapter:
    """An adapter that is not active: its config and its modules, (name in the model, module), outermost first."""

    config: PeftConfig
    parts: list[tuple[str, AdapterModule]]


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the model's adapters, the active one first."""
    active_config(model)
    return [model.peft_edu_active_adapter, *model.peft_edu_parked]


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter the model computes with (PEFT's ``model.active_adapter``)."""
    active_config(model)
    return model.peft_edu_active_adapter


def set_adapter(model: nn.Module, adapter_name: str, inference_mode: bool = False) -> None:
    """Make ``adapter_name`` the active adapter, trainable unless ``inference_mode`` (PEFT's ``set_adapter``); the
    adapter that was active is parked, frozen."""
    active_config(model)
    _check_known(model, adapter_name)
    composition = getattr(model, "peft_edu_composition", None)
    if composition is not None:  # it hangs on the active adapter's modules: switching would bring it back later
        raise ValueError(f"set_adapter(model, {adapter_name!r}): the composition {composition!r} is active; end it "
                         "first with peft_edu.set_active_adapters(model, None).")
    if adapter_name != model.peft_edu_active_adapter:
        refuse_while_merged(model, "switch to another adapter")
        chosen = model.peft_edu_parked.pop(adapter_name)
        follow_the_model(model, chosen.parts)
        parked = ParkedAdapter(model.peft_edu_config, take_out(model))
        set_trainable(parked.parts, False)
        model.peft_edu_parked[model.peft_edu_active_adapter] = parked
        put_in(model, chosen.parts)
        model.peft_edu_config, model.peft_edu_active_adapter = chosen.config, adapter_name
    set_trainable(list(adapter_modules(model).items()), not inference_mode)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Forget a parked adapter (PEFT's ``delete_adapter``). The active one is refused: switch away from it first."""
    active_config(model)
    _check_known(model, adapter_name)
    if adapter_name == model.peft_edu_active_adapter:
        others = list(model.peft_edu_parked)
        fix = (f"switch to another one first (peft_edu.set_adapter(model, {others[0]!r}))" if others else
               "it is the model's only adapter: peft_edu.unload(model) takes it out")
        raise ValueError(f"Adapter {adapter_name!r} is the active adapter and cannot be deleted; {fix}.")
    del model.peft_edu_parked[adapter_name]


def check_new_name(model: nn.Module, adapter_name) -> None:
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name == BASE_MODEL_ROW or "." in adapter_name:
        raise ValueError(f"adapter_name={adapter_name!r}: give a non-empty name without dots, other than "
                         f"{BASE_MODEL_ROW!r} (which stands for the base model in a mixed batch).")
    if hasattr(model, "peft_edu_parked") and adapter_name in list_adapters(model):
        raise ValueError(f"The model already has an adapter named {adapter_name!r}; choose another name, or "
                         f"peft_edu.delete_adapter(model, {adapter_name!r}) first (switching away if it is active).")


def _check_known(model: nn.Module, adapter_name) -> None:
    if adapter_name not in list_adapters(model):
        raise ValueError(f"The model has no adapter named {adapter_name!r}; its adapters are {list_adapters(model)}.")


def refuse_while_merged(model: nn.Module, verb: str) -> None:
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise RuntimeError(f"The active adapter is merged into the base weights; call peft_edu.unmerge(model) before "
                           f"you {verb}.")


def _own_parameters(module: AdapterModule) -> list[nn.Parameter]:
    return [param for name, param in module.named_parameters() if not name.startswith(("base_layer.", "original_module."))]


def follow_the_model(model: nn.Module, parts: list[tuple[str, AdapterModule]]) -> None:
    """Give a parked adapter's modules the device, and its own parameters the floating dtype, of the adapter in the
    model: ``model.to(device)`` or ``model.to(torch.bfloat16)`` reached only the modules in the model. Modules already
    there are left alone: a mixed batch calls this for every adapter it names, at every call."""
    device = next(model.parameters()).device
    in_model = (param for module in adapter_modules(model).values() for param in _own_parameters(module))
    dtype = next((param.dtype for param in in_model if param.is_floating_point()), None)
    for _, module in parts:
        own = _own_parameters(module)
        if any(tensor.device != device for tensor in [*own, *module.buffers()]):
            module.to(device)
        for param in own:
            if dtype is not None and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)


def adapter_parts(model: nn.Module, adapter_name: str) -> tuple[PeftConfig, list[tuple[str, AdapterModule]]]:
    """(config, modules) of adapter ``adapter_name``, active or parked; a parked one first follows the model's device
    and dtype, so that whoever computes with its modules finds them where the model is."""
    return adapters_parts(model, [adapter_name])[adapter_name]


def adapters_parts(model: nn.Module, adapter_names: list[str]) -> dict[str, tuple[PeftConfig, list]]:
    """``adapter_parts`` of several adapters, the parked ones moved in one pass over the model."""
    found, parked = {}, []
    for name in adapter_names:
        if name == model.peft_edu_active_adapter:
            found[name] = (model.peft_edu_config, list(adapter_modules(model).items()))
        else:
            found[name] = (model.peft_edu_parked[name].config, model.peft_edu_parked[name].parts)
            parked.extend(found[name][1])
    if parked:
        follow_the_model(model, parked)
    return found


def take_out(model: nn.Module) -> list[tuple[str, AdapterModule]]:
    """Take every adapter module out of the model (the base model is left) and return them for ``put_in``."""
    parts = list(adapter_modules(model).items())
    for name, module in parts:
        module.remove(model, name)
    return parts


def put_in(model: nn.Module, parts: list[tuple[str, AdapterModule]]) -> None:
    for name, module in reversed(parts):
        module.put_back(model, name)


def set_trainable(parts: list[tuple[str, AdapterModule]], trainable: bool) -> None:
    """requires_grad of the adapter's own parameters (not of the frozen base layers inside its modules)."""
    for _, module in parts:
        for param in _own_parameters(module):
            param.requires_grad_(trainable)
