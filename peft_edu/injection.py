"""How a method gets into a pretrained model: find the target modules, wrap each one.

Every method of the course changes a model in one of three places. The first two are reached the
same way: ``find_targets`` names the modules, ``wrap_targets`` replaces each one by an ``AdapterLayer``
that holds the original module (frozen, as ``base_layer``) and adds the method's few trainable
parameters around it. The third wraps nothing (see ``virtual_tokens.py``).

* replacing a linear layer:        LoRA, DoRA and IA³ wrap ``nn.Linear`` (the weight is untouched), and the layers
                                   that are linear maps in disguise, read as a dense (d_out, d_in) matrix by
                                   ``dense_weight``: GPT-2's ``Conv1D``, embeddings, convolutions
                                   (``lora_layers.py``);
* wrapping a sublayer's output:    bottleneck adapters wrap the attention / FFN output sublayer
                                   (BERT ``attention.output`` / ``output``, Llama ``self_attn`` / ``mlp``,
                                   found per layer by ``bottleneck.find_sites``), plus a parameter-free
                                   ``ResidualTap`` on the norm in front when the adapter reads x;
* extending attention or inputs:   prefix tuning (= P-tuning v2) and prompt tuning put virtual keys
                                   and values, or virtual tokens, in front of the real ones. Their
                                   trainable module is attached as ``model.prompt_encoder`` and one
                                   forward pre-hook on a model-level ``forward`` rewrites its arguments:
                                   the prefix goes in as ``past_key_values`` (a ``DynamicCache``), the
                                   prompt as ``inputs_embeds``, and the attention mask, positions and
                                   labels are extended, as PEFT's ``PeftModelFor<Task>`` does. The model
                                   then builds masks and positions itself, for every attention
                                   implementation and in ``generate()``; wrapping each attention layer
                                   would have to redo that per implementation (``virtual_tokens.py``).

Because the wrapper holds the original (and the hook is removed with the prompt encoder), the
adapter can always be taken out again (``unload``) and the frozen weights are never modified
(merging, see ``AdapterLayer.merge``, is the one exception and is undone exactly by ``unmerge``).
Names follow PEFT: ``query`` becomes ``query.base_layer`` + ``query.lora_A`` ..., and the prompt
encoder's ``prompt_encoder.embedding.weight`` is PEFT's ``prompt_encoder.default.embedding.weight``,
which is also why PEFT's adapter files map one to one onto our parameters.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D


class AdapterModule(nn.Module):
    """What every module a method puts into a model is: it holds adapter tensors and can take itself out.

    ``save_adapter``, ``load_adapter`` and ``unload`` find these modules by this type and ask them; a new kind
    of module (a wrapped layer, a prompt encoder, ...) needs nothing else from the rest of the package.
    """

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under their file keys (without PEFT's ``base_model.model.`` prefix).

        ``name`` is this module's name in the model; the default keys are ``<name>.<tensor>``. The tensors
        share storage with the parameters, so that copying into them loads an adapter.
        """
        return {f"{name}.{key}": tensor for key, tensor in self.own_state_dict().items()}

    def own_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def load_adapter_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the file's tensors (the keys of ``adapter_tensors``, shapes already checked) into this module."""
        for key, target in self.adapter_tensors(name).items():
            target.copy_(tensors[key])

    def remove(self, model: nn.Module, name: str) -> None:
        """Take this module out of ``model`` and put back what it replaced."""
        raise NotImplementedError

    def put_back(self, model: nn.Module, name: str) -> None:
        """Undo ``remove`` (``disable_adapter`` takes every part out for a while); the default re-inserts this module."""
        replace_module(model, name, self)

    def remove_keeping_what_was_learnt(self, model: nn.Module, name: str) -> None:
        """``merge_and_unload``: take this module out but keep its effect (a merged layer's weight, a trained head)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be folded into the model; unload it instead.")


class AdapterLayer(AdapterModule):
    """Base class of every wrapper a method puts around a layer of the model.

    The frozen original sits in ``self.base_layer``; everything else a subclass registers is the
    adapter's state, which is what ``save_adapter`` writes. Subclasses that can be folded into the
    base weight implement ``merge_into_base`` and ``unmerge_from_base``.

    A method reads the frozen weight through ``base_weight()`` / ``base_bias()`` and writes a merged one with
    ``set_base_weight``, never through ``base_layer.weight``: a base layer that stores its weight differently
    (transposed, quantised) then needs one ``dense_weight`` / ``set_dense_weight`` registration below, not an
    edit in every method.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.merged = False

    # --- the frozen weight ------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The frozen weight as a dense (d_out, d_in) matrix, the W₀ of the equations."""
        return dense_weight(self.base_layer)

    def base_bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Store a new dense (d_out, d_in) weight in the base layer (merging); no gradient."""
        with torch.no_grad():
            set_dense_weight(self.base_layer, weight)

    def base_weight_version(self) -> tuple:
        """Changes whenever the stored frozen weight does (in place, replaced, moved): for caches of W₀."""
        return tuple((p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape))
                     for p in self.base_layer.parameters(recurse=False))

    # --- the adapter ------------------------------------------------------------------------------
    def own_state_dict(self) -> dict:
        """The adapter's own tensors, keyed relative to this layer (``lora_A.weight``, ...)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}

    def remove(self, model: nn.Module, name: str) -> None:
        if self.merged:
            self.unmerge()
        replace_module(model, name, self.base_layer)

    def remove_keeping_what_was_learnt(self, model: nn.Module, name: str) -> None:
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged: merge it first, or its update would be lost.")
        replace_module(model, name, self.base_layer)  # the base layer now holds W₀ + ΔW

    def refuse_training_while_merged(self) -> None:
        """Called by a merged layer's forward: gradients would reach only W₀'s copy of ΔW, never the adapter."""
        if self.training and torch.is_grad_enabled() and any(
                p.requires_grad for n, p in self.named_parameters() if not n.startswith("base_layer.")):
            raise RuntimeError(
                f"This {type(self).__name__} is merged (ΔW lives inside the frozen weight), so training it would not "
                "reach the adapter's parameters. Call peft_edu.unmerge(model) before training; for inference on the "
                "merged model use model.eval() or torch.no_grad().")

    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("This layer is already merged; call unmerge() first if you want to merge again.")
        self.merge_into_base()
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("This layer is not merged, so there is nothing to unmerge.")
        self.unmerge_from_base()
        self.merged = False

    def merge_into_base(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights.")

    def unmerge_from_base(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be unmerged.")


@functools.singledispatch
def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen weight of ``layer`` as a dense (d_out, d_in) matrix. Register one function per layer type."""
    raise TypeError(f"peft_edu cannot read the weight of a {type(layer).__name__} as a dense (d_out, d_in) matrix; "
                    "register a reader with @peft_edu.injection.dense_weight.register (and set_dense_weight).")


@dense_weight.register
def _(layer: nn.Linear) -> torch.Tensor:
    return layer.weight


@functools.singledispatch
def set_dense_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Store a dense (d_out, d_in) ``weight`` in ``layer`` (called under no_grad)."""
    raise TypeError(f"peft_edu cannot write a dense weight into a {type(layer).__name__}; register a writer with "
                    "@peft_edu.injection.set_dense_weight.register.")


@set_dense_weight.register
def _(layer: nn.Linear, weight: torch.Tensor) -> None:
    layer.weight.copy_(weight)  # in place: the parameter (and optimizers holding it) stay the same


# transformers' Conv1D (GPT-2's attention and MLP) computes x W + b with W stored (d_in, d_out), transposed: PEFT's
# fan_in_fan_out=True. Reading it transposed is all a method needs to adapt it as it adapts nn.Linear.
@dense_weight.register
def _(layer: Conv1D) -> torch.Tensor:
    return layer.weight.T


@set_dense_weight.register
def _(layer: Conv1D, weight: torch.Tensor) -> None:
    layer.weight.copy_(weight.T)


# A convolution is a linear map on each patch of its input (im2col): its weight (d_out, d_in/groups, *kernel)
# flattened to (d_out, d_in/groups · kernel size) is that matrix, a view sharing the weight's storage.
@dense_weight.register(nn.Conv1d)
@dense_weight.register(nn.Conv2d)
@dense_weight.register(nn.Conv3d)
def _(layer) -> torch.Tensor:
    return layer.weight.flatten(1)


@set_dense_weight.register(nn.Conv1d)
@set_dense_weight.register(nn.Conv2d)
@set_dense_weight.register(nn.Conv3d)
def _(layer, weight: torch.Tensor) -> None:
    layer.weight.copy_(weight.reshape(layer.weight.shape))


# An embedding looks up row i of its table for token i: the linear map of the one-hot vector e_i, whose matrix
# (embedding_dim, num_embeddings) is the table transposed (PEFT's in_features = num_embeddings).
@dense_weight.register
def _(layer: nn.Embedding) -> torch.Tensor:
    return layer.weight.T


@set_dense_weight.register
def _(layer: nn.Embedding, weight: torch.Tensor) -> None:
    layer.weight.copy_(weight.T)


def layer_class_for(classes: dict[type, type], module: nn.Module, what: str) -> type:
    """The class in ``classes`` (base layer type -> adapter layer class) for ``module``, found along its type's MRO
    (``NonDynamicallyQuantizableLinear`` is an ``nn.Linear``); the error lists the supported types."""
    for base_type in type(module).__mro__:
        if base_type in classes:
            return classes[base_type]
    raise TypeError(f"{what} is not supported for a {type(module).__name__} layer; it is supported for "
                    f"{_type_names(tuple(classes))} layers.")


def _type_names(kinds: tuple[type, ...]) -> str:
    return ", ".join(kind.__name__ for kind in kinds)


class TrainedCopy(AdapterModule):
    """A module trained in full next to the adapter (PEFT's ``modules_to_save``).

    Like PEFT we keep the pretrained module untouched and train a copy, so that the adapter can be
    removed cleanly. It also means the head is counted twice in "all params", exactly as PEFT counts it.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module.requires_grad_(False)
        self.modules_to_save = copy.deepcopy(module).requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.modules_to_save(*args, **kwargs)

    def own_state_dict(self) -> dict:
        return self.modules_to_save.state_dict()  # saved under the head's own name, as PEFT does

    def remove(self, model: nn.Module, name: str) -> None:
        replace_module(model, name, self.original_module)

    def remove_keeping_what_was_learnt(self, model: nn.Module, name: str) -> None:
        replace_module(model, name, self.modules_to_save)  # the trained copy, as PEFT's merge_and_unload keeps it


class TrainableTokens(AdapterLayer):
    """New values for a few rows of an embedding table, trained in place of those rows (PEFT's trainable tokens,
    ``LoraConfig(trainable_token_indices=...)``): for new or rare tokens, len(indices) × dim numbers are trained
    instead of the whole table (``modules_to_save``). The rows start as the table's own; the adapter file holds them
    under PEFT's key ``<embedding>.token_adapter.trainable_tokens_delta`` (the rows' values, despite the name).
    Merging writes them into the table; unmerging puts the table's rows back."""

    def __init__(self, base_layer: nn.Embedding, token_indices: list[int]):
        super().__init__(base_layer)
        self.token_indices = list(token_indices)
        self.trainable_tokens_delta = nn.Parameter(self.base_weight().T[self.token_indices].detach().clone())

    def table(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding table with ``rows`` (default: the trained ones) in place of the chosen tokens' rows."""
        table = self.base_weight().T
        rows = self.trainable_tokens_delta if rows is None else rows
        index = torch.tensor(self.token_indices, device=table.device)
        return table.index_copy(0, index, rows.to(table.dtype))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            self.refuse_training_while_merged()
            return base(tokens)
        result = F.embedding(tokens, self.table(), base.padding_idx, base.max_norm, base.norm_type,
                             base.scale_grad_by_freq, base.sparse)
        embed_scale = getattr(base, "embed_scale", None)  # Gemma's scaled embeddings, as PEFT
        return result if embed_scale is None else result * embed_scale.to(result.dtype)

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.token_adapter.trainable_tokens_delta": self.trainable_tokens_delta}

    @torch.no_grad()
    def merge_into_base(self) -> None:
        self._table_rows = self.base_weight().T[self.token_indices].clone()
        self.set_base_weight(self.table().T)

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        self.set_base_weight(self.table(self._table_rows).T)
        self._table_rows = None


def matches(target_modules: list[str] | str, name: str) -> bool:
    """PEFT's matching rule for one module name (see ``PeftConfig.target_modules``)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_targets(model: nn.Module, target_modules: list[str] | str,
                 kind: type | tuple[type, ...] = nn.Linear) -> list[str]:
    """Names of the modules that ``target_modules`` selects, checked strictly.

    Unlike PEFT, an entry that matches nothing is an error even when other entries match (PEFT
    issue #1959 shows how a typo then trains fewer layers than intended, silently).
    Matching a module of another type than ``kind`` (a type or a tuple of types) is an error too, as is the
    ``out_proj`` inside an ``nn.MultiheadAttention``, whose forward reads ``out_proj.weight`` itself and never calls
    ``out_proj``. Modules trained in full (``TrainedCopy``, PEFT's ``modules_to_save``) are never targets, as in PEFT.
    """
    kinds = kind if isinstance(kind, tuple) else (kind,)
    inside_copies = [n + "." for n, m in model.named_modules() if isinstance(m, TrainedCopy)]
    names = [name for name, _ in model.named_modules() if name and not name.startswith(tuple(inside_copies))]
    found = [name for name in names if matches(target_modules, name)]
    if isinstance(target_modules, str):
        unmatched = [] if found else [target_modules]
    else:
        unmatched = [t for t in target_modules if not any(matches([t], n) for n in found)]
    modules = dict(model.named_modules())
    if unmatched:
        # Only the model's own layers are candidates, not those inside a TrainedCopy.
        by_kind = {kind: sorted({n.rsplit(".", 1)[-1] for n in names if isinstance(modules[n], kind)})
                   for kind in kinds}
        candidates = "; ".join(f"{kind.__name__} layers: {leaves}" for kind, leaves in by_kind.items() if leaves)
        raise ValueError(
            f"target_modules entry {unmatched[0]!r} matches no module of {type(model).__name__}. "
            f"Names of its {candidates or _type_names(kinds) + ' layers: none'}. Full names look like "
            f"{_example_name(model, kinds)!r}."
        )
    wrong = [n for n in found if not isinstance(modules[n], kinds)]
    if wrong:
        raise TypeError(
            f"target_modules selects {wrong[0]!r}, a {type(modules[wrong[0]]).__name__}; this method does not support "
            f"that layer type: it adapts only {_type_names(kinds)} layers. Name such layers inside it instead."
        )
    in_attention = [n for n in found if n.rpartition(".")[0] in modules and n.endswith(".out_proj")
                    and isinstance(modules[n.rpartition(".")[0]], nn.MultiheadAttention)]
    if in_attention:
        attention = in_attention[0].rpartition(".")[0]
        raise TypeError(
            f"target_modules selects {in_attention[0]!r}, the output projection inside the nn.MultiheadAttention "
            f"{attention!r}: the attention reads out_proj.weight directly and never calls out_proj, so an adapter "
            f"there would be skipped. Adapting it alone is not supported; with LoRA, target the attention itself "
            f"({attention.rsplit('.', 1)[-1]!r}), which adapts its in_proj and out_proj as PEFT does."
        )
    return found


def find_parameter_targets(model: nn.Module, target_parameters: list[str]) -> list[tuple[str, str]]:
    """(module name, parameter name) of each parameter that ``target_parameters`` selects (PEFT's rule: the full name
    ``<module>.<parameter>`` equals an entry or ends with "." + entry), in model order, checked strictly as
    ``find_targets`` checks: every entry matches, only matrices (2-D), one per module, none in an adapted module."""
    found, adapted = [], [n for n, m in model.named_modules() if isinstance(m, AdapterModule)]
    for module_name, module in model.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            full = f"{module_name}.{parameter_name}" if module_name else parameter_name
            plain = full.replace(".base_layer.", ".").replace(".original_module.", ".")
            if matches(target_parameters, plain):
                found.append((module_name, parameter_name, plain, parameter))
    unmatched = [t for t in target_parameters if not any(matches([t], plain) for _, _, plain, _ in found)]
    if unmatched:
        example = next((n for n, _ in model.named_parameters()), "")
        raise ValueError(f"target_parameters entry {unmatched[0]!r} matches no parameter of {type(model).__name__}; "
                         f"full parameter names look like {example!r}.")
    for module_name, parameter_name, plain, parameter in found:
        if any(module_name == n or module_name.startswith(n + ".") for n in adapted):
            raise ValueError(f"target_parameters selects {plain!r}, a parameter of a module that is already adapted "
                             "(a target_modules target, or trained in full): adapting it twice is not supported; "
                             "name it in one of the two only.")
        if parameter.dim() != 2:
            raise ValueError(f"target_parameters selects {plain!r}, a {parameter.dim()}-D parameter: only matrices "
                             "(2-D) are supported, not PEFT's 3-D mixture-of-experts stacks.")
    modules = [module_name for module_name, *_ in found]
    twice = next((m for m in modules if modules.count(m) > 1), None)
    if twice is not None:
        raise ValueError(f"target_parameters selects several parameters of {twice!r}: adapting more than one parameter "
                         "of a module is not supported; name one of them.")
    return [(module_name, parameter_name) for module_name, parameter_name, *_ in found]


def _example_name(model: nn.Module, kind: type | tuple[type, ...]) -> str:
    return next((n for n, m in model.named_modules() if isinstance(m, kind)), "")


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new_module)


def wrap_targets(model: nn.Module, names: list[str], make_wrapper: Callable[[nn.Module], nn.Module]) -> None:
    """Replace each named module by ``make_wrapper(original)``; an error while wrapping names the module."""
    for name in names:
        module = model.get_submodule(name)
        try:
            wrapper = make_wrapper(module)
        except (TypeError, ValueError, NotImplementedError) as error:
            raise type(error)(f"{name} ({type(module).__name__}): {error}") from error
        replace_module(model, name, wrapper)


def train_copies_of(model: nn.Module, module_names: list[str]) -> None:
    """Wrap each module that an entry of ``module_names`` selects (PEFT's suffix rule) in a ``TrainedCopy``."""
    for entry in module_names:
        found = [n for n, _ in model.named_modules() if n and matches([entry], n)]
        if not found:
            top = sorted(n for n, _ in model.named_children())
            raise ValueError(f"modules_to_save entry {entry!r} matches no module; top-level modules are {top}.")
        for name in found:
            replace_module(model, name, TrainedCopy(model.get_submodule(name)))


def train_tokens_of(model: nn.Module, token_indices: list[int] | dict[str, list[int]]) -> None:
    """Wrap embeddings in ``TrainableTokens``: a list trains those rows of the input embeddings
    (``model.get_input_embeddings()``), a dict maps embedding names (PEFT's suffix rule) to their rows."""
    if isinstance(token_indices, dict):
        chosen = token_indices
    else:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        name = next((n for n, m in model.named_modules() if m is embeddings), None)
        if name is None:
            raise ValueError(f"trainable_token_indices as a list trains rows of the input embeddings, but "
                             f"{type(model).__name__} has no get_input_embeddings(); name the embedding, e.g. "
                             "trainable_token_indices={'embed_tokens': [0, 5]}.")
        chosen = {name: token_indices}
    modules = dict(model.named_modules())
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for entry, indices in chosen.items():
        found = [n for n in modules if n and matches([entry], n)]
        if not found:
            raise ValueError(f"trainable_token_indices entry {entry!r} matches no module of {type(model).__name__}.")
        for name in found:
            module = modules[name]
            if not isinstance(module, nn.Embedding):
                raise TypeError(f"trainable_token_indices selects {name!r}, a {type(module).__name__}; trainable tokens "
                                "are not supported there: only nn.Embedding layers not adapted otherwise.")
            if len(names_of[id(module.weight)]) > 1:
                raise ValueError(f"trainable_token_indices selects {name!r}, whose table is tied to "
                                 f"{names_of[id(module.weight)][1]!r}: trainable tokens on tied weights are not "
                                 "supported; untie them first, or train the rows with modules_to_save.")
            bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int)
                   or not 0 <= i < module.num_embeddings]
            if bad or not indices or len(set(indices)) != len(indices):
                raise ValueError(f"trainable_token_indices[{entry!r}]={indices!r}: give distinct token ids in "
                                 f"[0, {module.num_embeddings}).")
        wrap_targets(model, found, lambda base: TrainableTokens(base, indices))


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_modules(model: nn.Module) -> dict[str, AdapterModule]:
    """Every module a method put into ``model`` (layers, trained copies, prompt encoders), by name, outermost first."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterModule)}
