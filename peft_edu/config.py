"""Configuration objects, named and shaped like Hugging Face PEFT's.

A reader who learns ``peft_edu.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])``
can type the same line with ``peft.LoraConfig`` and get the same model. The configs are plain
dataclasses that check their values on creation, so a typo fails at the line that made it, with
a message naming the field, the value and what would be valid.

They also read and write ``adapter_config.json`` in PEFT's format (``to_peft_dict`` /
``config_from_peft_dict``), which is what lets adapter files travel between the two libraries.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# PEFT's task types that this course uses. SEQ_CLS also trains the classification head.
TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "FEATURE_EXTRACTION", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM")

# Names PEFT gives the classification head of a SEQ_CLS model (BERT-style and Llama-style).
CLASSIFIER_HEAD_NAMES = ("classifier", "score")


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
        elif self.target_modules is not None and not isinstance(self.target_modules, str):
            raise TypeError(f"target_modules must be a list of names or a regex string, not {type(self.target_modules).__name__}.")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    # --- adapter_config.json -------------------------------------------------------------------
    def to_peft_dict(self) -> dict:
        """The fields PEFT's config class of the same method accepts, plus ``peft_type``."""
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])
        d["peft_type"] = self.peft_type
        return d

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "adapter_config.json"
        path.write_text(json.dumps(self.to_peft_dict(), indent=2, sort_keys=True) + "\n")


@dataclass
class LoraConfig(PeftConfig):
    """LoRA (arXiv 2106.09685): W x + (lora_alpha / r) · B A x, with W frozen.

    r: the rank of the update BA (a positive integer).
    lora_alpha: the numerator of the scaling; ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)``
        with ``use_rslora=True``, arXiv 2312.03732) multiplies BA.
    lora_dropout: dropout applied to x on the LoRA path only, in [0, 1).
    use_dora: weight-decomposed LoRA (arXiv 2402.09353), see ``peft_edu.dora``.
    bias: only "none" (biases stay frozen), PEFT's default.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"

    peft_type = "LORA"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r}: the LoRA rank must be a positive integer (e.g. 4, 8 or 16).")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r}: must be a positive number (PEFT's default is 8).")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r}: must be a probability in [0, 1); 0 turns dropout off.")
        if self.bias != "none":
            raise ValueError(f"bias={self.bias!r}: peft_edu implements only bias='none' (biases stay frozen).")
        if self.target_modules is None:
            raise ValueError(
                'LoraConfig needs target_modules, e.g. ["query", "value"] for BERT or ["q_proj", "v_proj"] for Llama.'
            )


@dataclass
class IA3Config(PeftConfig):
    """(IA)³ (arXiv 2205.05638): vectors, initialised to ones, rescale activations; see ``peft_edu.ia3``.

    target_modules: the nn.Linear layers that get a vector. None takes PEFT's defaults for the model's
        ``config.model_type`` (BERT: key, value, output.dense; Llama: k_proj, v_proj, down_proj).
    feedforward_modules: the targets whose *input* is scaled, h = W (l ⊙ x) + b; the other targets
        scale their output, h = l ⊙ (W x + b). A list must be a subset of target_modules (PEFT's
        rule) and an entry selects each targeted module whose name ends with it; a string is a
        regex matched against the whole name. None takes PEFT's defaults for the model type; []: none.
    init_ia3_weights: True starts from ones (the base model exactly); False keeps N(0, 1) as PEFT does.
    fan_in_fan_out: only False (nn.Linear); PEFT uses True for GPT-2's Conv1D, which peft_edu does not adapt.
    """

    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    peft_type = "IA3"

    def __post_init__(self):
        super().__post_init__()
        ff = self.feedforward_modules
        if isinstance(ff, (list, tuple, set)):
            self.feedforward_modules = ff = list(ff)
            if not all(isinstance(f, str) and f for f in ff):
                raise ValueError(f"feedforward_modules={ff!r}: give a list of module names "
                                 '(e.g. ["output.dense"] or ["down_proj"]), [] for none, or one regular expression.')
        elif ff is not None and not isinstance(ff, str):
            raise TypeError(f"feedforward_modules must be a list of names or a regex string, not {type(ff).__name__}.")
        if self.fan_in_fan_out is not False:
            raise ValueError(f"fan_in_fan_out={self.fan_in_fan_out!r}: only False (nn.Linear stores W as (out, in)); "
                             "True is for GPT-2-style Conv1D layers, which peft_edu does not adapt.")
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"init_ia3_weights={self.init_ia3_weights!r}: must be True (ones) or False (random).")
        # PEFT's rule, checked when both are lists: a feed-forward module must also be a target.
        if isinstance(ff, list) and isinstance(self.target_modules, list):
            extra = [f for f in ff if f not in self.target_modules]
            if extra:
                raise ValueError(
                    f"feedforward_modules entries {extra} are not in target_modules {self.target_modules}: "
                    f"feedforward_modules must be a subset of target_modules (PEFT's rule); add {extra} to target_modules."
                )

    def to_peft_dict(self) -> dict:
        d = super().to_peft_dict()
        if isinstance(d["feedforward_modules"], list):
            d["feedforward_modules"] = sorted(d["feedforward_modules"])
        return d


CONFIG_CLASSES: dict[str, type[PeftConfig]] = {"LORA": LoraConfig, "IA3": IA3Config}

# Keys PEFT writes into adapter_config.json that change nothing once the weights are loaded:
# bookkeeping, how fresh weights would be initialised, and settings of options that are off.
_PEFT_INERT_KEYS = {
    "peft_type", "peft_version", "revision", "auto_mapping", "init_lora_weights", "megatron_core", "qalora_group_size",
}


def config_from_peft_dict(d: dict) -> PeftConfig:
    """Build our config from the contents of a PEFT ``adapter_config.json``.

    PEFT's file lists every option it has. An option we do not implement is accepted only at its
    off value (None, False, {} or []); anything else is an error, never silently dropped.
    """
    peft_type = d.get("peft_type")
    if peft_type not in CONFIG_CLASSES:
        raise ValueError(
            f"adapter_config.json has peft_type={peft_type!r}; peft_edu can load {sorted(CONFIG_CLASSES)}."
        )
    cls = CONFIG_CLASSES[peft_type]
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs, unsupported = {}, []
    for key, value in d.items():
        if key in known:
            kwargs[key] = value
        elif key not in _PEFT_INERT_KEYS and value not in (None, False, {}, []):
            unsupported.append(f"{key}={value!r}")
    if unsupported:
        raise ValueError(
            f"adapter_config.json sets options peft_edu does not implement: {', '.join(unsupported)}. "
            f"Supported fields for {peft_type}: {sorted(known)}."
        )
    return cls(**kwargs)


def load_config(directory: str | Path) -> PeftConfig:
    path = Path(directory) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {directory} an adapter saved by PEFT or peft_edu?")
    return config_from_peft_dict(json.loads(path.read_text()))
