"""The list of methods peft_edu knows, and the one contract each method follows.

A method is a module (``lora.py``, ``ia3.py``, ...) that defines

* a **config class**, a dataclass subclass of ``PeftConfig`` whose class attribute ``peft_type`` (``"LORA"``)
  is the name PEFT writes into ``adapter_config.json``;
* an **injector**, ``inject(model, configs, in_union) -> resolved configs``: it adds the method to the frozen
  ``model`` for each config in ``configs`` (one config, or this method's members of a ``ConfigUnion``, in their
  order; ``in_union`` says which) and returns the configs as they were applied, with every default that the
  model decided filled in (IA³'s target lists, prefix tuning's dimensions); ``save_adapter`` writes those;
* the modules it puts into the model, subclasses of ``injection.AdapterModule`` (usually ``AdapterLayer``),
  which hold the adapter's tensors and know how to take themselves out again;

and ends with one line, ``register_method(TheConfig, inject_the_method)``. Everything else is derived:
``get_peft_model`` looks the injector up here and stores the resolved config, ``load_adapter`` finds the
config class by the file's ``peft_type``, and the parameter report, ``save_adapter``, ``merge`` and ``unload``
work on whatever ``AdapterModule``\\ s the injector put in. ``CONTRIBUTING.md`` walks through an example.

This module imports nothing from the rest of the package, so every method module can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One registered method: its config class and its injector."""

    config_class: type
    inject: Callable  # inject(model, configs: list, in_union: bool) -> list (the resolved configs)

    @property
    def peft_type(self) -> str:
        return self.config_class.peft_type


METHODS: dict[str, Method] = {}


def register_method(config_class: type, inject: Callable) -> Method:
    """Make ``config_class`` (its ``peft_type``) known to ``get_peft_model`` and ``load_adapter``."""
    peft_type = getattr(config_class, "peft_type", None)
    if not isinstance(peft_type, str) or not peft_type.isupper():
        raise ValueError(f"{config_class.__name__}.peft_type={peft_type!r}: give the config class an upper-case "
                         "class attribute such as peft_type = \"LORA\" (the name written to adapter_config.json).")
    if not callable(inject):
        raise TypeError(f"The injector for {peft_type} must be a function inject(model, configs, in_union).")
    known = METHODS.get(peft_type)
    if known is not None and (known.config_class.__qualname__, known.config_class.__module__) != (
            config_class.__qualname__, config_class.__module__):
        raise ValueError(f"peft_type {peft_type!r} is already registered for {known.config_class.__module__}."
                         f"{known.config_class.__qualname__}; choose another name for {config_class.__name__}.")
    METHODS[peft_type] = method = Method(config_class, inject)  # re-registering (a reloaded module) replaces it
    return method


def method_for(peft_type: str) -> Method:
    """The registered method of that ``peft_type``; the error lists the ones there are."""
    if peft_type not in METHODS:
        raise ValueError(f"peft_type={peft_type!r} is not a method peft_edu knows; registered: {sorted(METHODS)}.")
    return METHODS[peft_type]
