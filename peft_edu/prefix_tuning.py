r"""Prefix tuning (Li & Liang, arXiv 2101.00190) and P-tuning v2 (Liu et al., arXiv 2110.07602).

Every attention layer i of the frozen model attends over n extra, trainable key/value pairs P_i^K, P_i^V
put in front of the keys and values of the real tokens X:

    K_i = [P_i^K ; X W_K],    V_i = [P_i^V ; X W_V],    Q_i = X W_Q   (queries only for the real tokens)

    head_i = softmax(Q_i K_iᵀ / √d_head + M) V_i,   M = mask over n + T columns: the n prefix columns are
                                                    always visible, the T real ones padding (and causal) masked

so each layer's output mixes in a learned, input-independent part (arXiv 2110.04366 reads it as a gated
parallel adapter on attention). Nothing else changes: no virtual token produces a query, a hidden state or
a logit, and the sequence length of the outputs is T.

Parameters. The prefix for all L layers is one tensor P ∈ ℝ^{n × 2·L·d_kv}, per virtual token the
concatenation [K_0, V_0, K_1, V_1, …] with d_kv = heads_kv · d_head (= the hidden size, except with
grouped-query attention, e.g. Llama: num_key_value_heads · head_dim). PEFT's ``prefix_projection``:

* False (PEFT's default): P is itself the trainable table, ``Embedding(n, 2·L·d_kv)``; n·2·L·d_kv parameters.
* True, the paper's re-parameterisation (§4.3: optimising P directly was unstable):
  P = MLP(E) = W₂ tanh(W₁ E + b₁) + b₂ with E ∈ ℝ^{n×d_kv}, W₁ ∈ ℝ^{h×d_kv}, W₂ ∈ ℝ^{2·L·d_kv × h}
  (h = ``encoder_hidden_size``). Only P is needed after training: the adapter file stores P, the MLP's
  *output* (PEFT's single ``prompt_embeddings`` key), from which E, W₁, W₂ cannot be recovered.
  Loading such a file builds the plain table (PEFT does the same: its ``from_pretrained`` loads prompt-
  learning adapters in inference mode, where the encoder is ``Embedding(n, 2·L·d_kv)``, and refuses
  ``is_trainable=True``); training on from there is prefix tuning without the MLP.
  ``PrefixEncoder.load_prompt_embeddings`` refuses to load P into an encoder that has the MLP.

``init_weights="zero"`` zeroes the table (or the MLP's last layer). Note this is *not* a no-op, although
PEFT's docstring says so: zero keys still score 0, so after the softmax the virtual tokens take a share
exp(0)/Z of the attention and, with zero values, scale the real tokens' contribution down.

How the prefix gets into the model (``virtual_tokens.py``): as transformers' key/value cache. A forward
pre-hook on the backbone (``model.base_model``: ``BertModel``, ``LlamaModel``) passes
``past_key_values = DynamicCache`` holding layer i's P_i^K, P_i^V (shape (batch, heads_kv, n, d_head)).
That is the mechanism transformers itself uses for "keys and values of tokens that came before", so every
attention layer, with every attention implementation, concatenates [cache ; new] itself; the model builds
the mask over n + T columns from the 2-D mask we extend with n ones; and positions continue after the
cache: Llama's ``cache_position`` and default ``position_ids`` start at n (RoPE is applied to the real
tokens' queries and keys only; the prefix keys are used as they are), BERT's position embeddings start at
n (its ``past_key_values_length``). Given ``position_ids`` and ``cache_position`` are shifted by n, as PEFT
shifts them, so ``generate()`` (which derives them from the left-padded mask) stays padding-aware. In
transformers 4.57 the cache must be a ``Cache`` object; ``DynamicCache`` grows as ``generate()`` appends the
real tokens, and an empty one passed by ``generate()`` is filled in place on its first step. (PEFT issue
#2821: prefix tuning broke when transformers changed its cache API; ``test_prompt_methods.py`` checks that
the attention really sees n + T keys and that the prefix changes ``generate()``.) Gradient checkpointing, under
which transformers' layers drop the cache (PEFT refuses it), gets each layer its own prefix: see checkpointing.py.

In a ``ConfigUnion`` (AdapterHub's way of combining methods, e.g. ``MAMConfig``: a prefix plus parallel adapters)
the prefix is placed as AdapterHub places it, which differs in one respect: the real tokens keep the positions
0, 1, ... they have without a prefix (``PrefixEncoder(shift_positions=False)`` passes ``position_ids`` counting
only the real tokens). BERT then adds the same position embeddings as without the prefix, and Llama rotates
queries and keys by the same angles; PEFT's numbering, starting at n, changes both, so the same P gives other
outputs (``tests/test_bottleneck.py`` shows it). Neither is wrong: a prefix has no position of its own, and
each library trains and evaluates with its own convention.

P-tuning v2 is this method: "deep prompt tuning", prompts at every layer (unlike prompt tuning's input-only
prompt), applied to encoders such as BERT for classification with the usual linear head on [CLS] and, by
default, without the re-parameterisation. Use ``PrefixTuningConfig(task_type="SEQ_CLS", ...)`` (PEFT has no
separate type for it either). PEFT's ``P_TUNING`` is P-tuning *v1* (arXiv 2103.10385: input-level virtual
tokens produced by an LSTM/MLP prompt encoder), which peft_edu does not implement.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from .checkpointing import checkpointable_layers, layer_index
from .registry import register_method
from .virtual_tokens import (
    BasePromptEncoder,
    PromptLearningConfig,
    batch_size_of,
    cache_is_empty,
    drop_with_warning,
    extend_attention_mask,
    resolve_config,
)


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

    def check_union_member(self, union) -> None:
        """A union (AdapterHub's mix-and-match) takes one prefix, with the union's task_type (see ``ConfigUnion``)."""
        if self.task_type != union.task_type or self.modules_to_save is not None:
            raise ValueError(
                f"The PrefixTuningConfig member has task_type={self.task_type!r}, the ConfigUnion "
                f"task_type={union.task_type!r}: give both the same task_type (modules_to_save to the union "
                "only). MAMConfig(task_type=...) does this for you.")
        if sum(isinstance(c, PrefixTuningConfig) for c in union.configs) > 1:
            raise ValueError("ConfigUnion takes at most one PrefixTuningConfig (every attention layer gets one prefix).")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection={self.prefix_projection!r}: must be True or False.")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights={self.init_weights!r}: None (random) or 'zero', as in PEFT.")
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h <= 0):
            raise ValueError(f"encoder_hidden_size={h!r}: a positive integer, or None for token_dim.")


class PrefixEncoder(BasePromptEncoder):
    """The trainable prefix: ``forward()`` gives P, shape (n, 2·L·d_kv) (PEFT's ``PrefixEncoder``, same parameter names)."""

    def __init__(self, config: PrefixTuningConfig, shift_positions: bool = True):
        super().__init__(config)
        self.shift_positions = shift_positions  # PEFT: True; AdapterHub (a member of a ConfigUnion): False
        n, d, num_layers = config.num_virtual_tokens, config.token_dim, config.num_layers
        self.num_layers, self.num_heads, self.head_dim = num_layers, config.num_attention_heads, d // config.num_attention_heads
        # PEFT builds the MLP only for training; in inference mode (a loaded adapter) P is a plain table.
        self.prefix_projection = config.prefix_projection and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(n, d)
            self.transform = nn.Sequential(nn.Linear(d, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, num_layers * 2 * d))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, num_layers * 2 * d)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        table = self.embedding.weight  # = embedding(arange(n))
        return self.transform(table) if self.prefix_projection else table

    def prompt_embeddings(self) -> torch.Tensor:
        return self().detach() if self.prefix_projection else self.embedding.weight  # the table itself: loadable

    def load_prompt_embeddings(self, tensor: torch.Tensor) -> None:
        if self.prefix_projection:
            raise ValueError(
                "Cannot load prompt_embeddings into a prefix encoder with prefix_projection=True: the file holds the "
                "MLP's output P, and the MLP's input and weights cannot be recovered from it. Load the adapter with "
                "peft_edu.load_adapter, which (like PEFT's from_pretrained) builds P as a plain table.")
        super().load_prompt_embeddings(tensor)

    def key_values(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value), each (batch, heads_kv, n, d_head): PEFT's view/permute of P."""
        n = self.num_virtual_tokens
        prefix = self().to(dtype).view(1, n, 2 * self.num_layers, self.num_heads, self.head_dim)
        prefix = prefix.permute(2, 0, 3, 1, 4).expand(-1, batch_size, -1, -1, -1)  # (2L, batch, heads, n, d_head)
        return [(prefix[2 * i], prefix[2 * i + 1]) for i in range(self.num_layers)]

    def number_positions(self, kwargs: dict, n: int) -> None:
        """Where the real tokens' positions start: PEFT's convention, after the prefix, at n (the model numbers
        them itself from the cache length when no position_ids are given)."""
        if self.shift_positions:
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + n
        elif kwargs.get("position_ids") is None:  # AdapterHub's: at 0, as without a prefix
            seen = kwargs["past_key_values"].get_seq_length() - n  # real tokens already cached (generate's later steps)
            tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
            kwargs["position_ids"] = torch.arange(seen, seen + tokens.shape[1], device=tokens.device).unsqueeze(0)

    def hook_target(self, model: nn.Module) -> nn.Module:
        return model.base_model  # BertModel / LlamaModel: the module whose forward takes past_key_values

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        for layer in checkpointable_layers(self.hook_target(model)):  # see checkpointing.py
            layer.register_forward_pre_hook(self._prefix_for_checkpointed_layer, with_kwargs=True)

    def _prefix_for_checkpointed_layer(self, layer: nn.Module, args: tuple, kwargs: dict):
        """Under gradient checkpointing a layer is called with ``past_key_values=None``: give it, inside the
        checkpointed call, a cache holding its own prefix (recomputed whenever the layer is recomputed)."""
        if kwargs.get("past_key_values") is not None or not (layer.gradient_checkpointing and layer.training):
            return None
        hidden_states = args[0] if args else kwargs["hidden_states"]
        index = layer_index(layer)
        key, value = self.key_values(hidden_states.shape[0], hidden_states.dtype)[index]
        cache = DynamicCache()
        cache.update(key, value, index)
        return args, {**kwargs, "past_key_values": cache}

    def rewrite(self, module: nn.Module, kwargs: dict) -> dict:
        n = self.num_virtual_tokens
        batch_size = batch_size_of(kwargs)
        cache = kwargs.get("past_key_values")
        if cache_is_empty(cache):
            if cache is None:
                cache = DynamicCache()
            elif not isinstance(cache, DynamicCache):
                raise TypeError(f"Prefix tuning puts its prefix into a DynamicCache, not a {type(cache).__name__} "
                                "(e.g. generate(cache_implementation='static') is not supported).")
            dtype = module.get_input_embeddings().weight.dtype
            for layer, (key, value) in enumerate(self.key_values(batch_size, dtype)):
                cache.update(key, value, layer)
            kwargs["past_key_values"] = cache
        extend_attention_mask(kwargs, n, batch_size)
        # cache_position indexes the cache, which holds the prefix: the caller's count + n, always.
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = kwargs["cache_position"] + n
        self.number_positions(kwargs, n)
        if self.task_type != "SEQ_CLS":  # PEFT keeps token_type_ids only for SEQ_CLS
            drop_with_warning(kwargs, "token_type_ids", "prefix tuning for " + str(self.task_type))
        return kwargs


def inject_prefix_tuning(model: nn.Module, configs: list[PrefixTuningConfig],
                         in_union: bool = False) -> list[PrefixTuningConfig]:
    """Attach a ``PrefixEncoder`` as ``model.prompt_encoder`` and hook the backbone (see the module docstring).

    Alone, the prefix is placed as PEFT places it; in a ConfigUnion as AdapterHub places it (positions not
    shifted). Returns the config with the model's dimensions filled in.
    """
    (config,) = configs  # a union takes one prefix (PrefixTuningConfig.check_union_member)
    resolved = resolve_config(model, config, key_value_dims=True)
    backbone = model.base_model
    if "past_key_values" not in inspect.signature(backbone.forward).parameters:
        raise TypeError(f"{type(backbone).__name__}.forward takes no past_key_values, which carry the prefix.")
    encoder = PrefixEncoder(resolved, shift_positions=not in_union).to(model.get_input_embeddings().weight.device)
    encoder.attach(model)
    return [resolved]


register_method(PrefixTuningConfig, inject_prefix_tuning)
