r"""Magnitude and direction change (ΔM, ΔD) of full fine-tuning, LoRA and DoRA on MiniLM: the DoRA paper's §3 analysis.

The DoRA paper (Liu et al., arXiv 2402.09353, Section 3 and Figure 2) fine-tunes VL-BART three ways and, at
three intermediate checkpoints and the last, splits the query weight of each layer into a magnitude (the norm
of each output feature's weight vector) and a direction, and plots one point per (layer, checkpoint):

    ΔM = mean over output features n of |m_n,t − m_n,0|,   ΔD = mean over n of (1 − cos(V_n,t, W_n,0))

For full fine-tuning and LoRA, m is the norm of the current weight's row and V the row; for DoRA, m is its
trained magnitude vector and V = W₀ + s·BA its direction part. The paper describes LoRA's points as having a
consistent positive slope at every checkpoint, full fine-tuning's as a more varied pattern with a relatively
negative slope, and DoRA's as negative like full fine-tuning's.

This script runs that analysis on all-MiniLM-L6-v2 (6 layers) fine-tuned for sentence polarity, with the
course's own training loop (``peft_edu.training.train``), for several seeds. It records, for every (method,
seed, checkpoint, layer), ΔM and ΔD; at every checkpoint the validation accuracy; and, for every (method,
seed, checkpoint), how ΔM varies with ΔD across the six layers of that checkpoint (the points the paper
compares): Pearson's correlation, the least-squares slope, and the slope of log ΔM against log ΔD
(1: ΔM grows in proportion to ΔD from layer to layer; 0: ΔM is the same in every layer whatever ΔD).

A checkpoint comes every ``--steps-per-checkpoint`` optimiser steps (each a fresh random draw of training
sentences, seeded), so a run with fewer checkpoints is exactly the beginning of a run with more: the chapter
``notebooks/dora.ipynb`` imports this module, trains the first checkpoints live and checks them against the
recorded file.

    python benchmarks/dora_magnitude_direction.py --out benchmarks/results/dora_magnitude_direction_cpu.json

Writes the JSON (command, machine, library versions, date, settings, rows, fits) and a Markdown summary next to it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

import peft_edu
from peft_edu.assets import load_encoder, load_polarity
from peft_edu.dora import DoraLinear
from peft_edu.lora import LoraLinear
from peft_edu.training import classification_loaders, evaluate_accuracy, set_seed, train

METHODS = ("full fine-tuning", "LoRA", "DoRA")


@dataclass(frozen=True)
class Settings:
    """One run's settings; the recorded file stores them, and the chapter's live run changes only ``checkpoints``."""

    checkpoints: int = 16            # a checkpoint every steps_per_checkpoint steps
    steps_per_checkpoint: int = 20
    batch_size: int = 16
    max_length: int = 32             # tokens per sentence (the polarity sentences are short)
    lr_full: float = 1e-4            # full fine-tuning
    lr_adapter: float = 3e-3         # LoRA and DoRA (the same for both)
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    targets: tuple[str, ...] = ("query", "value")


# --- the decomposition ----------------------------------------------------------------------------
@torch.no_grad()
def query_decomposition(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(magnitude, unit direction) of every output feature of each layer's query weight, as the paper takes them."""
    result = []
    for block in model.bert.encoder.layer:
        query = block.attention.self.query
        if isinstance(query, LoraLinear):  # LoRA and DoRA: the direction part is W₀ + s·BA
            V = query.base_weight() + query.delta_weight()
            # DoRA's magnitude is its own parameter; LoRA's is the length of the row it changed
            m = query.lora_magnitude_vector if isinstance(query, DoraLinear) else torch.linalg.vector_norm(V, dim=1)
        else:  # full fine-tuning: the trained weight itself
            V = query.weight
            m = torch.linalg.vector_norm(V, dim=1)
        V = V.float().cpu()
        result.append((m.float().cpu().clone(), V / torch.linalg.vector_norm(V, dim=1, keepdim=True)))
    return result


def magnitude_direction_change(decomposition, start) -> list[tuple[float, float]]:
    """(ΔM, ΔD) of each layer: the mean over output features of |m − m₀| and of 1 − cos(V, W₀)."""
    return [((m - m0).abs().mean().item(), (1 - (direction * direction0).sum(dim=1)).mean().item())
            for (m, direction), (m0, direction0) in zip(decomposition, start)]


def fit_across_layers(delta_m, delta_d) -> dict:
    """How ΔM varies with ΔD across the layers of one checkpoint: correlation, slope, and slope in log-log."""
    delta_m, delta_d = np.asarray(delta_m, dtype=float), np.asarray(delta_d, dtype=float)
    return {"correlation": float(np.corrcoef(delta_d, delta_m)[0, 1]),
            "slope": float(np.polyfit(delta_d, delta_m, 1)[0]),
            "log_slope": float(np.polyfit(np.log(delta_d), np.log(delta_m), 1)[0])}


# --- one run ----------------------------------------------------------------------------------------
def polarity_loaders(tokenizer, settings: Settings, seed: int) -> dict[str, DataLoader]:
    """Training batches drawn at random (seeded), steps_per_checkpoint of them per 'epoch'; all validation sentences."""
    loaders = classification_loaders(tokenizer, load_polarity(), batch_size=settings.batch_size,
                                     max_length=settings.max_length, seed=seed)
    train_set = loaders["train"].dataset
    sampler = RandomSampler(train_set, num_samples=settings.steps_per_checkpoint * settings.batch_size,
                            generator=torch.Generator().manual_seed(seed))
    return {"train": DataLoader(train_set, batch_size=settings.batch_size, sampler=sampler,
                                collate_fn=loaders["train"].collate_fn),
            "validation": DataLoader(loaders["validation"].dataset, batch_size=100,
                                     collate_fn=loaders["validation"].collate_fn)}


def prepared_model(method: str, seed: int, settings: Settings):
    """(tokenizer, MiniLM with a fresh classification head drawn from ``seed``, ready for ``method``)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose one of {METHODS}")
    set_seed(seed)
    tokenizer, model = load_encoder(num_labels=2)
    if method == "full fine-tuning":
        return tokenizer, model
    config = peft_edu.LoraConfig(task_type="SEQ_CLS", r=settings.r, lora_alpha=settings.lora_alpha,
                                 lora_dropout=settings.lora_dropout, target_modules=list(settings.targets),
                                 use_dora=method == "DoRA")
    return tokenizer, peft_edu.get_peft_model(model, config)


def run(method: str, seed: int, settings: Settings, evaluate_every_checkpoint: bool = False,
        device: torch.device | None = None) -> dict:
    """Train one method from one seed; ΔM and ΔD of every layer at every checkpoint, and validation accuracy.

    The accuracy is measured at the last checkpoint (and at every one with ``evaluate_every_checkpoint``);
    evaluation draws no random numbers, so it does not change the run.
    """
    tokenizer, model = prepared_model(method, seed, settings)
    start = query_decomposition(model)  # W₀, and DoRA's m₀ = ‖W₀‖, before the first step
    loaders = polarity_loaders(tokenizer, settings, seed)
    rows, accuracy, steps = [], {}, iter(range(settings.steps_per_checkpoint, 10 ** 9, settings.steps_per_checkpoint))

    def checkpoint(model, validation, device):  # train() calls it after every 'epoch' of steps_per_checkpoint steps
        step = next(steps)
        for layer, (delta_m, delta_d) in enumerate(magnitude_direction_change(query_decomposition(model), start)):
            rows.append({"method": method, "seed": seed, "step": step, "layer": layer, "dM": delta_m, "dD": delta_d})
        if evaluate_every_checkpoint or step == settings.checkpoints * settings.steps_per_checkpoint:
            accuracy[step] = evaluate_accuracy(model, validation, device)
        return {}

    lr = settings.lr_full if method == "full fine-tuning" else settings.lr_adapter
    history = train(model, loaders["train"], loaders["validation"], epochs=settings.checkpoints, lr=lr, seed=seed,
                    device=device or torch.device("cpu"), progress=False, print_summary=False, evaluate=checkpoint)
    return {"method": method, "seed": seed, "rows": rows,
            "accuracy": [{"step": step, "accuracy": value} for step, value in accuracy.items()],
            "train_loss": [h["train_loss"] for h in history], "seconds": sum(h["seconds"] for h in history)}


def fits(rows: list[dict]) -> list[dict]:
    """``fit_across_layers`` for every (method, seed, checkpoint) of ``rows``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["seed"], row["step"]), []).append(row)
    return [{"method": method, "seed": seed, "step": step,
             **fit_across_layers([r["dM"] for r in group], [r["dD"] for r in group])}
            for (method, seed, step), group in groups.items()]


# --- the record -------------------------------------------------------------------------------------
def machine_info() -> dict:
    # importing peft imports bitsandbytes, which on some CPUs warns that an optional kernel package is missing
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import peft
    import transformers

    from harness import cpu_name  # same folder

    cpu = cpu_name()
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "peft_edu": importlib.metadata.version("peft_edu"), "python": platform.python_version()}


def summary(record: dict) -> str:
    s, machine = record["settings"], record["machine"]
    lines = ["# ΔM and ΔD across MiniLM's layers: full fine-tuning, LoRA, DoRA (recorded)", "",
             f"Command: `{record['command']}`", "",
             f"Started: {record['date']}. Machine: {machine['cpu']}, {machine['cpu_cores']} cores, "
             f"{machine['torch_threads']} torch thread{'s' if machine['torch_threads'] > 1 else ''}, device cpu.",
             f"Versions: torch {machine['torch']}, transformers {machine['transformers']}, peft {machine['peft']}, "
             f"peft_edu {machine['peft_edu']}, Python {machine['python']}.", "",
             f"{s['checkpoints']} checkpoints, one every {s['steps_per_checkpoint']} steps of {s['batch_size']} "
             f"sentences (at most {s['max_length']} tokens); learning rate {s['lr_full']:g} (full fine-tuning), "
             f"{s['lr_adapter']:g} (LoRA, DoRA: r={s['r']}, alpha={s['lora_alpha']}, dropout {s['lora_dropout']}, "
             f"on {', '.join(s['targets'])}).", "",
             "Across the 6 layers of each checkpoint: the median over checkpoints (and the range) of Pearson's r "
             "and of the log-log slope of ΔM against ΔD; validation accuracy at the last checkpoint.", "",
             "| method | seed | r: median (min … max) | log-log slope: median (min … max) | checkpoints with r < 0 "
             "| accuracy |", "|---|---:|---|---|---:|---:|"]
    last = s["checkpoints"] * s["steps_per_checkpoint"]
    for result in record["runs"]:
        mine = [f for f in record["fits"] if f["method"] == result["method"] and f["seed"] == result["seed"]]
        r, b = np.array([f["correlation"] for f in mine]), np.array([f["log_slope"] for f in mine])
        accuracy = next(a["accuracy"] for a in result["accuracy"] if a["step"] == last)
        lines.append(f"| {result['method']} | {result['seed']} | {np.median(r):+.2f} ({r.min():+.2f} … {r.max():+.2f}) | "
                     f"{np.median(b):+.2f} ({b.min():+.2f} … {b.max():+.2f}) | {int((r < 0).sum())} of {len(r)} | "
                     f"{accuracy:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    for field, value in asdict(defaults).items():
        if field != "targets":
            parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--targets", default=",".join(defaults.targets), help="comma-separated target_modules")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--out", required=True, help="the JSON to write (a .md summary is written next to it)")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    settings = Settings(**{field: getattr(args, field) for field in asdict(defaults) if field != "targets"},
                        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()))
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    record = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine_info(), "settings": asdict(settings), "runs": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in seeds:  # seed by seed, writing the file after every run: a stopped run keeps what it finished
        for method in methods:
            result = run(method, seed, settings, evaluate_every_checkpoint=True)
            print(f"{method}, seed {seed}: accuracy {result['accuracy'][-1]['accuracy']:.3f} "
                  f"({result['seconds']:.0f} s of training)", flush=True)
            record["runs"].append(result)
            record["fits"] = fits([row for result in record["runs"] for row in result["rows"]])
            out.write_text(json.dumps(record, indent=1) + "\n")
            out.with_suffix(".md").write_text(summary(record))
    print(summary(record))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
