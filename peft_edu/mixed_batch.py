r"""Mixed-adapter batches: every row of a batch runs through the LoRA adapter it names (or the base model).

One base model serves many tasks at once when each row of the batch names its adapter,
``model(input_ids, adapter_names=["polarity", "__base__", "news", ...])`` (PEFT's argument). PEFT splits the batch
into one sub-batch per adapter and loops over them in every layer. Here each layer gathers the factors of every
row's adapter, A_i (r × d_in) and B_i (d_out × r), and computes all rows with one batched product per factor
(the "gather, then batched matmul" kernel of Punica, arXiv 2310.18547, and S-LoRA, arXiv 2311.03285):

    h_i = W₀ x_i + s_i · B_i A_i x_i,        for every row i at once: bmm(bmm(X, Aᵀ), Bᵀ)

Adapters of different ranks are zero-padded to the largest rank, and a row of the base model (``"__base__"``), or of
an adapter that does not adapt this layer, gathers zero factors: zeros add nothing, so each row's output is exactly
its own adapter's. ``mixed_batch`` takes the active adapter out (``named_adapters.py``), swaps a ``MixedBatchLora``
into every layer that some named adapter adapts for the duration of the call, and puts everything back afterwards;
``accept_adapter_names`` lets the model's forward and generate take PEFT's argument.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from .injection import replace_module
from .lora import LoraLinear
from .named_adapters import BASE_MODEL_ROW, adapters_parts, list_adapters, put_in, refuse_while_merged, take_out


def refuse_unsupported_layer(adapter: str, name: str, module: nn.Module) -> None:
    """Only plain LoRA on linear layers (nn.Linear, Conv1D, 4-bit) runs in a mixed batch; the error says what to do."""
    if type(module) is LoraLinear and module.initial_factors is None:
        return
    why = ("its PiSSA/OLoRA initialisation changed W₀ for this adapter only"
           if isinstance(module, LoraLinear) and module.initial_factors is not None
           else f"{name} is a {type(module).__name__}, and only plain LoRA on linear layers (LoraLinear) is batched")
    raise ValueError(f"Adapter {adapter!r} cannot run in a mixed batch: {why}. Run its rows in a batch of their own "
                     f"(peft_edu.set_adapter(model, {adapter!r}), then call the model without adapter_names).")


class MixedBatchLora(nn.Module):
    """A linear layer W₀ plus, for row i of the batch, the LoRA update of adapter ``rows[i]``.

    ``layers`` maps adapter names to their ``LoraLinear`` at this place (an adapter missing here adds nothing). The
    factors are stacked once per call, A as (adapters + 1, r_max, d_in) and s·Bᵀ as (adapters + 1, r_max, d_out),
    the last slot all zeros for the base model's rows; a forward gathers one slot per row. The gather is
    ``index_select``: on a CPU it copies the rows' factors faster than indexing with a tensor (``stacked_A[slots]``).
    """

    def __init__(self, base_layer: nn.Module, layers: dict[str, LoraLinear], rows: list[str]):
        super().__init__()
        self.base_layer = base_layer
        self.rows = rows
        # on the base layer's device: a parked adapter stays where it was when the model was moved
        device = next(base_layer.parameters()).device
        slot_of = {name: slot for slot, name in enumerate(layers)}
        self.slot_of_row = torch.tensor([slot_of.get(name, len(layers)) for name in rows], device=device)
        r_max = max(layer.r for layer in layers.values())
        A_rows, B_T_rows, biases = [], [], []
        for layer in layers.values():
            A, B = layer.lora_factors()
            # the scaling goes into B once per call, not into every output: s·B(Ax) + s·b = (BAx + b)·s
            A_rows.append(_zero_padded(A, r_max))
            B_T_rows.append(_zero_padded(layer.scaling * B.T, r_max))
            bias = layer.lora_B_bias()
            biases.append(None if bias is None else layer.scaling * bias)
        A_rows.append(torch.zeros_like(A_rows[0]))  # the base model's slot
        B_T_rows.append(torch.zeros_like(B_T_rows[0]))
        self.stacked_A = torch.stack(A_rows).to(device)
        self.stacked_B_T = torch.stack(B_T_rows).to(device)
        # each row's scaled B bias, gathered once for every forward of this call (None when no adapter has one)
        self.row_bias = None
        if any(bias is not None for bias in biases):
            no_bias = B_T_rows[0].new_zeros(B_T_rows[0].shape[1])
            stacked = torch.stack([no_bias if bias is None else bias for bias in biases] + [no_bias]).to(device)
            self.row_bias = stacked[self.slot_of_row, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.rows):
            raise ValueError(f"adapter_names names {len(self.rows)} rows, but the batch has {x.shape[0]}: give one "
                             "adapter name (or '__base__') per row.")
        result = self.base_layer(x).contiguous()
        tokens = x.to(self.stacked_A.dtype).reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, d_in)
        A = torch.index_select(self.stacked_A, 0, self.slot_of_row)               # (batch, r_max, d_in)
        B_T = torch.index_select(self.stacked_B_T, 0, self.slot_of_row)           # (batch, r_max, d_out), scaled
        down = torch.bmm(tokens, A.transpose(1, 2))                               # (batch, tokens, r_max)
        # added into W₀x in place, which nothing needs afterwards: at a prompt of many tokens a fresh (batch, tokens,
        # d_out) tensor for the update, and one for the sum, are megabytes to allocate and touch, and cost more than
        # the product itself
        into = result.view(x.shape[0], -1, result.shape[-1])
        if into.dtype == B_T.dtype:
            into.baddbmm_(down, B_T)
        else:
            into.add_(torch.bmm(down, B_T).to(into.dtype))
        if self.row_bias is not None:
            into.add_(self.row_bias.to(into.dtype))
        return result


def _zero_padded(factor: torch.Tensor, rows: int) -> torch.Tensor:
    """``factor`` (r × d) with zero rows below it up to ``rows``: a smaller rank's padding adds nothing."""
    missing = rows - factor.shape[0]
    return factor if missing == 0 else torch.cat([factor, factor.new_zeros(missing, factor.shape[1])])


@contextlib.contextmanager
def mixed_batch(model: nn.Module, rows: list[str]):
    """``with mixed_batch(model, rows):`` row i of every batch runs through adapter ``rows[i]`` (``"__base__"``:
    the base model). ``model(x, adapter_names=rows)`` and ``model.generate(x, adapter_names=rows)`` call this."""
    _check_rows(model, rows)
    layers_of = {}  # adapter -> {module name: its LoraLinear}
    named = [adapter for adapter in dict.fromkeys(rows) if adapter != BASE_MODEL_ROW]
    for adapter, (_, parts) in adapters_parts(model, named).items():
        for name, module in parts:
            refuse_unsupported_layer(adapter, name, module)
        layers_of[adapter] = dict(parts)
    targets = list(dict.fromkeys(name for parts in layers_of.values() for name in parts))
    taken, swapped_in = take_out(model), []
    try:
        for name in targets:
            layers = {adapter: parts[name] for adapter, parts in layers_of.items() if name in parts}
            replace_module(model, name, MixedBatchLora(model.get_submodule(name), layers, list(rows)))
            swapped_in.append(name)
        yield model
    finally:
        for name in swapped_in:
            replace_module(model, name, model.get_submodule(name).base_layer)
        put_in(model, taken)


def _check_rows(model: nn.Module, rows) -> None:
    """PEFT's checks of ``adapter_names``, with an unknown name an error (PEFT ran such rows through the base model
    silently until its issue #2090)."""
    valid = list_adapters(model)
    if not isinstance(rows, (list, tuple)) or not rows or not all(isinstance(row, str) for row in rows):
        raise TypeError(f"adapter_names={rows!r}: give a list with one adapter name per row of the batch, from "
                        f"{valid} or {BASE_MODEL_ROW!r} for the base model.")
    unknown = sorted(set(rows) - set(valid) - {BASE_MODEL_ROW})
    if unknown:
        raise ValueError(f"adapter_names names {unknown}, which the model does not have; its adapters are {valid}, "
                         f"and {BASE_MODEL_ROW!r} runs a row through the base model.")
    if model.training:
        raise ValueError("Mixed-adapter batches are for inference, as in PEFT: call model.eval() first (to train one "
                         "adapter, peft_edu.set_adapter(model, name) and call the model without adapter_names).")
    refuse_while_merged(model, "run a mixed batch (a merged adapter would be added to every row)")


def accept_adapter_names(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=...)`` and ``model.generate(..., adapter_names=...)`` run a mixed batch: a
    forward pre-hook takes the argument out of the call (the model itself does not know it) and enters
    ``mixed_batch`` for that call; generate, which would refuse the argument, is wrapped so that it enters it once
    for all its steps. ``_forget_adapter`` removes both."""
    if hasattr(model, "peft_edu_adapter_names_hooks"):
        return
    model.peft_edu_adapter_names_hooks = (
        model.register_forward_pre_hook(_enter_mixed_batch, with_kwargs=True),
        model.register_forward_hook(_leave_mixed_batch, always_call=True))
    if hasattr(type(model), "generate"):
        model.generate = functools.partial(_generate, model)  # a partial pickles and deep-copies with the model


def _enter_mixed_batch(model: nn.Module, args: tuple, kwargs: dict):
    if "adapter_names" not in kwargs:
        return None
    rows = kwargs.pop("adapter_names")
    if rows is not None:
        exit_stack = contextlib.ExitStack()
        exit_stack.enter_context(mixed_batch(model, rows))
        model.peft_edu_mixed_batch = exit_stack
    return args, kwargs


def _leave_mixed_batch(model: nn.Module, args: tuple, output):
    exit_stack = model.__dict__.pop("peft_edu_mixed_batch", None)
    if exit_stack is not None:
        exit_stack.close()


def _generate(model: nn.Module, *args, adapter_names: list[str] | None = None, **kwargs):
    generate = type(model).generate
    if adapter_names is None:
        return generate(model, *args, **kwargs)
    beams = kwargs.get("num_beams")
    if isinstance(beams, int) and beams > 1 and isinstance(adapter_names, (list, tuple)):
        adapter_names = [name for name in adapter_names for _ in range(beams)]  # each row becomes `beams` rows, as PEFT
    with torch.no_grad(), mixed_batch(model, adapter_names):  # generate computes no gradient: neither do the stacks
        return generate(model, *args, **kwargs)
