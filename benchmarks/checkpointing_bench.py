"""Gradient checkpointing with every method of the course: the memory it saves and the time it costs.

    python benchmarks/checkpointing_bench.py [--batch-size 4] [--seq-len 128] [--rounds 5] [--methods lora,dora,...]

On SmolLM2-135M (the course's decoder), for each method with transformers' gradient checkpointing off and on
(``use_reentrant`` True, transformers' default):

- **activations**: the bytes autograd keeps for backward during one training forward pass, measured in the tensors
  themselves by ``peft_edu.memory.measure_training_step`` (deterministic: no allocator noise). With checkpointing
  only each layer's input is kept; the recomputation during backward holds one layer's activations at a time,
  which this count leaves out (it is the same for every method).
- **step time**: forward + backward + AdamW step. A method's two variants take steps in turn (plain,
  checkpointed, plain, ...), so background load hits both alike; the ratio checkpointed / plain is the median
  of the per-round ratios. Checkpointing recomputes the forward pass during backward: expect about 1.3 x.

It prints a table and writes ``benchmarks/results/checkpointing_<device>.{json,md}`` with the command, machine,
library versions and date. The gradients themselves are equal with and without checkpointing
(``tests/test_gradient_checkpointing.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

import peft_edu
from peft_edu.assets import load_causal_lm
from peft_edu.memory import measure_training_step

from harness import cpu_name  # noqa: E402 (same folder)

METHODS = {
    "lora": lambda: peft_edu.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "dora": lambda: peft_edu.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True,
                                        task_type="CAUSAL_LM"),
    "ia3": lambda: peft_edu.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"], task_type="CAUSAL_LM"),
    "pfeiffer": lambda: peft_edu.SeqBnConfig(reduction_factor=16),
    "prefix": lambda: peft_edu.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
    "prompt": lambda: peft_edu.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
}
RESULTS = Path(__file__).resolve().parent / "results"


def build(base, method: str, checkpointing: bool, device: str):
    torch.manual_seed(0)
    model = peft_edu.get_peft_model(copy.deepcopy(base), METHODS[method]()).to(device).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")

    transformers.logging.set_verbosity_error()  # "use_cache=True is incompatible with gradient checkpointing": known
    tokenizer, base = load_causal_lm()
    base.config.use_cache = False   # training: no key/value cache (prefix tuning brings its own)
    text = ["Question: what does gradient checkpointing trade? Answer: compute for memory, layer by layer."]
    batch = tokenizer(text * args.batch_size, padding="max_length", max_length=args.seq_len, truncation=True,
                      return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    batch = {k: v.to(args.device) for k, v in batch.items()}

    rows = []
    for m in methods:   # one method at a time: two copies of the model in memory, not twelve
        variants = {c: build(base, m, c, args.device) for c in (False, True)}
        activations = {c: measure_training_step(model, batch, optimizer).activations
                       for c, (model, optimizer) in variants.items()}
        times = {c: [] for c in variants}
        for round_index in range(args.rounds + 1):
            for c, (model, optimizer) in variants.items():
                seconds = step(model, optimizer, batch)
                if round_index:   # round 0 warms up
                    times[c].append(seconds)
        ratios = [c / p for p, c in zip(times[False], times[True])]
        rows.append({"method": m, "activations_plain_bytes": activations[False],
                     "activations_checkpointed_bytes": activations[True],
                     "memory_kept_ratio": activations[True] / activations[False],
                     "step_s_plain_median": statistics.median(times[False]),
                     "step_s_checkpointed_median": statistics.median(times[True]),
                     "time_ratio_median": statistics.median(ratios),
                     "time_ratio_range": [min(ratios), max(ratios)]})
        del variants

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    result = {
        "command": "python benchmarks/checkpointing_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": args.device, "name": device_name, "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "model": "SmolLM2-135M", "batch_size": args.batch_size, "seq_len": args.seq_len, "rounds": args.rounds,
        "rows": rows,
    }
    lines = [f"# Gradient checkpointing on SmolLM2-135M, batch {args.batch_size} x {args.seq_len} tokens ({args.device})",
             "", f"`{result['command']}`, {result['date']}, {device_name}, torch {torch.__version__}, "
             f"transformers {transformers.__version__}, load average {result['machine']['load_average']}", "",
             "| method | activations kept, plain | with checkpointing | kept ratio | step time ratio (median of "
             f"{args.rounds} rounds) | range |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['activations_plain_bytes'] / 2**20:.1f} MiB | "
                     f"{r['activations_checkpointed_bytes'] / 2**20:.1f} MiB | {r['memory_kept_ratio']:.3f} | "
                     f"{r['time_ratio_median']:.2f} x | {r['time_ratio_range'][0]:.2f}-{r['time_ratio_range'][1]:.2f} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"checkpointing_{args.device}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"checkpointing_{args.device}.md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
