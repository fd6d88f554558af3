"""Activation memory kept for backward: LoRA vs DoRA, peft_edu vs PEFT, on the course's real models.

A deterministic measure (no timing, no allocator noise): one training-mode forward pass of a batch, with
``torch.autograd.graph.saved_tensors_hooks`` recording every tensor autograd keeps for backward; the bytes of
the distinct storages are added up (a tensor kept by two operations, e.g. a layer's output that the next
operation also keeps, counts once; parameters are not counted).

    python benchmarks/saved_activations.py [--models minilm,smollm2] [--batch-size 8] [--seq-len 64]

DoRA needs, beyond LoRA, the tensor u = W₀x + s·BAx for the magnitude's gradient. PEFT keeps it (and more);
peft_edu keeps x and Ax, which LoRA keeps anyway, and recomputes u in backward
(``peft_edu.dora.ScaleLinearByMagnitude``), so its DoRA keeps LoRA's bytes plus a few vectors.
"""

from __future__ import annotations

import argparse
import copy
import weakref

import peft
import torch

import peft_edu
from peft_edu.assets import load_causal_lm, load_encoder

MODELS = {
    "minilm": (["query", "key", "value", "dense"], "SEQ_CLS"),
    "smollm2": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "CAUSAL_LM"),
}


def saved_bytes(model, batch) -> int:
    # Parameters are excluded by storage, not by type: autograd often keeps a view of a weight (Wᵀ for a
    # product), which is not an nn.Parameter but is no activation either (as compare_methods.py counts).
    # Counted once the forward is done, among the tensors still alive: a graph that is built and then dropped
    # during the forward (PEFT's DoRA detaches the norm it computed with a graph) keeps nothing for backward, and
    # its freed memory may be reused, so counting at pack time by address would be off, and differ between runs.
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    packed = []

    def pack(tensor):
        packed.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(**batch)
    storages = {}
    for ref in packed:
        tensor = ref()
        if tensor is not None and tensor.untyped_storage().data_ptr() not in param_storages:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    del output
    return sum(storages.values())


def measure(name: str, batch_size: int, seq_len: int) -> dict[str, int]:
    targets, task = MODELS[name]
    tokenizer, base = load_encoder(num_labels=2) if name == "minilm" else load_causal_lm()
    batch = tokenizer(["a short sentence about a film, padded to the length"] * batch_size, padding="max_length",
                      truncation=True, max_length=seq_len, return_tensors="pt")
    batch["labels"] = torch.zeros(batch_size, dtype=torch.long) if task == "SEQ_CLS" else batch["input_ids"].clone()
    results = {}
    for label, library in (("peft_edu", peft_edu), ("PEFT", peft)):
        for use_dora in (False, True):
            config = library.LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=use_dora, task_type=task)
            model = library.get_peft_model(copy.deepcopy(base), config).train()
            results[f"{'DoRA' if use_dora else 'LoRA'}, {label}"] = saved_bytes(model, batch)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in args.models.split(","):
        r = measure(name, args.batch_size, args.seq_len)
        print(f"\n## {name} (batch {args.batch_size} x {args.seq_len} tokens, r=8, targets {', '.join(MODELS[name][0])})\n")
        print("| variant | kept for backward (MB) | × LoRA of the same library |")
        print("|---|---:|---:|")
        for key, value in r.items():
            lora = r[f"LoRA, {key.split(', ')[1]}"]
            print(f"| {key} | {value / 1e6:.1f} | {value / lora:.3f} |")


if __name__ == "__main__":
    main()
