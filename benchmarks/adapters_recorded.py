"""The training sweep of the adapters chapter, recorded: every variant x seed x task at the chapter's CPU settings.

The chapter (notebooks/adapters.ipynb) trains 21 short runs on a CPU, too many for a page that must build in a few
minutes; it reads this recording for its accuracy table and re-runs a live sample (the same code, seeds and data),
asserting that the sample agrees with the recording. The settings, variants and learning rates below are the
chapter's (its CPU branch); change them in both places together.

    OMP_NUM_THREADS=1 python benchmarks/adapters_recorded.py --task polarity --out benchmarks/results/adapters_polarity_cpu
    OMP_NUM_THREADS=1 python benchmarks/adapters_recorded.py --task bbc --out benchmarks/results/adapters_bbc_cpu
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
from peft_edu.assets import load_bbc_news, load_encoder, load_polarity
from peft_edu.training import classification_loaders, evaluate_accuracy, set_seed, train

SETTINGS = {"polarity": {"examples": 640, "max_length": 32, "epochs": 1},
            "BBC News": {"examples": 240, "max_length": 48, "epochs": 1}}
SEEDS = (0, 1, 2)
MAM = "mix-and-match (prefix + parallel)"
VARIANTS = {  # name: (config, learning rate), as in the chapter
    "Pfeiffer (serial, FFN)": (lambda: peft_edu.SeqBnConfig(reduction_factor=16, task_type="SEQ_CLS"), 3e-3),
    "Houlsby (serial, both)": (lambda: peft_edu.DoubleSeqBnConfig(reduction_factor=16, task_type="SEQ_CLS"), 3e-3),
    "parallel (FFN)": (lambda: peft_edu.ParBnConfig(reduction_factor=2, scaling=1.0, task_type="SEQ_CLS"), 7e-4),
    MAM: (lambda: peft_edu.MAMConfig(adapter=peft_edu.ParBnConfig(scaling=1.0), task_type="SEQ_CLS"), 3e-4),
    "IA³": (lambda: peft_edu.IA3Config(task_type="SEQ_CLS"), 3e-2),
}
# the chapter's CPU run does not train these (the chapter's text says why)
SKIP = {("BBC News", "parallel (FFN)"), ("polarity", MAM), ("BBC News", MAM)}


def run_one(tokenizer, data, task, name, seed, device):
    """One training run exactly as the chapter does it: test accuracy, training time, steps."""
    make_config, lr = VARIANTS[name]
    set_seed(seed)
    model = peft_edu.get_peft_model(load_encoder(num_labels=data["train"].features["label"].num_classes)[1],
                                    make_config())
    loaders = classification_loaders(tokenizer, data, batch_size=16, max_length=SETTINGS[task]["max_length"],
                                     seed=seed, limit={"train": SETTINGS[task]["examples"]})
    history = train(model, loaders["train"], epochs=SETTINGS[task]["epochs"], lr=lr, device=device, seed=seed,
                    print_summary=False)
    return {"task": task, "method": name, "seed": seed,
            "test accuracy": evaluate_accuracy(model, loaders["test"], device),
            "training time (s)": sum(h["seconds"] for h in history), "steps": sum(h["steps"] for h in history)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("polarity", "bbc"), required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="path without extension: writes .json and .md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("PEFT_EDU_PROGRESS", "0")
    task = {"polarity": "polarity", "bbc": "BBC News"}[args.task]
    tokenizer = load_encoder(num_labels=2)[0]
    data = load_polarity() if task == "polarity" else load_bbc_news()
    device = torch.device("cpu")  # the chapter's recorded numbers are its CPU run's
    load_start = list(os.getloadavg())
    runs = []
    for name in VARIANTS:
        if (task, name) in SKIP:
            continue
        for seed in SEEDS:
            runs.append(run_one(tokenizer, data, task, name, seed, device))
            print(runs[-1], flush=True)
    import adapters
    import peft
    import transformers
    recording = {
        "command": "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
                   + "python " + " ".join(sys.argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
                    "load_average": list(os.getloadavg()), "device": device.type},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "adapters": adapters.__version__, "peft_edu": importlib.metadata.version("peft_edu")},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": SETTINGS[task], "seeds": list(SEEDS), "runs": runs,
    }
    with open(args.out + ".json", "w") as f:
        json.dump(recording, f, indent=1, ensure_ascii=False)
    lines = [f"# Adapters chapter, recorded sweep: {task}", "", f"`{recording['command']}`, {recording['date']}, "
             f"{recording['machine']['cpu_cores']} cores, torch {torch.__version__}", "",
             "| method | seed | test accuracy | training time (s) | steps |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['seed']} | {r['test accuracy']:.3f} | {r['training time (s)']:.1f} | {r['steps']} |"
              for r in runs]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
