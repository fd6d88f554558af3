r"""How the virtual-token methods (prefix tuning, prompt tuning) get into a model: one forward pre-hook.

LoRA, DoRA and IA³ change what a layer computes, so they wrap layers (``injection.py``). Prefix and
prompt tuning change what the model *attends to*: n virtual tokens sit in front of the real ones. Their
trainable part is a small module, the *prompt encoder*, that computes those tokens; it is attached to the
model as ``model.prompt_encoder`` (so ``model.parameters()`` and the parameter report count it, as PEFT
does), and a forward pre-hook on a model-level ``forward`` rewrites that call's arguments:

* prompt tuning (hook on the model itself, where the labels are):
  ``inputs_embeds ← [P; E(input_ids)]``, ``attention_mask ← [1ⁿ; mask]``, CAUSAL_LM ``labels ← [-100ⁿ; labels]``,
  SEQ_CLS ``token_type_ids ← [0ⁿ; ids]``;
* prefix tuning (hook on the backbone, ``model.base_model``, the module that takes ``past_key_values``):
  ``past_key_values ← DynamicCache(prefix keys and values)``, ``attention_mask ← [1ⁿ; mask]``,
  ``position_ids ← position_ids + n``, ``cache_position ← cache_position + n``.

These are exactly the rewrites PEFT's ``PeftModelFor<Task>.forward`` and ``prepare_inputs_for_generation``
make (``peft/peft_model.py``), done at the one place every call passes through: ``model(**batch)``, HF
``Trainer`` and every step of ``model.generate()`` all call ``forward``, so nothing else needs patching, and
the model's ``forward`` signature (which ``Trainer`` inspects) is unchanged.

Why a model-level hook and not wrapped attention layers or a wrapped input embedding: transformers builds
the attention mask (padding + causal, in the format of the attention implementation: eager, sdpa, flash),
the rotary positions and ``cache_position`` once per forward at model level, from the 2-D mask and the
cache length. Prepending ones to the 2-D mask and handing the prefix over as a cache lets the model build
all of them itself, for every attention implementation, in training and in generation. A wrapped attention
layer would have to re-derive each of these per implementation (with sdpa the mask can even be ``None``
and causality implied); a wrapped input embedding cannot extend the mask or the labels, and BERT adds its
position embeddings inside the embedding module, after the word embeddings.

Conventions of the hook (the caller always speaks about its own tokens only):

* ``attention_mask`` covers the real tokens; n ones are prepended on every call (generate extends the
  caller's mask by one column per step, never with the virtual tokens). Only 2-D masks are accepted.
* A cache that is ``None`` or empty gets the virtual tokens (prefix tuning: the prefix itself; prompt
  tuning: the prompt embeddings go in front of the inputs). A non-empty cache is taken to be one this
  adapted model returned earlier, so it already holds them (generate's decoding steps).

Unloading removes the hook and ``model.prompt_encoder``; nothing of the base model was touched.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .config import PeftConfig
from .injection import AdapterModule

#: The one tensor PEFT's adapter file holds for a prompt-learning method (``utils/save_and_load.py``).
PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"


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

    def settings_summary(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}"

    def as_loaded(self) -> "PromptLearningConfig":
        # PEFT's from_pretrained loads prompt-learning adapters in inference mode: the file holds the prompt
        # encoder's output, so a prefix_projection MLP is built as the plain table of that output.
        return dataclasses.replace(self, inference_mode=True)

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


def named_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """All arguments of a ``module.forward`` call by name (BertForSequenceClassification passes ``input_ids``
    to ``self.bert`` positionally; the hook rewrites arguments by name)."""
    if not args:
        return dict(kwargs)
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    named = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(module).__name__}.forward takes *{name}; pass its inputs by keyword.")
        else:
            named[name] = value
    return named


def batch_size_of(kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    raise ValueError("The model was called without input_ids or inputs_embeds; the virtual tokens need a batch size.")


def cache_is_empty(cache) -> bool:
    """True when the virtual tokens still have to be put in: no cache, or an empty one (generate's first step)."""
    if cache is None:
        return True
    if not hasattr(cache, "get_seq_length"):
        raise TypeError(f"past_key_values of type {type(cache).__name__}: peft_edu's virtual-token methods work with "
                        "transformers Cache objects (DynamicCache); legacy tuples are not supported.")
    return cache.get_seq_length() == 0


def extend_attention_mask(kwargs: dict, n: int, batch_size: int) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None:
        return  # the model then attends to everything, virtual tokens included
    if mask.dim() != 2:
        raise ValueError(f"attention_mask has {mask.dim()} dimensions; the virtual tokens need a 2-D (batch, "
                         "sequence) padding mask, to which they prepend a column of ones each.")
    kwargs["attention_mask"] = torch.cat([mask.new_ones(batch_size, n), mask], dim=1)


def drop_with_warning(kwargs: dict, key: str, why: str) -> None:
    """PEFT's ``_adjust_prompt_learning_kwargs``: some arguments are ignored, with a warning."""
    if kwargs.get(key) is not None:
        warnings.warn(f"{key} is ignored with {why} (as in PEFT).", stacklevel=3)
        kwargs[key] = None


class BasePromptEncoder(AdapterModule):
    """Base class of the modules that compute virtual tokens (PEFT's ``BasePromptEncoder``; PEFT's ``PromptEncoder``
    is P-tuning v1's LSTM/MLP encoder, which peft_edu does not implement).

    ``forward()`` returns the n virtual tokens of one example, shape (n, width); ``hook_target`` names the
    module whose forward gets the pre-hook and ``rewrite`` changes that call's arguments.
    """

    def __init__(self, config: PromptLearningConfig):
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.task_type = config.task_type

    # --- what subclasses define -------------------------------------------------------------------
    def hook_target(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def rewrite(self, module: nn.Module, kwargs: dict) -> dict:
        raise NotImplementedError

    # --- the file's one tensor ---------------------------------------------------------------------
    def prompt_embeddings(self) -> torch.Tensor:
        """What the adapter file stores under ``prompt_embeddings``: the encoder's output for the n tokens."""
        return self()

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {PROMPT_EMBEDDINGS_KEY: self.prompt_embeddings()}  # PEFT's one key, under no module name

    def load_adapter_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.load_prompt_embeddings(tensors[PROMPT_EMBEDDINGS_KEY])

    def remove(self, model: nn.Module, name: str) -> None:
        self.detach(model)

    def put_back(self, model: nn.Module, name: str) -> None:
        self.attach(model)

    def load_prompt_embeddings(self, tensor: torch.Tensor) -> None:
        weight = self.embedding.weight
        if tensor.shape != weight.shape:
            raise ValueError(f"prompt_embeddings of shape {tuple(tensor.shape)} do not fit this prompt encoder, "
                             f"which holds a table of shape {tuple(weight.shape)}.")
        with torch.no_grad():
            weight.copy_(tensor)

    # --- attach / detach -------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        model.prompt_encoder = self
        self.hook_target(model).register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def detach(self, model: nn.Module) -> None:
        """Remove the hook (found by what it is, so this also works on a deepcopy of the model) and the encoder."""
        for module in model.modules():
            for hook_id, hook in list(module._forward_pre_hooks.items()):
                if getattr(hook, "__self__", None) is self:
                    del module._forward_pre_hooks[hook_id]
                    module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        if getattr(model, "prompt_encoder", None) is self:
            del model.prompt_encoder

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        return (), self.rewrite(module, named_arguments(module, args, kwargs))


def model_dims(model: nn.Module) -> dict:
    """num_layers, token_dim and num_attention_heads from the model's config (PEFT's ``_prepare_prompt_learning_config``)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no .config: virtual-token methods need a transformers model.")
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def first(*names):
        for name in names:
            if getattr(config, name, None) is not None:
                return getattr(config, name)
        raise ValueError(f"Cannot tell {names[0]} from {type(config).__name__}; set it in the config.")

    return {"num_layers": first("num_hidden_layers", "num_layers", "n_layer"),
            "token_dim": first("hidden_size", "n_embd", "d_model"),
            "num_attention_heads": first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
            "num_key_value_heads": getattr(config, "num_key_value_heads", None),
            "head_dim": getattr(config, "head_dim", None)}


def resolve_config(model: nn.Module, config: PromptLearningConfig, key_value_dims: bool) -> PromptLearningConfig:
    """A copy of ``config`` with the model's dimensions filled in, as PEFT fills them in.

    ``key_value_dims`` (prefix tuning): token_dim and num_attention_heads describe the keys and values,
    which with grouped-query attention (Llama: num_key_value_heads < num_attention_heads) are narrower
    than the hidden states: token_dim = num_key_value_heads · head_dim (PEFT issue #1901). Values given
    in ``config`` (e.g. read from adapter_config.json) must agree with the model.
    """
    dims = model_dims(model)
    derived = {"num_layers": dims["num_layers"], "token_dim": dims["token_dim"],
               "num_attention_heads": dims["num_attention_heads"]}
    if key_value_dims and dims["num_key_value_heads"] is not None:
        head_dim = dims["head_dim"] or dims["token_dim"] // dims["num_attention_heads"]
        derived["token_dim"] = head_dim * dims["num_key_value_heads"]
        derived["num_attention_heads"] = dims["num_key_value_heads"]
    for name, value in derived.items():
        given = getattr(config, name)
        if given is not None and given != value:
            raise ValueError(f"{type(config).__name__} has {name}={given}, but {type(model).__name__} needs {name}={value}. "
                             "Was the adapter made for another base model? Leave it None to take the model's value.")
    resolved = dataclasses.replace(config, num_transformer_submodules=1, **derived)
    if hasattr(resolved, "encoder_hidden_size") and resolved.encoder_hidden_size is None:  # prefix tuning's MLP width
        resolved = dataclasses.replace(resolved, encoder_hidden_size=resolved.token_dim)
    return resolved
