"""The parity kit: what the tests that hold peft_edu against Hugging Face PEFT (and AdapterHub) share.

- Tiny seeded models and padded batches, small enough for 2 CPU cores (``build_tiny``, ``build_batch``;
  conftest.py hands them to tests as the ``tiny_model`` and ``tiny_batch`` fixtures). Each call builds a
  fresh model from a seed, so a test can build the base once and deepcopy it for each library.
- A peft_edu model and a PEFT model from one base (``make_pair``), PEFT's trainable tensors under
  peft_edu's names (``peft_trainable``), new random adapter weights (``randomize_trainable``) and PEFT's
  copied into ours (``copy_peft_into_ours``), or saved by one library for the other to read (``peft_saved``,
  ``ours_saved``).
- Running models and comparing them: ``forward``, ``forward_backward`` (output, loss, gradients),
  ``assert_close`` (float32 agreement), ``assert_same_gradients``, ``assert_same_run`` (both of these, and
  the loss, for a pair of models), ``assert_same_report`` (the
  trainable-parameter line), ``assert_unchanged`` (a failed call left the model as it was).

- 4-bit bases for QLoRA (``tiny_llama_for_4bit``, ``load_in_4bit``). PEFT's custom-model cases (MLPs,
  convolutions, attention) are in ``custom_models.py``.

Imported as ``from parity import ...`` (pytest puts tests/ on sys.path, as for the other helper modules).
"""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import peft
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

import peft_edu
from peft_edu.injection import adapter_modules

# --- tiny models and batches ----------------------------------------------------------------------
VOCAB = 100
PAD_ID = 0
NUM_LABELS = 3


def tiny_bert_config(hidden_size: int = 32, **overrides) -> BertConfig:
    """2 layers, 4 heads, FFN 64, vocabulary 100; ``overrides`` replace any of these."""
    return BertConfig(**{**dict(vocab_size=VOCAB, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64, pad_token_id=PAD_ID,
                                num_labels=NUM_LABELS), **overrides})


def tiny_llama_config(hidden_size: int = 32, **overrides) -> LlamaConfig:
    """2 layers, 4 query heads and 2 key/value heads (grouped-query attention), FFN 64, vocabulary 100."""
    return LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 pad_token_id=PAD_ID, num_labels=NUM_LABELS), **overrides})


# kind -> (config factory, model class, task family)
KINDS = {
    "bert": (tiny_bert_config, BertModel, "features"),
    "bert_cls": (tiny_bert_config, BertForSequenceClassification, "cls"),
    "llama": (tiny_llama_config, LlamaForCausalLM, "lm"),
    "llama_cls": (tiny_llama_config, LlamaForSequenceClassification, "cls"),
}


def build_tiny(kind: str, seed: int = 0, hidden_size: int = 32, **config_overrides) -> torch.nn.Module:
    """A freshly initialised tiny model (see KINDS), in eval mode, same weights for the same seed."""
    make_config, cls, _ = KINDS[kind]
    torch.manual_seed(seed)
    return cls(make_config(hidden_size, **config_overrides)).eval()


def build_batch(kind: str, batch: int = 3, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded batch (rows 1 and 2 end in padding) with labels that fit ``kind``."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for row, length in ((1, seq - 3), (2, seq // 2)):
        if row < batch:
            attention_mask[row, length:] = 0
    input_ids[attention_mask == 0] = PAD_ID
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    family = KINDS[kind][2]
    if family == "cls":
        out["labels"] = torch.randint(0, NUM_LABELS, (batch,), generator=g)
    elif family == "lm":
        out["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    return out


# --- two libraries, one base model ----------------------------------------------------------------
def make_pair(base, method: str, seed: int = 1, **config):
    """(peft_edu model, PEFT model) from two copies of ``base``, each with its library's ``method`` config class
    (e.g. "LoraConfig") of ``config``, injected from the same RNG state. Each gets its own copy of ``config``:
    PEFT fills in defaults in the lists it is given."""
    torch.manual_seed(seed)
    ours = peft_edu.get_peft_model(copy.deepcopy(base), getattr(peft_edu, method)(**copy.deepcopy(config)))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, method)(**copy.deepcopy(config)))
    return ours, theirs


def pair_maker(method: str, **defaults) -> Callable:
    """``make_pair(base, seed=1, **config)`` for one method, with ``defaults`` under ``config``."""
    def make(base, seed: int = 1, **config):
        return make_pair(base, method, seed=seed, **{**defaults, **config})
    make.__doc__ = f"(peft_edu model, PEFT model) with {method}(**{{**{defaults}, **config}}): see parity.make_pair."
    return make


def trainable(model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def ours_name(peft_name: str, prompt_learning: bool = False) -> str:
    """A PEFT parameter name in peft_edu's spelling. PEFT keeps the base model under ``base_model.model.`` (a
    tuner: LoRA, DoRA, IA³) or ``base_model.`` (prompt learning), and names each adapter tensor after its
    adapter, "default": ``X.lora_A.default.weight`` is our ``X.lora_A.weight``, ``X.ia3_l.default`` our
    ``X.ia3_l``, ``X.lora_magnitude_vector.default.weight`` our ``X.lora_magnitude_vector``,
    ``prompt_encoder.default.embedding.weight`` our ``prompt_encoder.embedding.weight`` and a trained head's
    ``classifier.modules_to_save.default.weight`` our ``classifier.modules_to_save.weight``."""
    name = peft_name.removeprefix("base_model." if prompt_learning else "base_model.model.")
    name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
    return name.replace(".default.", ".").removesuffix(".default")


def peft_trainable(model) -> dict[str, nn.Parameter]:
    """A PEFT model's trainable tensors under peft_edu's names (see ``ours_name``)."""
    prompt_learning = model.active_peft_config.is_prompt_learning
    return {ours_name(n, prompt_learning): p for n, p in trainable(model).items()}


@torch.no_grad()
def randomize(tensors: dict[str, torch.Tensor], seed: int = 0, std: float = 0.5, draw: Callable | None = None):
    """New values for ``tensors``, in name order, from one seeded generator: N(0, std²), or where ``draw`` is given
    ``draw(name, tensor, noise)`` with noise ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(tensors.items()):
        noise = torch.randn(p.shape, generator=g)
        p.copy_(noise * std if draw is None else draw(name, p, noise))


def randomize_trainable(model, seed: int = 0, std: float = 0.5, draw: Callable | None = None):
    """``randomize`` every trainable tensor of ``model`` (by its own names: PEFT's for a PEFT model)."""
    randomize(trainable(model), seed=seed, std=std, draw=draw)


@torch.no_grad()
def copy_peft_into_ours(theirs, ours):
    """PEFT's trainable tensors into the peft_edu model; both must train the same tensors."""
    mine, theirs_mapped = trainable(ours), peft_trainable(theirs)
    assert set(theirs_mapped) == set(mine), "peft_edu and PEFT train different tensors"
    for name, p in theirs_mapped.items():
        mine[name].copy_(p)


def peft_saved(base, config, directory, randomize: Callable):
    """PEFT's adapter of ``config`` (a peft config) on a copy of ``base``, its weights set by ``randomize(model)``,
    saved to ``directory``; returns the PEFT model, in eval mode."""
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    randomize(theirs)
    theirs.eval()
    theirs.save_pretrained(directory)
    return theirs


def ours_saved(base, config, directory, randomize: Callable):
    """The same with peft_edu: its adapter of ``config`` (a peft_edu config), saved with peft_edu.save_adapter."""
    ours = peft_edu.get_peft_model(copy.deepcopy(base), config)
    randomize(ours)
    ours.eval()
    peft_edu.save_adapter(ours, directory)
    return ours


def layers_of(model, kind: type) -> dict[str, nn.Module]:
    """The modules of type ``kind`` (an adapter layer class), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def has_adapter_parts(model) -> bool:
    """Whether any module that peft_edu puts into a model is there: an adapted layer, a trained copy of a head, a
    prompt encoder (every ``AdapterModule``, whatever its method)."""
    return bool(adapter_modules(model))


# --- running and comparing -------------------------------------------------------------------------
def output_of(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def loss_of(out, batch):
    """The model's loss, or for a BertModel (no labels) one over the real tokens' features and the pooler (which
    "dense" targets too). The real tokens are the last T positions: prompt tuning puts its n in front."""
    if getattr(out, "loss", None) is not None:
        return out.loss
    mask = batch["attention_mask"].unsqueeze(-1)
    return (out.last_hidden_state[:, -mask.shape[1]:] * mask).pow(2).mean() + out.pooler_output.sum()


def forward(model, batch):
    with torch.no_grad():
        return output_of(model(**batch))


class Run(NamedTuple):
    output: torch.Tensor
    loss: torch.Tensor
    grads: dict[str, torch.Tensor | None]


def forward_backward(model, batch, seed: int | None = None, named: Callable | None = None) -> Run:
    """Run ``model`` on ``batch`` (after torch.manual_seed(seed) if given: dropout) and back-propagate ``loss_of``:
    the output, the loss and the gradient of every trainable tensor, by the names ``named(model)`` gives
    (default: peft_edu's names, mapped from PEFT's for a PEFT model)."""
    for p in model.parameters():
        p.grad = None
    if seed is not None:
        torch.manual_seed(seed)
    out = model(**batch)
    loss = loss_of(out, batch)
    loss.backward()
    if named is None:
        named = peft_trainable if isinstance(model, peft.PeftModel) else trainable
    return Run(output_of(out).detach(), loss.detach(), {n: p.grad for n, p in named(model).items()})


def assert_close(actual, expected, rel=1e-6):
    """float32 agreement: atol relative to the tensor's scale."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=rel * scale)


def assert_same_gradients(grads_ours: dict, grads_theirs: dict, rel=1e-6):
    """The same tensors get gradients, none of them zero (else the comparison would prove nothing), equal to
    ``rel`` (see assert_close)."""
    assert set(grads_ours) == set(grads_theirs)
    for name, g in grads_theirs.items():
        assert g is not None and grads_ours[name] is not None, name
        assert g.abs().sum() > 0, f"{name}: zero gradient, the test would prove nothing"
        assert_close(grads_ours[name], g, rel=rel)


def assert_same_run(ours, theirs, batch, base=None, seed: int | None = None, named_theirs: Callable | None = None,
                    rel=1e-6) -> Run:
    """Run both models on ``batch`` (``forward_backward``, each after the same ``seed``): the same output and loss,
    and the same non-zero gradients (``assert_same_gradients``); with ``base``, an output that is not the base
    model's (else the equality would prove little). Returns our run."""
    run_ours = forward_backward(ours, batch, seed=seed)
    run_theirs = forward_backward(theirs, batch, seed=seed, named=named_theirs)
    assert_close(run_ours.output, run_theirs.output, rel=rel)
    assert_close(run_ours.loss, run_theirs.loss, rel=rel)
    if base is not None:
        assert not torch.allclose(run_ours.output, forward(base, batch), atol=1e-3)
    assert_same_gradients(run_ours.grads, run_theirs.grads, rel=rel)
    return run_ours


REPORT_LINE = r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}\n"


def assert_same_report(ours, theirs, capsys) -> str:
    """peft_edu.print_trainable_parameters(ours) prints the line PEFT prints for ``theirs``; returns that line."""
    capsys.readouterr()
    peft_edu.print_trainable_parameters(ours)
    line_ours = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert line_ours == capsys.readouterr().out
    return line_ours


def assert_unchanged(model, base, batch):
    """A call that failed left ``model`` as it was (``base``): no adapter parts, no peft_edu config, every parameter
    trainable, the base model's output."""
    assert not has_adapter_parts(model) and not hasattr(model, "peft_edu_config")
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(forward(model, batch), forward(base, batch))


# --- 4-bit bases (QLoRA) ----------------------------------------------------------------------------------
def tiny_llama_for_4bit(seed: int = 0) -> nn.Module:
    """A tiny Llama whose linear layers all have rows of a whole number of 64-blocks (hidden 64, FFN 128):
    bitsandbytes 0.50.2's AVX-512 CPU kernel dequantises shorter rows with the wrong absmax (see test_quantization)."""
    return build_tiny("llama", seed=seed, hidden_size=64, intermediate_size=128)


def load_in_4bit(folder, fused_cpu_kernel: bool = False) -> nn.Module:
    """The model saved in ``folder`` loaded by transformers with bitsandbytes' NF4 and double quantisation, float32
    compute, on CPU, in eval mode (the QLoRA set-up). Without ``fused_cpu_kernel``, its Linear4bit layers always
    dequantise and multiply in float32: on a CPU with AVX-512 BF16, bitsandbytes otherwise switches a layer in eval
    mode whose input needs no gradient to a fused kernel that computes in bfloat16."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32,
                                                 device_map="cpu", local_files_only=True).eval()
    if not fused_cpu_kernel:
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def assert_base_restored(ours, base) -> None:
    """After unmerge, every frozen weight of ``ours`` is the base model's again (up to rounding)."""
    originals = dict(base.named_parameters())
    for name, param in ours.named_parameters():
        if "base_layer." in name or "original_module." in name:
            assert_close(param, originals[name.replace("base_layer.", "").replace("original_module.", "")], rel=1e-5)
