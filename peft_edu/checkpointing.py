"""Gradient checkpointing with every method of the course.

transformers' ``model.gradient_checkpointing_enable()`` (which ``Trainer(gradient_checkpointing=True)`` calls)
wraps each transformer layer in ``torch.utils.checkpoint``: the layer's activations are not kept for backward
but recomputed, trading about one extra forward pass for memory that no longer grows with the depth.
Two things then break for a model whose pretrained weights are frozen, and peft_edu mends both:

* **Nothing flows back into a checkpointed layer.** With ``use_reentrant=True`` (transformers' default) a
  checkpointed segment's output requires grad only if one of its tensor *inputs* does. The hidden states
  come from a frozen embedding, so they do not; backward never enters the layers and the adapters in them
  get no gradient (PyTorch raises "element 0 of tensors does not require grad" when the loss has no other
  path, or the adapters silently stay unchanged when a trained head gives it one). PEFT's answer is
  ``enable_input_require_grads``, called only if checkpointing is already on when the adapter is added.
  Here a forward hook on the input embeddings marks their output as requiring grad *whenever* the model
  is training with checkpointing on, however and whenever it was turned on. It costs nothing otherwise.
* **Prefix tuning's prefix would be dropped.** The prefix travels as the key/value cache, and a
  checkpointed layer sets ``past_key_values=None`` (transformers' ``GradientCheckpointingLayer``: a cache
  that grows during forward would be wrong when the layer is recomputed). PEFT refuses the combination
  (its issue #869). Here each checkpointed layer gets, inside the checkpointed call, a fresh cache holding
  only its own prefix, computed from the prefix encoder there and then: recomputing the layer recomputes
  its prefix too, so both checkpointing modes give the gradients of the run without checkpointing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def checkpointing_in_effect(module: nn.Module) -> bool:
    """True while ``module`` trains with transformers' gradient checkpointing on (a layer's flag)."""
    return (module.training and torch.is_grad_enabled()
            and any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules()))


class _RequireGradUnderCheckpointing:
    """The embeddings' forward hook. A class, not a closure, so that a deepcopy of the model gets a hook that
    asks the copy (a function is not copied, and would keep asking the original)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, module: nn.Module, args: tuple, output):
        if isinstance(output, torch.Tensor) and not output.requires_grad and checkpointing_in_effect(self.model):
            output.requires_grad_(True)


def inputs_require_grad_under_checkpointing(model: nn.Module) -> RemovableHandle | None:
    """Hook the input embeddings so that, while checkpointing is in effect, their output requires grad.
    Returns the hook's handle (``None`` for a model without ``get_input_embeddings``)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is None:
        return None
    return embeddings.register_forward_hook(_RequireGradUnderCheckpointing(model))


def checkpointable_layers(backbone: nn.Module) -> list[nn.Module]:
    """The layers transformers can checkpoint (its ``GradientCheckpointingLayer``s have the flag), in order."""
    return [m for m in backbone.modules() if hasattr(m, "gradient_checkpointing") and m is not backbone]


def layer_index(layer: nn.Module) -> int:
    """The index of a transformer layer in the key/value cache: its attention's ``layer_idx``."""
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            return module.layer_idx
    raise TypeError(f"{type(layer).__name__} has no attention with a layer_idx, so prefix tuning cannot tell which "
                    "layer's prefix it needs under gradient checkpointing.")
