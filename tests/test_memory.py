"""``peft_edu.memory``: the arithmetic of a training step's memory, checked against published sizes and measurements.

Parameter counts from the shapes are compared with the published models' totals and with real (tiny) transformers
models; LoRA's count with ``peft_edu.count_parameters``; weights, gradients and AdamW's state with the tensors of a
real step (``measure_training_step``); the activations with the bytes autograd saves, for full fine-tuning and
LoRA on several targets, in float32 and bfloat16, with and without gradient checkpointing; the recomputed layer
with what backward saves again; NF4's bits with what bitsandbytes stores; ZeRO's stages with its Figure 1.

A bfloat16 model under ``torch.optim.AdamW`` keeps bfloat16 moments and no master copy (not mixed precision), so
in bfloat16 only the weights, gradients and activations are compared with a measurement.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peft_edu
from peft_edu.memory import (LLAMA_LINEARS, MODELS, NOMINAL_PARAMETERS, MemoryBreakdown, ModelShape, lora_parameters,
                             measure_training_step, nf4_bits_per_parameter, per_device_memory, training_memory)

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")

BATCH, SEQ = 3, 10
TARGET_SETS = [LLAMA_LINEARS, ("q_proj", "v_proj"), ("down_proj",), ("o_proj", "up_proj"), ("k_proj",), ("gate_proj",)]


def tiny_config(tied: bool = False) -> LlamaConfig:
    """Grouped key/value heads (6 heads, 2 kv heads) and an intermediate width unlike the hidden one."""
    config = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, tie_word_embeddings=tied, use_cache=False)
    config._attn_implementation = "sdpa"
    return config


def tiny_model(method: str, dtype=torch.float32, targets=LLAMA_LINEARS, rank: int = 3, tied: bool = False):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tied)).to(dtype)
    if method == "lora":
        model = peft_edu.get_peft_model(model, peft_edu.LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank,
                                                                   target_modules=list(targets)))
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()   # float32 adapters, as PEFT's autocast_adapter_dtype makes them
    return model.train()


def tiny_batch() -> dict:
    ids = torch.randint(0, 300, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


# --- the shapes -----------------------------------------------------------------------------------
def test_parameter_counts_of_the_published_models():
    """The totals of the models' safetensors files (8.03 B, 70.6 B, ...) and within 1 % of the size in the name."""
    expected = {"SmolLM2-135M": 134_515_008, "SmolLM2-1.7B": 1_711_376_384, "Llama-3.1-8B": 8_030_261_248,
                "Llama-3.1-70B": 70_553_706_496}
    assert {name: shape.parameters() for name, shape in MODELS.items()} == expected
    for name, shape in MODELS.items():
        assert abs(shape.parameters() / NOMINAL_PARAMETERS[name] - 1) < 0.01, name


@pytest.mark.parametrize("tied", [True, False])
def test_counts_from_the_shapes_equal_a_real_model(tied):
    model = LlamaForCausalLM(tiny_config(tied))
    shape = ModelShape.from_config(model.config, "tiny")
    assert (shape.num_key_value_heads, shape.head_dim, shape.tie_word_embeddings) == (2, 8, tied)
    assert shape.parameters() == sum(p.numel() for p in model.parameters())
    assert shape.parameter_tensors() == len(list(model.parameters()))
    linears = sum(m.weight.numel() for name, m in model.named_modules() if name.split(".")[-1] in LLAMA_LINEARS)
    assert shape.block_linear_parameters() == linears


@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: "+".join(t))
@pytest.mark.parametrize("rank", [1, 4])
def test_lora_count_equals_count_parameters(targets, rank):
    model = tiny_model("lora", targets=targets, rank=rank)
    assert lora_parameters(ModelShape.from_config(model.config), rank, targets) == peft_edu.count_parameters(model)[0]


@pytest.mark.slow
def test_smollm2_shape_is_its_config_and_lora_count_is_count_parameters():
    from peft_edu.assets import load_causal_lm

    _, model = load_causal_lm()
    shape = ModelShape.from_config(model.config, "SmolLM2-135M")
    assert shape == MODELS["SmolLM2-135M"]
    assert shape.parameters() == sum(p.numel() for p in model.parameters())
    lora = peft_edu.get_peft_model(model, peft_edu.LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"]))
    assert lora_parameters(shape, 8, ["q_proj", "v_proj"]) == peft_edu.count_parameters(lora)[0] == 30 * 8 * (1152 + 768)


# --- the arithmetic -------------------------------------------------------------------------------
def test_bytes_per_parameter_of_full_fine_tuning():
    """16 bytes per parameter in 16-bit mixed precision (2 + 2 + 12), 4 + 4 + 8 in float32, plus AdamW's step counters."""
    shape = MODELS["Llama-3.1-8B"]
    n, counters = shape.parameters(), 4 * shape.parameter_tensors()
    mixed = training_memory(shape, "full", dtype="bfloat16")
    assert (mixed.weights, mixed.gradients, mixed.optimizer_state) == (2 * n, 2 * n, 12 * n + counters)
    single = training_memory(shape, "full", dtype="float32")
    assert (single.weights, single.gradients, single.optimizer_state) == (4 * n, 4 * n, 8 * n + counters)
    sgd = training_memory(shape, "full", dtype="float32", optimizer="sgd")
    assert sgd.optimizer_state == 0


def test_lora_and_qlora_weights_and_adam_state():
    shape = MODELS["Llama-3.1-8B"]
    trainable = lora_parameters(shape, 16)
    assert trainable == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 2 * (4096 + 14336) + (14336 + 4096))
    lora = training_memory(shape, "lora", dtype="bfloat16", lora_rank=16)
    tensors = 2 * 7 * 32
    assert lora.weights == 2 * shape.parameters() + 4 * trainable
    assert (lora.gradients, lora.optimizer_state) == (4 * trainable, 2 * 4 * trainable + 4 * tensors)
    qlora = training_memory(shape, "qlora", dtype="bfloat16", lora_rank=16)
    frozen_16_bit = 2 * (shape.embedding_parameters() + shape.norm_parameters())
    assert qlora.weights == shape.block_linear_parameters() * 4.126953125 / 8 + frozen_16_bit + 4 * trainable
    plain = training_memory(shape, "qlora", dtype="bfloat16", lora_rank=16, double_quantisation=False)
    assert plain.weights == shape.block_linear_parameters() * 4.5 / 8 + frozen_16_bit + 4 * trainable
    assert qlora.activations == lora.activations and qlora.optimizer_state == lora.optimizer_state


def test_nf4_bits_per_parameter():
    assert nf4_bits_per_parameter(64, False) == 4.5
    assert nf4_bits_per_parameter(64, True) == 4 + 8 / 64 + 32 / (64 * 256) == pytest.approx(4.127, abs=5e-4)
    assert nf4_bits_per_parameter(128, True, 128) == 4 + 8 / 128 + 32 / (128 * 128)


@pytest.mark.parametrize("double", [False, True])
def test_nf4_bits_are_what_bitsandbytes_stores(double):
    """bitsandbytes' packed codes and absmax constants (and, double quantised, the second-level ones) for a SmolLM2-
    shaped weight; the per-tensor code tables and offset (a few hundred bytes) are left out, as the docstring says."""
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(1536, 576)
    codes, state = functional.quantize_4bit(weight, quant_type="nf4", blocksize=64, compress_statistics=double)
    stored = [codes, state.absmax] + ([state.state2.absmax] if double else [])
    assert sum(t.numel() * t.element_size() for t in stored) * 8 == nf4_bits_per_parameter(64, double) * weight.numel()


# --- measured: weights, gradients, optimizer state, activations -----------------------------------
CASES = [("full", LLAMA_LINEARS)] + [("lora", targets) for targets in TARGET_SETS]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method, targets", CASES, ids=[f"{m}-{'+'.join(t)}" for m, t in CASES])
def test_prediction_equals_a_measured_step(method, targets, dtype, checkpointing):
    model = tiny_model(method, getattr(torch, dtype), targets)
    if checkpointing:
        model.gradient_checkpointing_enable()
    measured = measure_training_step(model, tiny_batch(), adamw(model))
    predicted = training_memory(ModelShape.from_config(model.config), method, dtype=dtype, lora_rank=3, lora_targets=targets,
                                batch_size=BATCH, seq_len=SEQ, gradient_checkpointing=checkpointing)
    assert (predicted.weights, predicted.gradients, predicted.activations) == \
        (measured.weights, measured.gradients, measured.activations)
    if dtype == "float32":
        assert predicted.optimizer_state == measured.optimizer_state
    assert (predicted.recomputed > 0) == checkpointing


@pytest.mark.parametrize("tied", [True, False])
def test_tied_or_untied_head_full_fine_tuning(tied):
    model = tiny_model("full", tied=tied)
    measured = measure_training_step(model, tiny_batch(), adamw(model))
    predicted = training_memory(ModelShape.from_config(model.config), "full", dtype="float32", batch_size=BATCH, seq_len=SEQ)
    assert predicted == measured


@pytest.mark.parametrize("method", ["full", "lora"])
def test_recomputed_layer_is_what_backward_saves_again(method):
    """Under checkpointing, backward recomputes every layer: it saves L × ``recomputed`` bytes, plus the two rotary
    tables that every recomputed layer saves again (the same tensors, alive all along)."""
    model = tiny_model(method, targets=("q_proj", "down_proj"))
    model.gradient_checkpointing_enable()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, held = {}, []

    def pack(tensor):
        held.append(tensor)   # keep every saved tensor alive, so that no address is reused by the next layer
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    loss = model(**tiny_batch()).loss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss.backward()
    shape = ModelShape.from_config(model.config)
    predicted = training_memory(shape, method, dtype="float32", lora_rank=3, lora_targets=["q_proj", "down_proj"],
                                batch_size=BATCH, seq_len=SEQ, gradient_checkpointing=True)
    rotary_tables = 2 * SEQ * shape.head_dim * 4
    assert sum(saved.values()) == shape.num_hidden_layers * predicted.recomputed + rotary_tables


def test_checkpointing_keeps_the_layer_inputs_and_the_head():
    shape = MODELS["SmolLM2-135M"]
    plain, checkpointed = (training_memory(shape, "lora", dtype="float32", batch_size=2, seq_len=64,
                                           gradient_checkpointing=flag) for flag in (False, True))
    tokens, h = 2 * 64, shape.hidden_size
    head = tokens * (h + 1) * 4 + tokens * shape.vocab_size * 4 + tokens * 8 + 4   # final norm, log-softmax, targets
    assert checkpointed.activations == shape.num_hidden_layers * tokens * h * 4 + head
    assert checkpointed.activations < plain.activations / 3


def test_measurement_counts_a_shared_storage_once():
    """q and k keep the same input, v keeps a view of it: one storage, counted once."""
    class ThreeProjections(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            return SimpleNamespace(loss=(self.q(x) + self.k(x)).sum() + self.v(x[:2]).sum())

    model, x = ThreeProjections(), torch.randn(8, 4, requires_grad=True)
    measured = measure_training_step(model, {"x": x}, torch.optim.SGD(model.parameters(), lr=0.1))
    assert measured.activations == x.numel() * 4


# --- several devices ------------------------------------------------------------------------------
def test_per_device_memory_reproduces_zero_figure_1():
    psi = 7.5e9
    states = MemoryBreakdown(weights=int(2 * psi), gradients=int(2 * psi), optimizer_state=int(12 * psi), activations=0)
    per_device = {s: round(per_device_memory(states, 64, s).total / 1e9, 1) for s in ("ddp", "zero1", "zero2", "zero3")}
    assert per_device == {"ddp": 120.0, "zero1": 31.4, "zero2": 16.6, "zero3": 1.9}


def test_per_device_memory_never_shards_activations():
    step = training_memory(MODELS["Llama-3.1-8B"], "lora", batch_size=2, seq_len=256, gradient_checkpointing=True)
    sharded = per_device_memory(step, 8, "zero3")
    assert (sharded.activations, sharded.recomputed) == (step.activations, step.recomputed)
    assert sharded.weights == -(-step.weights // 8)
    assert per_device_memory(step, 8, "ddp") == step


# --- bad input ------------------------------------------------------------------------------------
BAD_CALLS = [
    (lambda: training_memory(MODELS["Llama-3.1-8B"], "dora"), r"method='dora'.*'full', 'lora', 'qlora'"),
    (lambda: training_memory(MODELS["Llama-3.1-8B"], "full", dtype="fp16"), r"dtype='fp16'.*'float16'"),
    (lambda: training_memory(MODELS["Llama-3.1-8B"], "full", optimizer="adam"), r"optimizer='adam'.*'adamw', 'sgd'"),
    (lambda: training_memory(MODELS["Llama-3.1-8B"], "full", batch_size=0), r"batch_size=0: must be a positive int"),
    (lambda: training_memory(MODELS["Llama-3.1-8B"], "full", seq_len=2.5), r"seq_len=2.5: must be a positive int"),
    (lambda: training_memory(MODELS["Llama-3.1-8B"], "lora", lora_rank=True), r"lora_rank=True: must be a positive int"),
    (lambda: training_memory(MODELS["Llama-3.1-8B"], "lora", lora_targets=["query"]), r"lora_targets=\['query'\].*q_proj"),
    (lambda: training_memory(MODELS["Llama-3.1-8B"], "lora", lora_targets="q_proj"), r"lora_targets='q_proj': a non-empty list"),
    (lambda: training_memory(MODELS["Llama-3.1-8B"], "lora", lora_targets=[]), r"lora_targets=\[\]: a non-empty list"),
    (lambda: training_memory(MODELS["Llama-3.1-8B"], "full", gradient_checkpointing="yes"),
     r"gradient_checkpointing='yes': must be True or False"),
    (lambda: training_memory(8_000_000_000, "full"), r"model must be a ModelShape, e\.g\. MODELS\['Llama-3\.1-8B'\]"),
    (lambda: ModelShape("x", 2, 64, 128, 6, 4, 100, False), r"num_attention_heads=6 is not a multiple of num_key_value_heads=4"),
    (lambda: ModelShape("x", 0, 64, 128, 8, 4, 100, False), r"num_hidden_layers=0: must be a positive int"),
    (lambda: ModelShape("x", 2, 64, 128, 8, 4, 100, "no"), r"tie_word_embeddings='no' True or False"),
    (lambda: ModelShape.from_config(LlamaConfig(attention_bias=True)), r"biases in its linear layers"),
    (lambda: per_device_memory(training_memory(MODELS["SmolLM2-135M"], "full"), 8, "fsdp"), r"strategy='fsdp'.*'zero3'"),
    (lambda: per_device_memory(training_memory(MODELS["SmolLM2-135M"], "full"), 0, "ddp"), r"devices=0: must be a positive int"),
    (lambda: per_device_memory(5, 8, "ddp"), r"memory must be a MemoryBreakdown"),
    (lambda: nf4_bits_per_parameter(0), r"blocksize=0: must be a positive int"),
    (lambda: lora_parameters(MODELS["SmolLM2-135M"], -1), r"rank=-1: must be a positive int"),
]


@pytest.mark.parametrize("call, message", BAD_CALLS, ids=[str(i) for i in range(len(BAD_CALLS))])
def test_bad_input_is_refused_with_what_would_be_valid(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
