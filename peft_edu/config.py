"""Configuration objects, named and shaped like Hugging Face PEFT's: the shared fields and the file format.

Each method's own config class lives in that method's module (``LoraConfig`` in ``lora.py``, ...), subclasses
``PeftConfig`` and is registered with its injector (``registry.py``). A reader who learns
``peft_edu.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])`` can type the same line
with ``peft.LoraConfig`` and get the same model. The configs are plain dataclasses that check their
values on creation, so a typo fails at the line that made it, with a message naming the field, the
value and what would be valid.

They also read and write ``adapter_config.json`` in PEFT's format (``to_peft_dict`` /
``config_from_peft_dict``), which is what lets adapter files travel between the two libraries.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .registry import METHODS

# PEFT's task types that this course uses. SEQ_CLS also trains the classification head.
TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "FEATURE_EXTRACTION", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM")

# Names PEFT gives the classification head of a SEQ_CLS model (BERT-style and Llama-style).
CLASSIFIER_HEAD_NAMES = ("classifier", "score")


def require_bools(config, *names: str) -> None:
    """Each named field must be True or False (``use_dora="False"`` is a non-empty string, hence true)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: must be True or False" +
                             (" (a string is not a boolean)." if isinstance(value, str) else "."))


def require_finite(name: str, value, *, positive: bool = False) -> None:
    """A real number (not a bool), finite, and > 0 if ``positive``: NaN and inf would reach every weight."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and value <= 0):
        raise ValueError(f"{name}={value!r}: must be a finite{' positive' if positive else ''} number.")


@dataclass
class PeftConfig:
    """Fields every method shares.

    target_modules: which layers to adapt. A list of names matches a module whose full name equals
        an entry or ends with ``"." + entry``; a single string is a regular expression that must
        match the whole module name (PEFT's rules). Every list entry must match at least one module.
    modules_to_save: modules trained in full next to the adapter (e.g. a new classification head);
        ``task_type="SEQ_CLS"`` adds the head automatically, as PEFT does.
    """

    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    peft_type = None  # set by each method's subclass, e.g. "LORA"
    is_prompt_learning = False  # True for the virtual-token methods (PEFT's property of the same name)

    def __post_init__(self):
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type={self.task_type!r} is not one of PEFT's task types {TASK_TYPES} (or None).")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"target_modules={self.target_modules!r}: give a non-empty list of module names "
                    '(e.g. ["query", "value"]) or one regular expression string.'
                )
        elif isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as error:
                raise ValueError(f"target_modules={self.target_modules!r} is a string, so it is read as a regular "
                                 f"expression, and it is not a valid one ({error}). Give a list of names such as "
                                 '["query", "value"], or a valid regex such as r".*\\.(query|value)".') from None
        elif self.target_modules is not None:
            raise TypeError(f"target_modules must be a list of names or a regex string, not {type(self.target_modules).__name__}.")
        if isinstance(self.modules_to_save, str):
            raise ValueError(f"modules_to_save={self.modules_to_save!r}: give a list of module names, e.g. "
                             f"[{self.modules_to_save!r}] (a string would be read letter by letter).")
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple, set)) or not all(
                    isinstance(m, str) and m for m in self.modules_to_save):
                raise ValueError(f"modules_to_save={self.modules_to_save!r}: a list of module names, e.g. ['classifier'].")
            self.modules_to_save = list(self.modules_to_save)
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise ValueError(f"base_model_name_or_path={self.base_model_name_or_path!r}: a model name or path (a "
                             "string), or None.")
        if not isinstance(self.inference_mode, bool):
            raise ValueError(f"inference_mode={self.inference_mode!r}: must be True or False.")

    def revalidated(self) -> "PeftConfig":
        """A fresh copy, checked again: a config edited after it was made (``config.r = -1``) fails here."""
        return dataclasses.replace(self)

    # --- adapter_config.json -------------------------------------------------------------------
    def to_peft_dict(self) -> dict:
        """The fields PEFT's config class of the same method accepts, plus ``peft_type``."""
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])
        d["peft_type"] = self.peft_type
        return d

    def settings_summary(self) -> str:
        """The settings that decide the adapter's shapes, for error messages (e.g. ``r=8``)."""
        return type(self).__name__

    def as_loaded(self) -> "PeftConfig":
        """The config as ``load_adapter`` builds the model from it (prompt learning: inference mode, as PEFT)."""
        return self

    def check_union_member(self, union: "ConfigUnion") -> None:
        """Raise unless this config may be a member of ``union`` (methods that combine override it)."""
        raise TypeError(f"ConfigUnion combines bottleneck configs (BnConfig and its presets) and one "
                        f"PrefixTuningConfig, not {type(self).__name__}.")

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "adapter_config.json"
        path.write_text(json.dumps(self.to_peft_dict(), indent=2, sort_keys=True) + "\n")


@dataclass(init=False)
class ConfigUnion(PeftConfig):
    """Several adapter configs in one model, AdapterHub's ``ConfigUnion(config_a, config_b, ...)``.

    Members are bottleneck configs and at most one ``PrefixTuningConfig``:

    * "mixed" adapters, a different kind or size per layer, e.g.
      ``ConfigUnion(DoubleSeqBnConfig(leave_out=[4, 5]), ParBnConfig(leave_out=[0, 1, 2, 3]))``; each (layer,
      location) may get a bottleneck adapter from one member only;
    * He et al.'s mix-and-match (arXiv 2110.04366), prefix tuning at the attention plus a parallel adapter at the
      FFN: ``peft_edu.MAMConfig``, AdapterHub's ``ConfigUnion(PrefixTuningConfig(...), ParBnConfig())``.

    A union is AdapterHub's way of combining methods, and its members are placed as AdapterHub places them. For
    the prefix that means one difference from a ``PrefixTuningConfig`` used alone (which follows PEFT): the real
    tokens keep the positions 0, 1, ... they have without a prefix, where PEFT numbers them after the n virtual
    tokens (see ``peft_edu.prefix_tuning``).
    task_type and modules_to_save belong to the union; a prefix member, which needs a task_type of its own (it
    decides what happens to token_type_ids), must repeat the union's.
    """

    configs: list = field(default_factory=list)

    peft_type = "UNION"

    def __init__(self, *configs: PeftConfig, **fields):
        members = list(fields.pop("configs", None) or configs)
        self.configs = [config_from_peft_dict(c) if isinstance(c, dict) else c for c in members]
        super().__init__(**fields)

    def __post_init__(self):
        super().__post_init__()
        if not self.configs:
            raise ValueError("ConfigUnion() needs at least one config, e.g. ConfigUnion(SeqBnConfig(), ParBnConfig()).")
        for c in self.configs:
            if not isinstance(c, PeftConfig):
                raise TypeError(f"ConfigUnion members are peft_edu configs, not {type(c).__name__}.")
            c.check_union_member(self)  # each method says whether (and how) it combines
        if self.target_modules is not None:
            raise ValueError("ConfigUnion(target_modules=...): each member says where it goes; leave it None.")

    def to_peft_dict(self) -> dict:
        d = super().to_peft_dict()
        d["configs"] = [c.to_peft_dict() for c in self.configs]
        return d

    def revalidated(self) -> "ConfigUnion":
        return dataclasses.replace(self, configs=[c.revalidated() for c in self.configs])

    def settings_summary(self) -> str:
        return "; ".join(f"{type(c).__name__}: {c.settings_summary()}" for c in self.configs)

    def as_loaded(self) -> "ConfigUnion":
        return dataclasses.replace(self, configs=[c.as_loaded() for c in self.configs])



def config_class(peft_type) -> type[PeftConfig]:
    """The config class of a ``peft_type``: a registered method's, or ``ConfigUnion`` for ``"UNION"``."""
    if peft_type == ConfigUnion.peft_type:
        return ConfigUnion
    if peft_type not in METHODS:
        raise ValueError(f"adapter_config.json has peft_type={peft_type!r}; peft_edu can load "
                         f"{sorted([*METHODS, ConfigUnion.peft_type])}.")
    return METHODS[peft_type].config_class


# Keys PEFT writes into adapter_config.json that change nothing once the weights are loaded:
# bookkeeping, and settings of options that are off.
_PEFT_INERT_KEYS = {"peft_type", "peft_version", "revision", "auto_mapping", "megatron_core", "qalora_group_size"}

def config_from_peft_dict(d: dict, source: str = "adapter_config.json") -> PeftConfig:
    """Build our config from the contents of a PEFT ``adapter_config.json``.

    PEFT's file lists every option it has. An option we do not implement is accepted only at its
    off value (None, False, {} or []); anything else is an error, never silently dropped.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{source} holds a JSON {type(d).__name__}, not an object with a peft_type: is it an "
                         "adapter config saved by PEFT or peft_edu?")
    peft_type = d.get("peft_type")
    cls = config_class(peft_type)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs, unsupported = {}, []
    for key, value in d.items():
        if key in known:
            kwargs[key] = value
        elif key not in _PEFT_INERT_KEYS and value not in (None, False, {}, []):
            unsupported.append(f"{key}={value!r}")
    if unsupported:
        raise ValueError(
            f"{source} sets options peft_edu does not implement: {', '.join(unsupported)}. "
            f"Supported fields for {peft_type}: {sorted(known)}."
        )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{source}: {error}") from error


def load_config(directory: str | Path) -> PeftConfig:
    path = Path(directory) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {directory} an adapter saved by PEFT or peft_edu?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the file is damaged or not an adapter config; "
                         "save the adapter again.") from None
    return config_from_peft_dict(data, source=str(path))
