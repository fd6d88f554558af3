"""The "Choosing a method" sweep on a decoder: every method on SmolLM2 and the question-answer pairs, at its best rate.

The chapter's encoder sweep (benchmarks/choosing_recorded.py) trains MiniLM on classification; this one trains
SmolLM2-135M-Instruct, a Llama-style decoder, to answer the chatterbot-corpus questions (all categories), with the
methods as benchmarks/decoder_costs.py writes them for a decoder. A pair is one chat turn in the tokenizer's
template, the loss only on the answer's tokens (and the end-of-turn token). The budget: the same 96 training pairs
for every run (the first of the train split shuffled with seed 0), batch 4, at most 64 tokens, one epoch (24
steps), the rate decaying linearly to zero. The score is the **answer-token accuracy**: on held-out pairs, the share
of the answer's tokens that the model, given the true text before them, predicts as its most likely next token (its
argmax; teacher forcing, no generation). The answer loss on the same tokens is recorded beside it.

The rate is chosen as the encoder sweep chooses it (``choosing_recorded.choose``: seed 0 at three rates a factor 3
apart, the best validation score, a tie to the smaller rate; then seeds 1 and 2 at that rate) on 48 validation
pairs, and the table reports 48 test pairs; the same sweep code runs it (``choosing_recorded.sweep``). The centres
of the grids are guesses, not rates a chapter tuned: prompt tuning's is the prompt methods chapter's SmolLM2 rate
(3e-2); the others are the encoder sweep's centres, a factor 3 lower for a model six times the size, except full
fine-tuning's (3e-5, the usual order for a causal LM of this size). A chosen rate at the edge of its grid says that
a rate outside it may be better. The first sweep (2026-12-04 03:21 UTC) chose seven rates at an edge, so each of
those grids got one more rate, a factor 3 beyond that edge (``EXTENDED``), and the sweep ran again with ``--resume``
on the first one's runs: the three rates it had tried are kept, and a method whose best rate moved to the new one
gets its other seeds there.

    OMP_NUM_THREADS=1 python benchmarks/decoder_recorded.py --jobs 2 --out benchmarks/results/decoder_qa_cpu
    python benchmarks/decoder_recorded.py --quick --out /tmp/decoder_quick   # 2 methods, 2 steps (the test)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import choosing_recorded as choosing  # noqa: E402 (same folder; benchmarks/ is not a package)
import decoder_costs  # noqa: E402

import peft_edu  # noqa: E402
from peft_edu.assets import load_causal_lm, load_qa_pairs  # noqa: E402
from peft_edu.training import set_seed, train  # noqa: E402

SETTINGS = {"train examples": 96, "evaluation examples": 48, "batch size": 4, "max length": 64, "epochs": 1,
            "lr schedule": "linear", "seeds": [0, 1, 2], "data seed": 0}
QUICK_SETTINGS = dict(SETTINGS, **{"train examples": 8, "evaluation examples": 8})   # a prompt alone is 32+ tokens
QUICK_METHODS = ("LoRA r=8", "prompt tuning")
CENTRES = {"full fine-tuning": 3e-5, "LoRA r=8": 2e-3, "rsLoRA r=64": 4e-4, "DoRA r=8": 2e-3, "IA³": 1e-2,
           "Houlsby": 1e-3, "Pfeiffer": 1e-3, "parallel": 2e-4, "prefix tuning (MLP)": 1e-3, "P-tuning v2": 1e-2,
           "prompt tuning": 3e-2, "mix-and-match": 1e-4}
# name -> (the method's config, or None for full fine-tuning; the centre of its rate grid), in decoder_costs' order
METHODS = {name: (make_config, CENTRES[name]) for name, make_config in decoder_costs.METHODS.items()}


# The methods whose first sweep chose a rate at an edge of the three-rate grid, and that edge: +1 the top, -1 the bottom
EXTENDED = {"full fine-tuning": +1, "LoRA r=8": +1, "DoRA r=8": +1, "Houlsby": +1, "parallel": -1, "P-tuning v2": +1,
            "mix-and-match": -1}


def grid(name: str) -> list[float]:
    """The rates tried for ``name``, in increasing order: its centre / 3, the centre, the centre * 3, and for the
    methods in ``EXTENDED`` one more rate a factor 3 beyond the edge that the first sweep chose."""
    centre, factor = METHODS[name][1], choosing.GRID_FACTOR
    rates = [centre / factor, centre, centre * factor]
    if EXTENDED.get(name) == +1:
        rates.append(rates[-1] * factor)
    elif EXTENDED.get(name) == -1:
        rates.insert(0, rates[0] / factor)
    return rates


# --- data ------------------------------------------------------------------------------------------------------------
def load_data(settings: dict = SETTINGS):
    """(tokenizer, base model, {"train", "validation", "test"}: the pairs every run reads, each split shuffled with
    the data seed and cut to the settings' sizes)."""
    tokenizer, base = load_causal_lm()
    qa = load_qa_pairs()
    sizes = {"train": settings["train examples"], "validation": settings["evaluation examples"],
             "test": settings["evaluation examples"]}
    data = {split: qa[split].shuffle(seed=settings["data seed"]).select(range(min(n, len(qa[split]))))
            for split, n in sizes.items()}
    return tokenizer, base, data


def qa_batches(tokenizer, rows, batch_size: int, max_length: int, order: list[int] | None = None) -> list[dict]:
    """Batches of chat turns, right-padded; ``labels`` are the answer's tokens and the end-of-turn token, -100
    elsewhere (the question, the template, the padding)."""
    order = list(range(len(rows))) if order is None else order
    batches = []
    for start in range(0, len(order), batch_size):
        part = rows.select(order[start:start + batch_size])
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                 add_generation_prompt=True) for q in part["question"]]
        texts = [p + a + tokenizer.eos_token for p, a in zip(prompts, part["answer"])]
        tokenizer.padding_side = "right"
        batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for i, prompt in enumerate(prompts):
            labels[i, :len(tokenizer(prompt)["input_ids"])] = -100
        batch["labels"] = labels
        batches.append(batch)
    return batches


@torch.no_grad()
def answer_scores(model, batches: list[dict], device) -> dict:
    """Answer-token accuracy (teacher-forced argmax) and the mean answer loss over every answer token."""
    model.eval()
    right = total = 0
    loss_sum = 0.0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, -labels.shape[1]:].float()   # prompt tuning prepends its positions
        predicted, target = logits[:, :-1], labels[:, 1:]              # position t predicts token t + 1
        scored = target != -100
        right += (predicted.argmax(-1)[scored] == target[scored]).sum().item()
        total += scored.sum().item()
        loss_sum += torch.nn.functional.cross_entropy(predicted[scored], target[scored], reduction="sum").item()
    return {"accuracy": right / total, "loss": loss_sum / total, "tokens": total}


# --- one run ---------------------------------------------------------------------------------------------------------
def prepared(name: str, seed: int, base):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; the methods are: {', '.join(METHODS)}")
    set_seed(seed)   # the method's random initial weights
    model = copy.deepcopy(base)
    config = METHODS[name][0]()
    return model if config is None else peft_edu.get_peft_model(model, config)


def run_one(name: str, lr: float, seed: int, tokenizer, base, data, device="cpu", settings=SETTINGS) -> dict:
    """Train ``name`` at ``lr`` with ``seed`` (the seed also orders the training pairs); its validation and test
    scores."""
    device = torch.device(device)
    model = prepared(name, seed, base)
    n_trainable, n_all = peft_edu.count_parameters(model)
    order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(seed)).tolist()
    train_batches = qa_batches(tokenizer, data["train"], settings["batch size"], settings["max length"], order)
    history = train(model, train_batches, epochs=settings["epochs"], lr=lr, lr_schedule=settings["lr schedule"],
                    device=device, seed=seed, print_summary=False, progress=False)
    scores = {split: answer_scores(model, qa_batches(tokenizer, data[split], 16, settings["max length"]), device)
              for split in ("validation", "test")}
    return {"method": name, "learning rate": lr, "seed": seed,
            "validation accuracy": scores["validation"]["accuracy"], "test accuracy": scores["test"]["accuracy"],
            "validation loss": scores["validation"]["loss"], "test loss": scores["test"]["loss"],
            "steps": sum(h["steps"] for h in history), "training time (s)": sum(h["seconds"] for h in history),
            "training loss (mean of the last epoch)": history[-1]["train_loss"],
            "trainable parameters": n_trainable, "all parameters": n_all}


def untrained(tokenizer, base, data, settings=SETTINGS, device="cpu") -> dict:
    """The base model's scores, before any training: the floor (a causal LM has no new head to train alone)."""
    return {split: answer_scores(base, qa_batches(tokenizer, data[split], 16, settings["max length"]),
                                 torch.device(device)) for split in ("validation", "test")}


# --- the sweep: choosing_recorded.sweep, with these workers ----------------------------------------------------------
_worker: dict = {}


def _start_worker(settings: dict, task: str) -> None:
    torch.set_num_threads(1)
    tokenizer, base, data = load_data(settings)
    _worker.update(tokenizer=tokenizer, base=base, data=data, settings=settings)


def _run_in_worker(name: str, lr: float, seed: int) -> dict:
    return run_one(name, lr, seed, _worker["tokenizer"], _worker["base"], _worker["data"], "cpu", _worker["settings"])


def describe_source(source: dict) -> str:
    """One resumed file: its runs kept, and for a recording its date and time (and its own parts)."""
    text = f"{source['runs kept']} from `{source['path']}`"
    if "date" in source:
        text += f" (recorded {source['date']}, {source['wall_time_s'] / 60:.1f} min"
        text += ", itself from " + ", ".join(map(describe_source, source["sources"])) + ")" if source["sources"] else ")"
    return text


def markdown(recording: dict) -> str:
    settings, machine = recording["settings"], recording["machine"]
    floor = recording["untrained"]["test"]
    lines = ["# Choosing a method on a decoder, recorded sweep: SmolLM2 on the question-answer pairs", "",
             f"`{recording['command']}`, {recording['date']}; {machine['cpu']}, {machine['cpu_cores']} cores, "
             f"{machine['jobs']} run(s) at once with 1 torch thread each, {machine['wall_time_s'] / 60:.1f} min"
             + (" for the runs this part trained" if machine.get("resumed from") else " in all") + "; "
             + ", ".join(f"{k} {v}" for k, v in recording["versions"].items()) + ".", "",
             f"Every method: the same {settings['train examples']} training pairs, batch {settings['batch size']}, at "
             f"most {settings['max length']} tokens, {settings['epochs']} epoch(s), rate schedule "
             f"\"{settings['lr schedule']}\"; scored on {settings['evaluation examples']} validation and test pairs: "
             "answer-token accuracy (teacher-forced argmax) and answer loss. The rate is chosen on validation accuracy "
             "(seed 0; a tie to the smaller rate); mean ± sd over seeds at the chosen rate. The base model, "
             f"untrained: test accuracy {floor['accuracy']:.3f}, loss {floor['loss']:.3f}.", "",
             "| method | trainable parameters | chosen rate | test accuracy | test loss | validation accuracy per "
             "rate (seed 0) |", "|---|---:|---:|---|---|---|"]
    if machine.get("resumed from"):   # a recording made in parts: where the runs it did not train came from
        lines[4:4] = ["Recorded in parts; the runs kept from earlier parts: " + "; ".join(
            describe_source(source) for source in machine["resumed from"]) + ".", ""]
    runs = recording["runs"]
    for row in recording["summary"]:
        losses = [r["test loss"] for r in runs if r["method"] == row["method"] and r["learning rate"] == row["chosen rate"]]
        per_rate = ", ".join(f"{lr:.3g}{'*' if lr == row['chosen rate'] else ''}: {accuracy:.3f}"
                             for lr, accuracy in zip(recording["grid"][row["method"]], row["grid validation accuracy"]))
        lines.append(f"| {row['method']} | {row['trainable parameters']:,} | {row['chosen rate']:.3g}"
                     f"{' (edge)' if row['at the edge of the grid'] else ''} | {row['test accuracy mean']:.3f} ± "
                     f"{row['test accuracy sd']:.3f} | {statistics.mean(losses):.3f} ± "
                     f"{statistics.stdev(losses) if len(losses) > 1 else float('nan'):.3f} | {per_rate} |")
    lines += ["", "## Every run", "", "| method | learning rate | seed | validation accuracy | test accuracy "
              "| validation loss | test loss | steps | training time (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['method']} | {r['learning rate']:.3g} | {r['seed']} | {r['validation accuracy']:.3f} "
                     f"| {r['test accuracy']:.3f} | {r['validation loss']:.3f} | {r['test loss']:.3f} | {r['steps']} "
                     f"| {r['training time (s)']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=None, help=f"comma-separated (default: all): {', '.join(METHODS)}")
    parser.add_argument("--jobs", type=int, default=None, help="runs trained at once (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {', '.join(QUICK_METHODS)}, 2 steps")
    parser.add_argument("--out", required=True, help="path without extension: writes .json and .md")
    parser.add_argument("--resume", metavar="LOG", action="append", help="the printed output of an interrupted "
                        "sweep, or a recording's .json: its runs are kept (may be repeated)")
    args = parser.parse_args(argv)
    names = list(QUICK_METHODS if args.quick else METHODS) if args.methods is None else \
        [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        parser.error(f"unknown method(s) {unknown}; the methods are: {', '.join(METHODS)}")
    jobs = args.jobs if args.jobs is not None else (1 if args.quick else 2)
    if jobs < 1:
        parser.error(f"--jobs {jobs}: at least 1")
    os.environ.setdefault("PEFT_EDU_PROGRESS", "0")
    settings = QUICK_SETTINGS if args.quick else SETTINGS
    start = time.perf_counter()
    done, resumed_from = choosing.load_done(args.resume) if args.resume else ([], [])
    runs, chosen = choosing.sweep(names, settings, jobs, done, task="qa", runner=sys.modules[__name__])
    tokenizer, base, data = load_data(settings)
    from harness import cpu_name, write_report

    recording = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/decoder_recorded.py " + " ".join(argv),
        "machine": {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "jobs": jobs, "torch_threads_per_job": 1,
                    "wall_time_s": time.perf_counter() - start, "device": "cpu", "resumed from": resumed_from},
        "versions": choosing.versions(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": dict(settings, quick=args.quick, selection_seed=choosing.SELECTION_SEED,
                         grid_factor=choosing.GRID_FACTOR),
        "grid": {name: grid(name) for name in names}, "chosen": chosen, "runs": runs,
        "untrained": untrained(tokenizer, base, data, settings),
    }
    recording["summary"] = choosing.summary(runs, chosen, grid)
    write_report(args.out + ".md", markdown(recording).rstrip("\n"), recording)   # and args.out + ".json"
    return recording


if __name__ == "__main__":
    main()
