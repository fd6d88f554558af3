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


# --- bottleneck adapters (AdapterHub's configs) ----------------------------------------------------
_BN_INITS = ("bert", "mam_adapter", "houlsby")


@dataclass(kw_only=True)
class BnConfig(PeftConfig):
    """Bottleneck adapters, AdapterHub's ``BnConfig`` with its field names and defaults; see ``peft_edu.bottleneck``.

    Use a preset (``SeqBnConfig``, ``DoubleSeqBnConfig``, ``ParBnConfig``) or give the four required fields.

    mh_adapter / output_adapter: add an adapter at the attention sublayer's output / the FFN's output.
    reduction_factor: the bottleneck has ``int(hidden_size // reduction_factor)`` units (at least 1). A dict gives
        per-layer sizes, AdapterHub's ``{"0": 8, "default": 16}`` (int keys are turned into strings).
    non_linearity: the activation between the projections (a name transformers knows: "relu", "swish", "gelu"...).
    original_ln_before: Pfeiffer's placement: the adapter reads LayerNorm(h + x), the sublayer's output after the
        residual (and, in post-norm models, after the pretrained LayerNorm) instead of h.
    original_ln_after: after the adapter, add x and apply the pretrained LayerNorm (post-norm) as the layer did
        without an adapter; False leaves both out (pre-norm models: not implemented, it would drop x altogether).
    residual_before_ln: what the serial adapter's own skip connection carries: True h, False the adapter's input
        (LayerNorm(h + x) with original_ln_before), "post_add" h + x (needs original_ln_before, post-norm only).
    ln_before / ln_after: a new trainable LayerNorm on the adapter's input / on its output.
    adapter_residual_before_ln: with ln_after, add the skip connection before that LayerNorm instead of after.
    is_parallel: the adapter reads the sublayer's input x and its output is added next to the sublayer's (He et al.).
    scaling: a number s that multiplies the adapter's output (He et al. use 4.0).
    init_weights: "bert" (both projections ~ N(0, 0.02²), biases 0), "houlsby" (both ~ N(0, 0.01²) truncated at
        ±0.02, biases 0) or "mam_adapter" (down projection kaiming-uniform, up projection 0: the adapter starts as
        the identity). init_weights_seed: reseed before each adapter module's init, as AdapterHub does (0 or None:
        no reseeding).
    leave_out: layer indices (from 0) that get no adapter. dropout: on the adapter's output.
    target_modules must stay None: the placement comes from mh_adapter / output_adapter.
    """

    mh_adapter: bool
    output_adapter: bool
    reduction_factor: float | dict
    non_linearity: str
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    is_parallel: bool = False
    scaling: float = 1.0
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    leave_out: list = field(default_factory=list)
    dropout: float = 0.0

    peft_type = "BOTTLENECK"

    def __post_init__(self):
        super().__post_init__()
        if self.target_modules is not None:
            raise ValueError(f"target_modules={self.target_modules!r}: bottleneck adapters are placed by mh_adapter "
                             "(after attention) and output_adapter (after the FFN), not by target_modules; leave it None.")
        for name in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before", "ln_after",
                     "adapter_residual_before_ln", "is_parallel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be True or False.")
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError("mh_adapter=False and output_adapter=False: this config adds no adapter anywhere.")
        if self.residual_before_ln not in (True, False, "post_add") or not isinstance(self.residual_before_ln, (bool, str)):
            raise ValueError(f"residual_before_ln={self.residual_before_ln!r}: True, False or 'post_add'.")
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise ValueError("residual_before_ln='post_add' takes h + x, which only exists with original_ln_before=True "
                             "(AdapterHub fails on this combination too).")
        rf = self.reduction_factor
        if isinstance(rf, dict):
            self.reduction_factor = rf = {str(k): v for k, v in rf.items()}
            bad = [k for k in rf if k != "default" and not k.isdigit()]
            if bad or not rf:
                raise ValueError(f"reduction_factor={rf!r}: the keys of a per-layer mapping are layer indices and "
                                 "'default', e.g. {'0': 8, 'default': 16}.")
            values = list(rf.values())
        else:
            values = [rf]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in values):
            raise ValueError(f"reduction_factor={rf!r}: must be a positive number (hidden_size // reduction_factor "
                             "units) or a mapping from layer index / 'default' to positive numbers.")
        if not isinstance(self.non_linearity, str):
            raise ValueError(f"non_linearity={self.non_linearity!r}: give an activation name such as 'relu' or 'swish'.")
        from transformers.activations import ACT2FN  # transformers' names, as AdapterHub uses them

        if self.non_linearity.lower() not in ACT2FN and self.non_linearity.lower() != "leakyrelu":
            raise ValueError(f"non_linearity={self.non_linearity!r} is not an activation transformers knows "
                             f"(e.g. {sorted(ACT2FN)[:12]}...).")
        if self.init_weights not in _BN_INITS:
            raise ValueError(f"init_weights={self.init_weights!r}: one of {_BN_INITS}, as in AdapterHub.")
        if self.init_weights_seed is not None and (isinstance(self.init_weights_seed, bool)
                                                   or not isinstance(self.init_weights_seed, int)):
            raise ValueError(f"init_weights_seed={self.init_weights_seed!r}: an integer or None.")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"scaling={self.scaling!r}: peft_edu implements a fixed number only (AdapterHub's "
                             "'learned' and 'channel' scalings are not implemented).")
        self.scaling = float(self.scaling)
        if not isinstance(self.leave_out, (list, tuple, set)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.leave_out):
            raise ValueError(f"leave_out={self.leave_out!r}: a list of layer indices (integers from 0).")
        self.leave_out = sorted(self.leave_out)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r}: a probability in [0, 1).")


@dataclass(kw_only=True)
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (arXiv 2005.00247): one serial adapter after the FFN; it reads LayerNorm(h + x). ReLU, m = d/16."""

    original_ln_before: bool = True
    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | dict = 16


@dataclass(kw_only=True)
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (arXiv 1902.00751): serial adapters after the attention and after the FFN. Swish, m = d/16."""

    mh_adapter: bool = True
    output_adapter: bool = True
    non_linearity: str = "swish"
    reduction_factor: float | dict = 16


@dataclass(kw_only=True)
class ParBnConfig(BnConfig):
    """He et al. (arXiv 2110.04366): a parallel adapter next to the FFN, scaled by 4, starting as the identity."""

    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | dict = 2
    init_weights: str = "mam_adapter"
    is_parallel: bool = True
    scaling: float = 4.0


@dataclass(init=False)
class ConfigUnion(PeftConfig):
    """Several adapter configs in one model, AdapterHub's ``ConfigUnion(config_a, config_b, ...)``.

    Members are bottleneck configs and at most one ``PrefixTuningConfig``:

    * "mixed" adapters, a different kind or size per layer, e.g.
      ``ConfigUnion(DoubleSeqBnConfig(leave_out=[4, 5]), ParBnConfig(leave_out=[0, 1, 2, 3]))``; each (layer,
      location) may get a bottleneck adapter from one member only;
    * He et al.'s mix-and-match (arXiv 2110.04366), prefix tuning at the attention plus a parallel adapter at the
      FFN: ``MAMConfig`` below, AdapterHub's ``ConfigUnion(PrefixTuningConfig(...), ParBnConfig())``.

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
            if isinstance(c, PrefixTuningConfig):
                if c.task_type != self.task_type or c.modules_to_save is not None:
                    raise ValueError(
                        f"The PrefixTuningConfig member has task_type={c.task_type!r}, the ConfigUnion "
                        f"task_type={self.task_type!r}: give both the same task_type (modules_to_save to the union "
                        "only). MAMConfig(task_type=...) does this for you.")
            elif not isinstance(c, BnConfig):
                raise TypeError(f"ConfigUnion combines bottleneck configs (BnConfig and its presets) and one "
                                f"PrefixTuningConfig, not {type(c).__name__}.")
            elif c.task_type is not None or c.modules_to_save is not None:
                raise ValueError("Give task_type and modules_to_save to the ConfigUnion, not to its members.")
        if sum(isinstance(c, PrefixTuningConfig) for c in self.configs) > 1:
            raise ValueError("ConfigUnion takes at most one PrefixTuningConfig (every attention layer gets one prefix).")
        if self.target_modules is not None:
            raise ValueError("ConfigUnion(target_modules=...): each member says where it goes; leave it None.")

    def to_peft_dict(self) -> dict:
        d = super().to_peft_dict()
        d["configs"] = [c.to_peft_dict() for c in self.configs]
        return d


def MAMConfig(prefix_tuning: PrefixTuningConfig | None = None, adapter: BnConfig | None = None,
              task_type: str | None = None, **fields) -> ConfigUnion:
    """Mix-and-match adapters (He et al., arXiv 2110.04366) as AdapterHub's ``MAMConfig`` builds them: the ConfigUnion
    of prefix tuning in every attention layer and a parallel adapter next to every FFN.

    prefix_tuning: default ``PrefixTuningConfig(num_virtual_tokens=30, prefix_projection=True,
        encoder_hidden_size=800, task_type=task_type)``, AdapterHub's default (30 virtual tokens, re-parameterised by
        an MLP of width 800).
    adapter: default ``ParBnConfig()`` (bottleneck d/2, scaled by 4, starting as the identity).
    task_type: required (the prefix needs one); modules_to_save and the other fields go to the union.
    (A function, not a class as in AdapterHub: what it returns is an ordinary ConfigUnion, saved and loaded as one.)
    """
    if task_type is None:
        raise ValueError(f"MAMConfig needs a task_type, one of {PromptLearningConfig.PROMPT_TASK_TYPES}: "
                         "its prefix decides by it what happens to token_type_ids.")
    if prefix_tuning is None:
        prefix_tuning = PrefixTuningConfig(num_virtual_tokens=30, prefix_projection=True, encoder_hidden_size=800,
                                           task_type=task_type)
    adapter = ParBnConfig() if adapter is None else adapter
    if not isinstance(prefix_tuning, PrefixTuningConfig) or not isinstance(adapter, BnConfig):
        raise TypeError(f"MAMConfig(prefix_tuning=PrefixTuningConfig(...), adapter=ParBnConfig(...)), not "
                        f"prefix_tuning={type(prefix_tuning).__name__}, adapter={type(adapter).__name__}.")
    return ConfigUnion(prefix_tuning, adapter, task_type=task_type, **fields)


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the virtual-token methods (PEFT's ``PromptLearningConfig``); see ``peft_edu.virtual_tokens``.

    num_virtual_tokens: n, the number of virtual tokens (prompt tuning) or of key/value pairs per layer (prefix tuning).
    task_type: "CAUSAL_LM", "SEQ_CLS" or "FEATURE_EXTRACTION" (required: it decides, as PEFT's
        ``PeftModelFor<Task>`` does, how labels and token_type_ids are extended).
    token_dim, num_layers, num_attention_heads, num_transformer_submodules: None takes them from the model, as PEFT
        does (they are written to adapter_config.json); given values must fit the model.
    target_modules: not used; must stay None.
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    is_prompt_learning = True
    PROMPT_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")

    def __post_init__(self):
        super().__post_init__()
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"num_virtual_tokens={n!r}: the number of virtual tokens must be a positive integer (e.g. 20).")
        if self.task_type not in self.PROMPT_TASK_TYPES:
            raise ValueError(f"task_type={self.task_type!r}: {type(self).__name__} needs one of {self.PROMPT_TASK_TYPES} "
                             "(it decides how labels and token_type_ids are extended).")
        if self.target_modules is not None:
            raise ValueError(f"target_modules={self.target_modules!r}: {type(self).__name__} adds virtual tokens in front "
                             "of the input and adapts no layer; leave target_modules None.")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}={value!r}: a positive integer, or None to take it from the model.")
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(f"num_transformer_submodules={self.num_transformer_submodules!r}: peft_edu supports "
                             "decoder-only and encoder-only models (1); encoder-decoder models (2) are not implemented.")

    def to_peft_dict(self) -> dict:
        d = super().to_peft_dict()
        del d["target_modules"]  # PEFT's prompt-learning configs have no such field
        return d


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning (arXiv 2101.00190); with task_type="SEQ_CLS" on an encoder also P-tuning v2 (arXiv 2110.07602).

    See ``peft_edu.prefix_tuning``. Every attention layer gets n trainable keys and values in front of the real ones.
    prefix_projection: False: the prefix is a trainable table of shape (n, 2·num_layers·token_dim); True: it is the
        output of Embedding(n, token_dim) → Linear(token_dim, encoder_hidden_size) → Tanh → Linear(.., 2·num_layers·token_dim).
    encoder_hidden_size: that MLP's width (None: token_dim).
    init_weights: None (random, PEFT's default) or "zero" (the table, or the MLP's last layer, starts at 0).
    """

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    peft_type = "PREFIX_TUNING"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection={self.prefix_projection!r}: must be True or False.")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights={self.init_weights!r}: None (random) or 'zero', as in PEFT.")
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h <= 0):
            raise ValueError(f"encoder_hidden_size={h!r}: a positive integer, or None for token_dim.")


PROMPT_TUNING_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning (arXiv 2104.08691): n trainable input embeddings in front of the input; see ``peft_edu.prompt_tuning``.

    prompt_tuning_init: "RANDOM" (N(0, 1), PEFT's default), "SAMPLE_VOCAB" (embeddings of random vocabulary tokens)
        or "TEXT" (embeddings of ``prompt_tuning_init_text``, repeated or cut to n tokens). PEFT's
        ``PromptTuningInit`` members are accepted too.
    tokenizer_name_or_path: for "TEXT": a tokenizer object or a local folder (read offline, ``local_files_only=True``,
        unless tokenizer_kwargs say otherwise). tokenizer_kwargs: passed to ``AutoTokenizer.from_pretrained``.
    """

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: object = None
    tokenizer_kwargs: dict | None = None

    peft_type = "PROMPT_TUNING"

    def __post_init__(self):
        super().__post_init__()
        init = self.prompt_tuning_init
        self.prompt_tuning_init = init = getattr(init, "value", init)  # PEFT's PromptTuningInit is a str enum
        if init not in PROMPT_TUNING_INITS:
            raise ValueError(f"prompt_tuning_init={init!r}: one of {PROMPT_TUNING_INITS}.")
        if init == "TEXT" and not self.tokenizer_name_or_path:
            raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a tokenizer object or a local folder).")
        if init == "TEXT" and not isinstance(self.prompt_tuning_init_text, str):
            raise ValueError(f"prompt_tuning_init='TEXT' needs prompt_tuning_init_text, not {self.prompt_tuning_init_text!r}.")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ValueError("tokenizer_kwargs are used only with prompt_tuning_init='TEXT' (PEFT's rule).")

    def to_peft_dict(self) -> dict:
        tokenizer = self.tokenizer_name_or_path
        if tokenizer is not None and not isinstance(tokenizer, str):  # a tokenizer object: write where it came from
            return dataclasses.replace(self, tokenizer_name_or_path=getattr(tokenizer, "name_or_path", None) or
                                       type(tokenizer).__name__).to_peft_dict()
        return super().to_peft_dict()


CONFIG_CLASSES: dict[str, type[PeftConfig]] = {"LORA": LoraConfig, "IA3": IA3Config, "BOTTLENECK": BnConfig,
                                             "UNION": ConfigUnion, "PREFIX_TUNING": PrefixTuningConfig,
                                             "PROMPT_TUNING": PromptTuningConfig}

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
