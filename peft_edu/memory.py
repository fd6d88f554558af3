r"""How much memory fine-tuning a Llama-style model needs: weights, gradients, optimizer state, activations.

    from peft_edu.memory import MODELS, training_memory
    training_memory(MODELS["Llama-3.1-8B"], "qlora", batch_size=4, seq_len=512, gradient_checkpointing=True)

``training_memory`` adds up four parts, in bytes, for full fine-tuning, LoRA (arXiv 2106.09685) and QLoRA
(arXiv 2305.14314) of a decoder built like Llama (SmolLM2 and Llama 3.1 are): RMSNorm, attention with grouped
key/value heads and rotary positions, a SwiGLU feed-forward, no biases. Its assumptions, each a choice you can
see below:

* **Weights.** Full fine-tuning stores every weight in ``dtype``. LoRA stores the frozen base in ``dtype`` and the
  adapter in float32, as PEFT does (``autocast_adapter_dtype=True`` upcasts 16-bit adapters). QLoRA stores the
  linear layers of the transformer blocks in NF4, ``nf4_bits_per_parameter`` bits each (4.5, or 4.127 with
  double quantisation), and keeps the embeddings, the norms and the output head in ``dtype``, as transformers
  does with bitsandbytes.
* **Gradients** exist for the trainable parameters only, in the dtype of the weight they belong to.
* **Optimizer state.** AdamW (arXiv 1711.05101) keeps two float32 moments per trainable parameter (8 bytes) and,
  as ``torch.optim.AdamW`` does, one float32 step counter per parameter tensor (4 bytes). With 16-bit weights
  (mixed precision, Micikevicius et al. arXiv 1710.03740) the update is made on a float32 master copy, 4 more
  bytes per parameter: ZeRO (arXiv 1910.02054, §3.1) counts these 12 bytes as the optimizer state, and so do
  we. Full fine-tuning in 16-bit thus costs 2 + 2 + 12 = 16 bytes per parameter before any activation.
  ``optimizer="sgd"`` (plain SGD, no momentum) keeps no state.
* **Activations**: the bytes autograd keeps for backward at the end of the forward pass, counted tensor by
  tensor as Korthikanti et al. (arXiv 2205.05198, §4) count them for GPT, but for the Llama layer as
  transformers 4.57 implements it, with PyTorch's scaled-dot-product attention (SDPA) on batches without
  padding: a fused kernel that keeps the query, key, value, output and one log-sum-exp per head and token, not
  the ``seq_len × seq_len`` attention matrix (their term 5as/h; with ``attn_implementation="eager"`` it is kept
  and this count is too low). A tensor kept by two operations (the input of the query, key and value
  projections) is counted once. A frozen linear layer keeps nothing of its input (autograd saves an input
  only for the gradient of a weight that trains), which is why LoRA keeps fewer activations than full
  fine-tuning even at the same batch. The float32 tensors of RMSNorm and of the loss stay float32 in a 16-bit
  model; a float32 adapter on a 16-bit model keeps its own float32 copy of its input.
* **Gradient checkpointing** (Chen et al. arXiv 1604.06174), as transformers does it (every decoder layer,
  ``use_reentrant=True``): forward keeps only each layer's input, and backward recomputes one layer at a time,
  whose activations (``recomputed``) exist only while that layer's gradients are computed.

Left out: temporaries (the logits and their float32 copy during the loss, the dequantised weight of a 4-bit
layer during its matmul, the gradients of activations during backward, FSDP's gathered layer), the CUDA context
and kernels' workspaces (several hundred MB on a GPU), and the allocator's fragmentation. So a total is a lower
bound on what ``nvidia-smi`` shows: leave room. Dropout (off in these models) and padding masks are left out
too. The chapter ``notebooks/memory.ipynb`` checks every part against a measurement on SmolLM2-135M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
METHODS = ("full", "lora", "qlora")
OPTIMIZER_MOMENTS = {"adamw": 2, "sgd": 0}   # float32 numbers per trainable parameter
FLOAT32, INT64 = 4, 8


# --- checking the arguments -----------------------------------------------------------------------
def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r}: must be a positive int.")


def _check_choice(name: str, value, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(map(repr, choices))}.")


def _check_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, (list, tuple, set, frozenset)):
        names = tuple(targets)
        if names and len(set(names)) == len(names) and set(names) <= set(LLAMA_LINEARS):
            return names
    raise ValueError(f"lora_targets={targets!r}: a non-empty list of distinct names among {', '.join(LLAMA_LINEARS)}, "
                     "e.g. ['q_proj', 'v_proj'].")


# --- the model's shapes -------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """The shapes that decide a Llama-style decoder's memory (the names of its transformers config)."""

    name: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int | None = None   # hidden_size // num_attention_heads unless the config says otherwise

    def __post_init__(self):
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type == "int":
                _check_positive_int(f"ModelShape {field.name}", value)
        if not isinstance(self.name, str) or not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"ModelShape name={self.name!r} must be a str and tie_word_embeddings="
                             f"{self.tie_word_embeddings!r} True or False.")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        _check_positive_int("ModelShape head_dim", self.head_dim)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}: each key/value head serves a group.")

    @classmethod
    def from_config(cls, config, name: str | None = None) -> "ModelShape":
        """The shape of a transformers ``LlamaConfig`` (or any config with the same fields), e.g. ``model.config``."""
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ValueError("This config has biases in its linear layers; ModelShape counts bias-free Llama layers.")
        return cls(name or getattr(config, "name_or_path", "") or type(config).__name__,
                   config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads,
                   config.vocab_size, bool(config.tie_word_embeddings), getattr(config, "head_dim", None))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each linear layer of one decoder layer."""
        h, q, kv, i = (self.hidden_size, self.num_attention_heads * self.head_dim,
                       self.num_key_value_heads * self.head_dim, self.intermediate_size)
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def block_linear_parameters(self) -> int:
        """The weights of the linear layers of all decoder layers (what QLoRA quantises)."""
        return self.num_hidden_layers * sum(d_in * d_out for d_in, d_out in self.linear_shapes().values())

    def embedding_parameters(self) -> int:
        """The input embeddings, plus the output head unless the two share one matrix."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def norm_parameters(self) -> int:
        """Two RMSNorm weights per decoder layer and the final one."""
        return (2 * self.num_hidden_layers + 1) * self.hidden_size

    def parameters(self) -> int:
        """Every parameter, a tied matrix once (what ``sum(p.numel() for p in model.parameters())`` gives)."""
        return self.block_linear_parameters() + self.embedding_parameters() + self.norm_parameters()

    def parameter_tensors(self) -> int:
        """How many parameter tensors the model has (AdamW keeps one step counter for each)."""
        per_layer = len(LLAMA_LINEARS) + 2
        return self.num_hidden_layers * per_layer + 1 + (1 if self.tie_word_embeddings else 2)


# Published configurations (config.json of each model on the Hugging Face hub; Llama 3.1's also in Table 3 of
# arXiv 2407.21783). Each one's parameter count from these shapes is within 1 % of the size in its name
# (tests/test_memory.py).
MODELS = {shape.name: shape for shape in (
    ModelShape("SmolLM2-135M", 30, 576, 1536, 9, 3, 49152, True),        # HuggingFaceTB/SmolLM2-135M
    ModelShape("SmolLM2-1.7B", 24, 2048, 8192, 32, 32, 49152, True),     # HuggingFaceTB/SmolLM2-1.7B
    ModelShape("Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128256, False),   # meta-llama/Llama-3.1-8B
    ModelShape("Llama-3.1-70B", 80, 8192, 28672, 64, 8, 128256, False),  # meta-llama/Llama-3.1-70B
)}
NOMINAL_PARAMETERS = {"SmolLM2-135M": 135e6, "SmolLM2-1.7B": 1.7e9, "Llama-3.1-8B": 8e9, "Llama-3.1-70B": 70e9}


def lora_parameters(shape: ModelShape, rank: int, targets=LLAMA_LINEARS) -> int:
    """LoRA's trainable count: A (rank × d_in) and B (d_out × rank) for each targeted linear of every layer."""
    _check_targets(targets)
    _check_positive_int("rank", rank)
    shapes = shape.linear_shapes()
    return shape.num_hidden_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def nf4_bits_per_parameter(blocksize: int = 64, double_quantisation: bool = True, second_blocksize: int = 256) -> float:
    """Bits per weight of QLoRA's NF4 storage (arXiv 2305.14314, §3).

    Each block of ``blocksize`` weights stores 4-bit codes and one float32 absmax (32 / blocksize bits per weight:
    0.5 for 64). Double quantisation stores those absmax as 8-bit codes instead, with one float32 constant per
    ``second_blocksize`` of them: 8/64 + 32/(64·256) = 0.127 bits per weight. Left out: a few hundred bytes per
    tensor (the 16 NF4 levels, the 256 codes of the absmax and the offset subtracted from them).
    """
    _check_positive_int("blocksize", blocksize)
    _check_positive_int("second_blocksize", second_blocksize)
    if double_quantisation:
        return 4 + 8 / blocksize + 32 / (blocksize * second_blocksize)
    return 4 + 32 / blocksize


# --- activations: what autograd keeps for backward ----------------------------------------------
@dataclass(frozen=True)
class _Training:
    """What trains and in which dtype: the facts the activation count needs."""
    full: bool                    # every parameter trains (full fine-tuning) or only LoRA adapters
    lora_targets: frozenset
    lora_rank: int
    element: int                  # bytes per element of the compute dtype
    batch_size: int
    seq_len: int

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


class _Kept:
    """The tensors kept for backward, by name: one tensor kept by two operations is named, and counted, once."""

    def __init__(self):
        self.bytes: dict[str, int] = {}

    def keep(self, name: str, numel: int, element_bytes: int) -> None:
        self.bytes.setdefault(name, numel * element_bytes)

    def total(self) -> int:
        return sum(self.bytes.values())


def _rms_norm(kept: _Kept, name: str, width: int, x_requires_grad: bool, t: _Training) -> bool:
    """transformers' LlamaRMSNorm: x32 = x.float(); x32 * rsqrt(mean(x32²) + eps), cast back, times the weight."""
    if x_requires_grad:
        kept.keep(f"{name}.input_float32", t.tokens * width, FLOAT32)  # pow and the product keep x32 (in a float32
        kept.keep(f"{name}.rsqrt", t.tokens, FLOAT32)                   # model x32 is x itself) and the rsqrt
    if t.full:
        kept.keep(f"{name}.normalised", t.tokens * width, t.element)   # the weight's gradient needs its input
    return x_requires_grad or t.full


def _linear(kept: _Kept, layer: str, name: str, input_name: str, d_in: int, x_requires_grad: bool, t: _Training) -> bool:
    """The linear layer ``name`` (e.g. "q_proj") of ``layer``; returns whether its output requires grad."""
    if t.full:
        kept.keep(input_name, t.tokens * d_in, t.element)  # the weight's gradient needs the input
        return True
    if name in t.lora_targets:
        # PEFT's (and peft_edu's) LoRA casts x to the adapter's dtype: the same tensor in a float32 model,
        # a float32 copy of its own in a 16-bit one. lora_A keeps it, lora_B keeps A x.
        kept.keep(input_name if t.element == FLOAT32 else f"{layer}.{name}.input_float32", t.tokens * d_in, FLOAT32)
        kept.keep(f"{layer}.{name}.lora_A_output", t.tokens * t.lora_rank, FLOAT32)
        return True
    return x_requires_grad   # a frozen layer keeps only its weight


def _decoder_layer(kept: _Kept, layer: str, shape: ModelShape, x_requires_grad: bool, t: _Training) -> bool:
    """transformers' LlamaDecoderLayer, operation by operation; returns whether its output requires grad."""
    d = shape.linear_shapes()
    q_width, kv_width, i = d["q_proj"][1], d["k_proj"][1], shape.intermediate_size
    normed = _rms_norm(kept, f"{layer}.input_layernorm", shape.hidden_size, x_requires_grad, t)
    q, k, v = (_linear(kept, layer, p, f"{layer}.attention_input", shape.hidden_size, normed, t)
               for p in ("q_proj", "k_proj", "v_proj"))
    if q or k:   # rotary positions: q·cos + rotate(q)·sin keeps cos and sin, computed once for all layers
        for part in ("cos", "sin"):
            kept.keep(f"rotary.{part}", t.seq_len * shape.head_dim, t.element)
    if q or k or v:   # the fused attention kernel keeps its inputs (after rotation), its output, a log-sum-exp
        for part, width in (("query", q_width), ("key", kv_width), ("value", kv_width), ("output", q_width)):
            kept.keep(f"{layer}.attention.{part}", t.tokens * width, t.element)
        kept.keep(f"{layer}.attention.logsumexp", t.tokens * shape.num_attention_heads, FLOAT32)
    # o_proj's input is the attention output reshaped (a view: the same tensor)
    attended = _linear(kept, layer, "o_proj", f"{layer}.attention.output", q_width, q or k or v, t)
    h1 = x_requires_grad or attended                      # residual: h + o (keeps nothing)
    normed = _rms_norm(kept, f"{layer}.post_attention_layernorm", shape.hidden_size, h1, t)
    gate = _linear(kept, layer, "gate_proj", f"{layer}.mlp_input", shape.hidden_size, normed, t)
    up = _linear(kept, layer, "up_proj", f"{layer}.mlp_input", shape.hidden_size, normed, t)
    if gate:
        kept.keep(f"{layer}.mlp.gate_output", t.tokens * i, t.element)  # SiLU's gradient needs its input
    if up:
        kept.keep(f"{layer}.mlp.silu_output", t.tokens * i, t.element)  # the product keeps each factor for
    if gate:                                                              # the gradient of the other
        kept.keep(f"{layer}.mlp.up_output", t.tokens * i, t.element)
    down = _linear(kept, layer, "down_proj", f"{layer}.mlp.product", i, gate or up, t)
    return h1 or down


def _head(kept: _Kept, shape: ModelShape, h_requires_grad: bool, t: _Training) -> None:
    """The final norm, the output head and the loss (transformers' ForCausalLMLoss: cross-entropy in float32)."""
    _rms_norm(kept, "norm", shape.hidden_size, h_requires_grad, t)
    if t.full:
        kept.keep("lm_head.input", t.tokens * shape.hidden_size, t.element)
        kept.keep("embedding.token_ids", t.tokens, INT64)        # the embedding's gradient needs the token ids
    kept.keep("loss.log_softmax", t.tokens * shape.vocab_size, FLOAT32)  # the logits upcast to float32: its output
    kept.keep("loss.targets", t.tokens, INT64)
    kept.keep("loss.total_weight", 1, FLOAT32)                        # the count the mean divides by


def _activations(shape: ModelShape, t: _Training, gradient_checkpointing: bool) -> tuple[int, int]:
    """(bytes kept for backward at the end of forward, bytes of one layer recomputed during backward)."""
    kept = _Kept()
    if gradient_checkpointing:
        # Each checkpointed layer runs without autograd and keeps only its input; the embeddings' output
        # requires grad (peft_edu and PEFT see to it for frozen embeddings), so every layer is recomputed.
        for index in range(shape.num_hidden_layers):
            kept.keep(f"layers.{index}.input", t.tokens * shape.hidden_size, t.element)
        layer = _Kept()
        _decoder_layer(layer, "recomputed", shape, True, t)
        _head(kept, shape, True, t)
        # the rotary tables a recomputed layer keeps are the same two tensors for every layer, alive all along
        return kept.total(), sum(size for name, size in layer.bytes.items() if not name.startswith("rotary."))
    requires_grad = t.full   # a frozen embedding's output does not require grad
    for index in range(shape.num_hidden_layers):
        requires_grad = _decoder_layer(kept, f"layers.{index}", shape, requires_grad, t)
    _head(kept, shape, requires_grad, t)
    return kept.total(), 0


# --- the breakdown --------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryBreakdown:
    """The bytes of a training step, by part; ``total`` adds them up."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int        # kept for backward at the end of the forward pass
    recomputed: int = 0     # one layer's activations, rebuilt during backward under gradient checkpointing

    PARTS = ("weights", "gradients", "optimizer_state", "activations", "recomputed")

    @property
    def total(self) -> int:
        return sum(getattr(self, part) for part in self.PARTS)

    def gib(self) -> dict[str, float]:
        """Each part and the total in GiB (2³⁰ bytes, the unit nvidia-smi and Colab show as GB or GiB)."""
        return {part: getattr(self, part) / 2**30 for part in (*self.PARTS, "total")}


def training_memory(model: ModelShape, method: str, *, dtype: str = "bfloat16", optimizer: str = "adamw",
                    lora_rank: int = 16, lora_targets=LLAMA_LINEARS, batch_size: int = 1, seq_len: int = 512,
                    gradient_checkpointing: bool = False, double_quantisation: bool = True) -> MemoryBreakdown:
    """The memory of one training step of ``model`` (a ``ModelShape``), by part, under the module's assumptions.

    ``method``: "full" (every parameter trains), "lora" (adapters of ``lora_rank`` on ``lora_targets`` of every
    layer, base frozen in ``dtype``) or "qlora" (the same adapters on an NF4 base). ``dtype``: the dtype of the
    weights and of the computation, "float32", "bfloat16" or "float16". ``optimizer``: "adamw" or "sgd".
    ``batch_size`` × ``seq_len`` tokens per step, without padding.
    """
    if not isinstance(model, ModelShape):
        raise TypeError(f"model must be a ModelShape, e.g. MODELS['Llama-3.1-8B'] or ModelShape.from_config(model.config), "
                        f"not {type(model).__name__}.")
    _check_choice("method", method, METHODS)
    _check_choice("dtype", dtype, tuple(DTYPE_BYTES))
    _check_choice("optimizer", optimizer, tuple(OPTIMIZER_MOMENTS))
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("lora_rank", lora_rank)):
        _check_positive_int(name, value)
    for name, value in (("gradient_checkpointing", gradient_checkpointing), ("double_quantisation", double_quantisation)):
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: must be True or False.")
    lora_targets = _check_targets(lora_targets)
    element, moments = DTYPE_BYTES[dtype], OPTIMIZER_MOMENTS[optimizer]
    step_counter = FLOAT32 if optimizer == "adamw" else 0

    if method == "full":
        trainable, tensors = model.parameters(), model.parameter_tensors()
        weights, gradients = trainable * element, trainable * element
        master_copy = trainable * FLOAT32 if element != FLOAT32 else 0   # mixed precision updates float32 weights
    else:   # the adapters (A and B of every targeted layer) train in float32; the base is frozen
        trainable, tensors = lora_parameters(model, lora_rank, lora_targets), 2 * len(lora_targets) * model.num_hidden_layers
        frozen = model.parameters() * element
        if method == "qlora":
            frozen = (math.ceil(model.block_linear_parameters() * nf4_bits_per_parameter(64, double_quantisation) / 8)
                      + (model.embedding_parameters() + model.norm_parameters()) * element)
        weights, gradients, master_copy = frozen + trainable * FLOAT32, trainable * FLOAT32, 0
    optimizer_state = trainable * moments * FLOAT32 + tensors * step_counter + master_copy
    training = _Training(method == "full", frozenset(lora_targets), lora_rank, element, batch_size, seq_len)
    activations, recomputed = _activations(model, training, gradient_checkpointing)
    return MemoryBreakdown(weights, gradients, optimizer_state, activations, recomputed)


# --- several devices ------------------------------------------------------------------------------
SHARDED_PARTS = {"ddp": (), "zero1": ("optimizer_state",), "zero2": ("optimizer_state", "gradients"),
                 "zero3": ("optimizer_state", "gradients", "weights")}


def per_device_memory(memory: MemoryBreakdown, devices: int, strategy: str) -> MemoryBreakdown:
    """One device's memory when ``devices`` devices train data-parallel, each on its own share of the batch.

    ``memory`` is ``training_memory`` at one device's batch. DDP replicates the model, its gradients and its
    optimizer state on every device. ZeRO (arXiv 1910.02054, §5) partitions them instead: stage 1 the optimizer
    state, stage 2 also the gradients, stage 3 also the weights, so each device keeps 1/devices of what is
    partitioned. PyTorch's FSDP (arXiv 2304.11277) is stage 3 (FULL_SHARD) or stage 2 (SHARD_GRAD_OP).
    Activations are never partitioned; what is gathered for one layer at a time is left out.
    """
    if not isinstance(memory, MemoryBreakdown):
        raise TypeError(f"memory must be a MemoryBreakdown (what training_memory returns), not {type(memory).__name__}.")
    _check_positive_int("devices", devices)
    _check_choice("strategy", strategy, tuple(SHARDED_PARTS))
    return MemoryBreakdown(**{part: math.ceil(getattr(memory, part) / devices) if part in SHARDED_PARTS[strategy]
                              else getattr(memory, part) for part in MemoryBreakdown.PARTS})


# --- measuring a real step ------------------------------------------------------------------------
def measure_training_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> MemoryBreakdown:
    """One training step of ``model`` on ``batch``, measured in the tensors themselves.

    Weights: the bytes of every parameter (a tied one once). Gradients: of every ``.grad`` after backward.
    Optimizer state: of every tensor in ``optimizer.state`` after its step. Activations: of every tensor autograd
    saves for backward during the forward pass, seen by ``torch.autograd.graph.saved_tensors_hooks``, each
    storage once (the same tensor saved by several operations, or a view of it, is kept once) and the parameters'
    storages left out (they are counted as weights).
    """
    parameters = list(model.parameters())
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            kept.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor   # holding the tensor keeps its storage alive, so no two kept storages share an address

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    measured = MemoryBreakdown(
        weights=sum(_bytes(p) for p in parameters),
        gradients=sum(_bytes(p.grad) for p in parameters if p.grad is not None),
        optimizer_state=sum(_bytes(value) for state in optimizer.state.values() for value in state.values()
                            if isinstance(value, torch.Tensor)),
        activations=sum(kept.values()))
    optimizer.zero_grad(set_to_none=True)
    return measured


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
