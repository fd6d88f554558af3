"""The "Choosing a method" chapter's methods on a decoder: what each trains, and what a training step costs.

The chapter measures every method on MiniLM, an encoder (Section 3). This script builds the same methods, with the
same ranks, reductions and virtual tokens, on SmolLM2-135M-Instruct, a Llama-style decoder, and measures on one batch
of the question-answer pairs (8 pairs of at most 64 tokens: the 512 token positions of the encoder's batch of 16
sentences of 32) what the chapter measures there:

- where each method trains: the modules of the first layer that hold trained parameters, and what trains outside
  the layers (a prefix's or a prompt's parameters);
- the trainable parameters, as a share of the whole model;
- the memory of one training step, in the tensors themselves (``peft_edu.memory.measure_training_step``);
- the floating-point operations of a training step and of inference (``peft_edu.training.count_flops``).

Every number is a count of parameters, bytes or operations, so it is the same on every run and every machine with
these library versions; only the wall time of the script varies. It takes a few minutes on 2 CPU cores (a training
step of the fully trained 135M-parameter model on 512 positions is about 0.4 TFLOP), more than a page may take to
build, so the chapter reads the recording and re-measures one method live, asserting equality.

    OMP_NUM_THREADS=2 python benchmarks/decoder_costs.py --out benchmarks/results/decoder_costs_cpu
    python benchmarks/decoder_costs.py --quick --out /tmp/decoder_quick   # 2 methods on 2 pairs of 16 tokens
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time

import torch

import peft_edu
from peft_edu.assets import load_causal_lm, load_qa_pairs
from peft_edu.memory import measure_training_step
from peft_edu.training import count_flops

BATCH = {"pairs": 8, "max length": 64}
QUICK_BATCH = {"pairs": 2, "max length": 16}
QUICK_METHODS = ("LoRA r=8", "P-tuning v2")

# The chapter's methods (benchmarks/choosing_recorded.py, METHODS) as they are written for a Llama-style decoder:
# LoRA's query and value projections are q_proj and v_proj there; IA³ and the adapters find their places from the
# model type. A causal LM has no new head to train (its output layer is the pretrained one, tied to the input
# embeddings), so "head only" has no counterpart.
LORA = dict(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
PREFIX = dict(task_type="CAUSAL_LM", num_virtual_tokens=20)
METHODS = {
    "full fine-tuning": lambda: None,
    "LoRA r=8": lambda: peft_edu.LoraConfig(**LORA),
    "rsLoRA r=64": lambda: peft_edu.LoraConfig(**dict(LORA, r=64, use_rslora=True)),
    "DoRA r=8": lambda: peft_edu.LoraConfig(**dict(LORA, use_dora=True)),
    "IA³": lambda: peft_edu.IA3Config(task_type="CAUSAL_LM"),
    "Houlsby": lambda: peft_edu.DoubleSeqBnConfig(reduction_factor=16, task_type="CAUSAL_LM"),
    "Pfeiffer": lambda: peft_edu.SeqBnConfig(reduction_factor=16, task_type="CAUSAL_LM"),
    "parallel": lambda: peft_edu.ParBnConfig(reduction_factor=2, scaling=1.0, task_type="CAUSAL_LM"),
    "prefix tuning (MLP)": lambda: peft_edu.PrefixTuningConfig(**PREFIX, prefix_projection=True,
                                                               encoder_hidden_size=512),
    "P-tuning v2": lambda: peft_edu.PrefixTuningConfig(**PREFIX),
    "prompt tuning": lambda: peft_edu.PromptTuningConfig(**PREFIX),
    "mix-and-match": lambda: peft_edu.MAMConfig(adapter=peft_edu.ParBnConfig(scaling=1.0), task_type="CAUSAL_LM"),
}

_METHOD_PART = re.compile(r"\.(?:lora_|adapter_|ia3_)")   # where a method's own parameter begins in a name
_IN_A_LAYER = re.compile(r"\.layers?\.(\d+)\.(.+)")        # BERT: encoder.layer.3.…; Llama: model.layers.3.…


def where_trained(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(the modules of the first layer that hold trained parameters, the top-level modules trained outside the
    layers). A method's own parameters count for the module they adapt: ``self_attn.q_proj.lora_A.weight`` is
    ``self_attn.q_proj``."""
    inside, outside = {}, {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = _IN_A_LAYER.search(name)
        path = layer.group(2) if layer else name
        host = _METHOD_PART.split(path)[0] if _METHOD_PART.search(path) else path.rsplit(".", 1)[0]
        if layer is None:
            outside[host.split(".")[0] if host.startswith(("prompt_encoder", "classifier")) else host] = True
        elif layer.group(1) == "0":
            inside[host] = True
    return list(inside), list(outside)


def qa_batch(tokenizer, pairs: int, max_length: int) -> dict:
    """The first ``pairs`` training pairs in the chat template, the loss on every real token."""
    rows = load_qa_pairs()["train"].select(range(pairs))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                           tokenize=False) for q, a in zip(rows["question"], rows["answer"])]
    batch = dict(tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _inference_flops(model, inputs) -> int:
    model.eval()
    with torch.no_grad():
        return count_flops(lambda: model(**inputs))


def measure(name: str, base: torch.nn.Module, batch: dict) -> dict:
    """Method ``name`` on a copy of ``base``: where it trains, its trainable parameters, the bytes of a training
    step, and the operations of a step and of inference (relative to ``base``'s)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; the methods are: {', '.join(METHODS)}")
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    model = copy.deepcopy(base)
    config = METHODS[name]()
    if config is not None:
        model = peft_edu.get_peft_model(model, config)
    trainable, total = peft_edu.count_parameters(model)
    inside, outside = where_trained(model)
    model.train()
    step_flops = count_flops(lambda: model(**batch).loss.backward())
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    memory = measure_training_step(model, batch, optimizer)
    return {"method": name, "trains in the first layer": inside, "trains outside the layers": outside,
            "trainable parameters": trainable, "all parameters": total,
            "step memory (bytes)": memory.total, "weights (bytes)": memory.weights,
            "gradients + AdamW (bytes)": memory.gradients + memory.optimizer_state,
            "activations (bytes)": memory.activations, "step FLOP": step_flops,
            "inference FLOP": _inference_flops(model, inputs)}


def markdown(recording: dict) -> str:
    rows = recording["methods"]
    full = next((row for row in rows if row["method"] == "full fine-tuning"), None)
    lines = ["# The chapter's methods on a decoder: SmolLM2-135M-Instruct", "",
             f"`{recording['command']}`, {recording['date']}; {recording['machine']['cpu']}; "
             + ", ".join(f"{k} {v}" for k, v in recording["versions"].items()) + ".", "",
             f"One batch: {recording['batch']['pairs']} question-answer pairs padded to {recording['batch']['max length']}"
             " tokens. Counts, not timings: the same on every run with these versions.", "",
             "| method | trains in the first layer | outside the layers | trainable | trainable % | step memory (MB) "
             "| step GFLOP | step / full fine-tuning | inference / base |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        ratio = f"{row['step FLOP'] / full['step FLOP']:.3f}" if full else ""
        lines.append(f"| {row['method']} | {', '.join(row['trains in the first layer'])} "
                     f"| {', '.join(row['trains outside the layers'])} | {row['trainable parameters']:,} "
                     f"| {100 * row['trainable parameters'] / row['all parameters']:.3f} "
                     f"| {row['step memory (bytes)'] / 1e6:.0f} | {row['step FLOP'] / 1e9:.1f} | {ratio} "
                     f"| {row['inference FLOP'] / recording['base inference FLOP']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="path without extension: writes .json and .md")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: {', '.join(QUICK_METHODS)} on {QUICK_BATCH['pairs']} pairs of "
                             f"{QUICK_BATCH['max length']} tokens")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from choosing_recorded import versions  # same folder
    from harness import cpu_name, write_report

    shape = QUICK_BATCH if args.quick else BATCH
    names = QUICK_METHODS if args.quick else tuple(METHODS)
    start = time.perf_counter()
    tokenizer, base = load_causal_lm()
    batch = qa_batch(tokenizer, shape["pairs"], shape["max length"])
    rows = []
    for name in names:
        rows.append(measure(name, base, batch))
        print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    recording = {
        "command": "python benchmarks/decoder_costs.py " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "wall_time_s": time.perf_counter() - start},
        "versions": versions(), "batch": dict(shape, quick=args.quick),
        "config": {"num_hidden_layers": base.config.num_hidden_layers, "hidden_size": base.config.hidden_size,
                   "num_attention_heads": base.config.num_attention_heads,
                   "num_key_value_heads": base.config.num_key_value_heads,
                   "head_dim": base.config.hidden_size // base.config.num_attention_heads,
                   "intermediate_size": base.config.intermediate_size},
        "base inference FLOP": _inference_flops(base, {k: v for k, v in batch.items() if k != "labels"}),
        "methods": rows,
    }
    write_report(args.out + ".md", markdown(recording).rstrip("\n"), recording)   # and args.out + ".json"
    return recording


if __name__ == "__main__":
    main()
