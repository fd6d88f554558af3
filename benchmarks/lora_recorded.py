"""The seed sweep of the LoRA chapter, recorded: head only, LoRA r=8 and full fine-tuning, 3 seeds, at its CPU settings.

The chapter (notebooks/lora.ipynb, Section 5) trains each of three methods with three seeds; on a CPU those nine runs
take longer than a page may take to build. This script is that experiment, and the chapter imports its settings,
methods and ``run_one`` (one source for both): on a CPU the page trains the first seed of every method live, reads the
other seeds from this recording, and asserts that its live seed agrees with the recorded one. Each run records its
test accuracy, steps, training time and parameter counts; each full fine-tuning run also records what Section 6
computes from its update of the query projections, the share of each layer's update's energy in its top 8 directions.

    OMP_NUM_THREADS=1 python benchmarks/lora_recorded.py --out benchmarks/results/lora_polarity_cpu

``--quick`` trains on a few sentences for a few steps (for the tests; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time

import torch

import peft_edu
from peft_edu.assets import load_encoder, load_polarity
from peft_edu.training import classification_loaders, set_seed, train

SEEDS = (0, 1, 2)
BATCH_SIZE = 16
# A CPU: one pass over the first 960 training sentences, at most 32 tokens each (the recorded settings).
CPU_SETTINGS = {"epochs": 1, "limit": {"train": 960}, "max_length": 32}
# A GPU (the chapter's FULL_RUN, trained live and never recorded): all 3,200 training sentences, 4 epochs.
FULL_RUN_SETTINGS = {"epochs": 4, "limit": None, "max_length": 64}
# --quick, for the tests: 2 steps, scored on 32 test sentences.
QUICK_SETTINGS = {"epochs": 1, "limit": {"train": 2 * BATCH_SIZE, "test": 32}, "max_length": 16}
TOP_K = 8  # Section 6: how much of full fine-tuning's update a rank-8 matrix could hold
TOP_K_SHARES = f"top-{TOP_K} energy share by layer"  # the key of that number in a full fine-tuning run's record


def head_only(model):
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    return model


def lora(model, r=8):
    return peft_edu.get_peft_model(model, peft_edu.LoraConfig(
        task_type="SEQ_CLS", r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=["query", "value"]))


def full(model):
    return model


# name: (how the pretrained model is prepared, learning rate chosen on the validation sentences)
METHODS = {"head only": (head_only, 3e-2), "LoRA r=8": (lora, 5e-3), "full fine-tuning": (full, 1e-4)}


def query_weights(model) -> list[torch.Tensor]:
    """A copy of each layer's query projection weight, on the CPU."""
    return [block.attention.self.query.weight.detach().cpu().clone() for block in model.bert.encoder.layer]


def cumulative_energy(update: torch.Tensor) -> torch.Tensor:
    """For k = 1, 2, ...: the share of the update's energy in its top k directions, sum_{i<=k} σ_i² / sum_i σ_i²."""
    energy = torch.linalg.svdvals(update) ** 2
    return energy.cumsum(0) / energy.sum()


def run_one(tokenizer, data, name, seed, settings, device):
    """One run of the chapter's experiment; returns its row of the table, the trained model and its loaders.

    The seed draws the new head (and LoRA's A), the order of the sentences and the dropout masks; fresh loaders give
    the three methods of one seed the same sentences in the same order, so they can be compared in pairs.
    """
    prepare, lr = METHODS[name]
    loaders = classification_loaders(tokenizer, data, batch_size=BATCH_SIZE, max_length=settings["max_length"],
                                     limit=settings["limit"], seed=seed)
    set_seed(seed)
    model = prepare(load_encoder(num_labels=2)[1])
    n_trainable, n_all = peft_edu.count_parameters(model)
    history = train(model, loaders["train"], loaders["test"], epochs=settings["epochs"], lr=lr, lr_schedule="linear",
                    device=device, seed=seed, print_summary=False)
    row = {"method": name, "seed": seed, "trainable parameters": n_trainable, "all parameters": n_all,
           "learning rate": lr, "test accuracy": history[-1]["accuracy"],
           "steps": sum(h["steps"] for h in history), "training time (s)": sum(h["seconds"] for h in history)}
    return row, model, loaders


def record_sweep(settings, seeds, device) -> list[dict]:
    """Every method for every seed; full fine-tuning's rows also hold the top-k energy share of each query update."""
    tokenizer, pretrained = load_encoder(num_labels=2)
    pretrained_queries = query_weights(pretrained)
    data = load_polarity()
    runs = []
    for seed in seeds:
        for name in METHODS:
            row, model, _ = run_one(tokenizer, data, name, seed, settings, device)
            if name == "full fine-tuning":
                row[TOP_K_SHARES] = [
                    cumulative_energy(tuned - before)[TOP_K - 1].item()
                    for tuned, before in zip(query_weights(model), pretrained_queries)]
            runs.append(row)
            print({k: v for k, v in row.items() if not isinstance(v, list)}, flush=True)
    return runs


def markdown(recording) -> str:
    lines = ["# LoRA chapter, recorded sweep: polarity", "",
             f"`{recording['command']}`, {recording['date']}, {recording['machine']['cpu_cores']} cores, "
             f"{recording['machine']['torch_threads']} thread(s), torch {recording['versions']['torch']}, "
             f"peft_edu {recording['versions']['peft_edu']}", "",
             "| method | seed | test accuracy | steps | training time (s) | trainable parameters |"
             f" top-{TOP_K} energy share of the query updates, by layer |", "|---|---|---|---|---|---|---|"]
    for run in recording["runs"]:
        shares = " / ".join(f"{share:.3f}" for share in run.get(TOP_K_SHARES, []))
        lines.append(f"| {run['method']} | {run['seed']} | {run['test accuracy']:.4f} | {run['steps']} | "
                     f"{run['training time (s)']:.1f} | {run['trainable parameters']:,} | {shares} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="path without extension: writes .json and .md")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a few steps on a few sentences, one seed (for tests)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: give at least 1")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("PEFT_EDU_PROGRESS", "0")
    settings, seeds = (QUICK_SETTINGS, SEEDS[:1]) if args.quick else (CPU_SETTINGS, SEEDS)
    device = torch.device("cpu")  # the chapter's recorded numbers are its CPU run's
    load_start = list(os.getloadavg())
    runs = record_sweep(settings, seeds, device)
    import peft
    import transformers
    recording = {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} python benchmarks/lora_recorded.py "
                   + " ".join(argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
                    "load_average": list(os.getloadavg()), "device": device.type},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "peft_edu": importlib.metadata.version("peft_edu")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {**settings, "batch_size": BATCH_SIZE, "top_k": TOP_K, "quick": args.quick},
        "seeds": list(seeds),
        "learning rates": {name: lr for name, (_, lr) in METHODS.items()},
        "runs": runs,
    }
    with open(args.out + ".json", "w") as f:
        json.dump(recording, f, indent=1, ensure_ascii=False)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(recording))
    return recording


if __name__ == "__main__":
    main()
