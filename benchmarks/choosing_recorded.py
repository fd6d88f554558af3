"""Every method of the course on one task and one step budget, each at its best rate: the "Choosing a method" sweep.

The task is the LoRA chapter's CPU run (notebooks/lora.ipynb): MiniLM classifying polarity sentences, the first 960
training sentences, batch 16, at most 32 tokens, one epoch (60 steps), the learning rate decaying linearly to zero.
Every method trains that budget. ``--task bbc`` trains the same budget on BBC News (5 topics; at most 48 tokens, as
the adapters chapter's BBC runs: the title and the first sentence or two). One learning rate for all would favour
some methods (a soft prompt trains at a rate hundreds of times full fine-tuning's), so each method gets its own,
chosen on the validation split:

1. seed 0 at three rates a factor 3 apart, around the rate the method's chapter uses (``grid``); every run records its
   validation and its test accuracy;
2. the chosen rate is the one whose seed-0 run has the best validation accuracy (a tie: the smaller rate; ``choose``);
3. seeds 1 and 2 at the chosen rate (seed 0's run is reused), so the table's test accuracy is a mean over 3 seeds.

The test split is never looked at to choose. The chapter imports this module to re-run a live sample with the same
code (``SETTINGS``, ``METHODS``, ``grid``, ``run_one``, ``choose``) and reads the recording for its table.

    OMP_NUM_THREADS=1 python benchmarks/choosing_recorded.py --jobs 2 --out benchmarks/results/choosing_polarity_cpu
    OMP_NUM_THREADS=1 python benchmarks/choosing_recorded.py --task bbc --jobs 2 --out benchmarks/results/choosing_bbc_cpu
    python benchmarks/choosing_recorded.py --quick --out /tmp/choosing_quick     # 2 methods, 2 steps (the test)

``--jobs N`` trains N runs at once in worker processes, one torch thread each (``--jobs 1``: in this process, one
thread); a method's seeds 1 and 2 start as soon as its three grid runs are done.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

import torch

import peft_edu
from peft_edu.assets import load_bbc_news, load_encoder, load_polarity
from peft_edu.training import classification_loaders, evaluate_accuracy, set_seed, train

# The LoRA chapter's CPU budget: 960 / 16 = 60 optimizer steps. The validation and test splits are used whole (400
# sentences each) unless "evaluation examples" limits them.
SETTINGS = {"train examples": 960, "evaluation examples": None, "batch size": 16, "max length": 32, "epochs": 1,
            "lr schedule": "linear", "seeds": [0, 1, 2]}
# --quick: a smoke run of the whole pipeline (2 steps), for the test; its accuracies mean nothing.
QUICK_OVERRIDES = {"train examples": 32, "evaluation examples": 32, "max length": 16}
QUICK_SETTINGS = dict(SETTINGS, **QUICK_OVERRIDES)
QUICK_METHODS = ("LoRA r=8", "prompt tuning")
# --task: (title, loader, settings). BBC articles are longer than polarity's sentences: 48 tokens hold the title and
# the lead, which name the topic; everything else is polarity's budget, so the two tables compare.
TASKS = {"polarity": ("polarity", load_polarity, SETTINGS),
         "bbc": ("BBC News", load_bbc_news, dict(SETTINGS, **{"max length": 48}))}
SELECTION_SEED = 0  # the seed of the grid runs; the others train only at the chosen rate
GRID_FACTOR = 3


# --- the methods: name -> (build(seed, num_labels) -> a model ready to train, the centre of its learning-rate grid) ---
def _encoder(seed: int, num_labels: int = 2):
    set_seed(seed)  # the seed draws the new classifier head (and the method's random initial weights, below)
    return load_encoder(num_labels=num_labels)[1]


def _peft(config_factory):
    """A build function: the encoder with the method ``config_factory()`` injected; task_type SEQ_CLS trains the head."""
    return lambda seed, num_labels=2: peft_edu.get_peft_model(_encoder(seed, num_labels), config_factory())


def _head_only(seed: int, num_labels: int = 2):
    model = _encoder(seed, num_labels)
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    return model


LORA = dict(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
PREFIX = dict(task_type="SEQ_CLS", num_virtual_tokens=20)

# The centres are the rates the chapters train with (lora.ipynb: head only, LoRA, full; adapters.ipynb and
# adapters_recorded.py: IA³ and the bottleneck adapters; prompt_methods.ipynb: prompt tuning and P-tuning v2 at 3e-2,
# the prefix MLP at 3e-3). No chapter trains DoRA at these settings: LoRA's rate (DoRA adds a magnitude vector to the
# same factors). No chapter trains rsLoRA r=64, so its centre is a guess: its scale alpha/sqrt(r) = 16/8 is LoRA r=8's
# alpha/r = 16/8, but B·A sums eight times as many rank-one terms, so a rate below LoRA's.
METHODS = {
    "head only": (_head_only, 3e-2),
    "full fine-tuning": (_encoder, 1e-4),
    "LoRA r=8": (_peft(lambda: peft_edu.LoraConfig(**LORA)), 5e-3),
    "rsLoRA r=64": (_peft(lambda: peft_edu.LoraConfig(**dict(LORA, r=64, use_rslora=True))), 1e-3),
    "DoRA r=8": (_peft(lambda: peft_edu.LoraConfig(**dict(LORA, use_dora=True))), 5e-3),
    "IA³": (_peft(lambda: peft_edu.IA3Config(task_type="SEQ_CLS")), 3e-2),
    "Houlsby": (_peft(lambda: peft_edu.DoubleSeqBnConfig(reduction_factor=16, task_type="SEQ_CLS")), 3e-3),
    "Pfeiffer": (_peft(lambda: peft_edu.SeqBnConfig(reduction_factor=16, task_type="SEQ_CLS")), 3e-3),
    "parallel": (_peft(lambda: peft_edu.ParBnConfig(reduction_factor=2, scaling=1.0, task_type="SEQ_CLS")), 7e-4),
    "prefix tuning (MLP)": (_peft(lambda: peft_edu.PrefixTuningConfig(**PREFIX, prefix_projection=True,
                                                                      encoder_hidden_size=512)), 3e-3),
    "P-tuning v2": (_peft(lambda: peft_edu.PrefixTuningConfig(**PREFIX)), 3e-2),
    "prompt tuning": (_peft(lambda: peft_edu.PromptTuningConfig(**PREFIX)), 3e-2),
    "mix-and-match": (_peft(lambda: peft_edu.MAMConfig(adapter=peft_edu.ParBnConfig(scaling=1.0),
                                                       task_type="SEQ_CLS")), 3e-4),
}


def grid(name: str) -> list[float]:
    """The learning rates tried for ``name``: its centre / 3, the centre, the centre * 3."""
    centre = METHODS[name][1]
    return [centre / GRID_FACTOR, centre, centre * GRID_FACTOR]


# --- one run ---------------------------------------------------------------------------------------------------------
def load_data(task: str = "polarity"):
    """(tokenizer, the task's dataset): what every run reads."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are: {', '.join(TASKS)}")
    return load_encoder()[0], TASKS[task][1]()


def run_one(name: str, lr: float, seed: int, tokenizer=None, data=None, device="cpu", settings=SETTINGS,
            build=None) -> dict:
    """Train method ``name`` at rate ``lr`` with ``seed`` as the chapter does; its validation and test accuracy.

    ``build(seed, num_labels) -> model``: a variant that is not one of ``METHODS`` (benchmarks/challenges_recorded.py),
    which ``name`` then only labels. The head has as many outputs as ``data`` has labels.
    """
    if build is None and name not in METHODS:
        raise ValueError(f"unknown method {name!r}; the methods are: {', '.join(METHODS)}")
    build = build or METHODS[name][0]
    if tokenizer is None or data is None:
        tokenizer, data = load_data()
    device = torch.device(device)
    evaluation = settings["evaluation examples"]
    limit = {"train": settings["train examples"],
             **({"validation": evaluation, "test": evaluation} if evaluation else {})}
    # fresh loaders per run: with one seed every method and rate sees the same sentences in the same order
    loaders = classification_loaders(tokenizer, data, batch_size=settings["batch size"],
                                     max_length=settings["max length"], seed=seed, limit=limit)
    model = build(seed, data["train"].features["label"].num_classes)
    n_trainable, n_all = peft_edu.count_parameters(model)
    history = train(model, loaders["train"], epochs=settings["epochs"], lr=lr, lr_schedule=settings["lr schedule"],
                    device=device, seed=seed, print_summary=False, progress=False)
    return {"method": name, "learning rate": lr, "seed": seed,
            "validation accuracy": evaluate_accuracy(model, loaders["validation"], device),
            "test accuracy": evaluate_accuracy(model, loaders["test"], device),
            "steps": sum(h["steps"] for h in history),
            "training time (s)": sum(h["seconds"] for h in history),
            "training loss (mean of the last epoch)": history[-1]["train_loss"],
            "trainable parameters": n_trainable, "all parameters": n_all}


def choose(runs: list[dict]) -> dict[str, float]:
    """{method: the rate whose seed-0 run has the best validation accuracy; on a tie the smaller rate}.

    Only the grid's seed-0 runs compete: the chosen rate's other seeds would otherwise give it more tries than the rest.
    """
    best: dict[str, tuple[float, float]] = {}  # method -> (validation accuracy, rate)
    for run in runs:
        if run["seed"] != SELECTION_SEED:
            continue
        candidate = (run["validation accuracy"], run["learning rate"])
        held = best.get(run["method"])
        if held is None or candidate[0] > held[0] or (candidate[0] == held[0] and candidate[1] < held[1]):
            best[run["method"]] = candidate
    return {method: rate for method, (_, rate) in best.items()}


# --- the sweep, in worker processes ----------------------------------------------------------------------------------
_worker_inputs: dict = {}  # a worker's tokenizer, data and settings, loaded once per process


def _start_worker(settings: dict, task: str) -> None:
    torch.set_num_threads(1)  # N workers share the cores: one thread each, no oversubscription
    tokenizer, data = load_data(task)
    _worker_inputs.update(tokenizer=tokenizer, data=data, settings=settings)


def _run_in_worker(name: str, lr: float, seed: int) -> dict:
    return run_one(name, lr, seed, _worker_inputs["tokenizer"], _worker_inputs["data"], "cpu",
                   _worker_inputs["settings"])


class _InThisProcess:
    """``--jobs 1``: the runs one after another in this process, as a pool of one would (minus the worker's start-up)."""

    def __init__(self, start_worker, settings: dict, task: str):
        start_worker(settings, task)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def submit(self, function, *args) -> Future:
        future = Future()
        future.set_result(function(*args))
        return future


def load_done(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """The runs to keep when a sweep resumes, from the JSON lines an interrupted sweep printed or a finished
    recording's .json (its "runs"), so that a grid can be extended without training its old rates again. Several
    files may be given; a run (method, rate, seed) found twice is kept once, from the first file.

    Returns (runs, sources): per file its path and the runs kept from it, and for a recording its date, wall time
    and own sources, so that a recording made in parts says where each part came from."""
    done, seen, sources = [], set(), []
    for path in paths:
        with open(path) as file:
            text = file.read()
        recording = json.loads(text) if path.endswith(".json") else None
        runs = recording["runs"] if recording else [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        new = [run for run in runs if (run["method"], run["learning rate"], run["seed"]) not in seen]
        seen |= {(run["method"], run["learning rate"], run["seed"]) for run in new}
        done += new
        source = {"path": path, "runs kept": len(new)}
        if recording:
            source.update(date=recording["date"], wall_time_s=recording["machine"]["wall_time_s"],
                          sources=recording["machine"].get("resumed from", []))
        sources.append(source)
        print(f"resuming: {len(new)} runs of {path} are kept ({len(runs) - len(new)} already kept)", flush=True)
    return done, sources


def sweep(names: list[str], settings: dict, jobs: int, done: list[dict] = (), task: str = "polarity",
          runner=None) -> tuple[list[dict], dict[str, float]]:
    """Every grid run at the selection seed, then the other seeds at each method's chosen rate: (runs, chosen).

    ``done``: runs of an interrupted sweep (``--resume``), kept and not trained again. ``runner``: the module whose
    ``METHODS``, ``grid``, ``_start_worker(settings, task)`` and ``_run_in_worker(name, lr, seed)`` are swept (default:
    this one; benchmarks/decoder_recorded.py sweeps its own).
    """
    runner = runner or sys.modules[__name__]
    grid, start_worker, run_in_worker = runner.grid, runner._start_worker, runner._run_in_worker
    other_seeds = [seed for seed in settings["seeds"] if seed != SELECTION_SEED]
    runs: list[dict] = [run for run in done if run["method"] in names]
    have = {(run["method"], run["learning rate"], run["seed"]) for run in runs}

    def missing(name, rates, seeds):
        return [(name, lr, seed) for lr in rates for seed in seeds if (name, lr, seed) not in have]
    context = multiprocessing.get_context("spawn")  # forking a process whose OpenMP threads have started can hang
    executor = _InThisProcess(start_worker, settings, task) if jobs == 1 else ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=start_worker, initargs=(settings, task))
    with executor as pool:
        todo = [job for name in names for job in missing(name, grid(name), [SELECTION_SEED])]
        for name in names:   # a method whose grid an interrupted sweep finished: its other seeds
            grid_runs = [r for r in runs if r["method"] == name and r["seed"] == SELECTION_SEED]
            if len(grid_runs) == len(grid(name)):
                todo += missing(name, [choose(grid_runs)[name]], other_seeds)
        pending = {pool.submit(run_in_worker, *job) for job in todo}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    run = future.result()
                    runs.append(run)
                    print(json.dumps(run, ensure_ascii=False), flush=True)
                    name = run["method"]
                    grid_runs = [r for r in runs if r["method"] == name and r["seed"] == SELECTION_SEED]
                    if run["seed"] == SELECTION_SEED and len(grid_runs) == len(grid(name)):
                        rate = choose(grid_runs)[name]   # its other seeds may be there already (an extended grid)
                        pending |= {pool.submit(run_in_worker, *job) for job in missing(name, [rate], other_seeds)}
        except BaseException:
            for future in pending:  # a failed run (or Ctrl-C) ends the sweep: the queued runs are not trained
                future.cancel()
            raise
    order = {name: i for i, name in enumerate(runner.METHODS)}
    runs.sort(key=lambda r: (order[r["method"]], r["learning rate"], r["seed"]))  # completion order varies
    return runs, choose(runs)


# --- the recording ---------------------------------------------------------------------------------------------------
def versions() -> dict:
    installed = {}
    for distribution in ("torch", "transformers", "peft", "adapters", "peft_edu"):
        try:
            installed[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            installed[distribution] = "not installed"
    return {"python": platform.python_version(), **installed}


def summary(runs: list[dict], chosen: dict[str, float], grid=grid) -> list[dict]:
    """Per method: the chosen rate, the test accuracy over seeds at it, the grid's validation accuracies."""
    rows = []
    for name, rate in chosen.items():
        at_rate = [r for r in runs if r["method"] == name and r["learning rate"] == rate]
        tests = [r["test accuracy"] for r in at_rate]
        rates = grid(name)
        rows.append({"method": name, "chosen rate": rate, "at the edge of the grid": rate in (rates[0], rates[-1]),
                     "seeds": [r["seed"] for r in at_rate], "test accuracy mean": statistics.mean(tests),
                     "test accuracy sd": statistics.stdev(tests) if len(tests) > 1 else float("nan"),
                     # in the order of grid(name)
                     "grid validation accuracy": [next(r["validation accuracy"] for r in runs if r["method"] == name
                                                       and r["learning rate"] == lr and r["seed"] == SELECTION_SEED)
                                                  for lr in rates],
                     "trainable parameters": at_rate[0]["trainable parameters"],
                     "all parameters": at_rate[0]["all parameters"],
                     "training time mean (s)": statistics.mean(r["training time (s)"] for r in at_rate)})
    return rows


def markdown(recording: dict) -> str:
    settings, machine = recording["settings"], recording["machine"]
    lines = [f"# Choosing a method, recorded sweep: {TASKS[recording.get('task', 'polarity')][0]} on MiniLM", "",
             f"`{recording['command']}`, {recording['date']}; {machine['cpu']}, {machine['cpu_cores']} cores, "
             f"{machine['jobs']} run(s) at once with 1 torch thread each, {machine['wall_time_s'] / 60:.1f} min in all; "
             + ", ".join(f"{k} {v}" for k, v in recording["versions"].items()) + ".", "",
             f"Every method: the first {settings['train examples']} training examples, batch {settings['batch size']}, "
             f"at most {settings['max length']} tokens, {settings['epochs']} epoch(s), learning-rate schedule "
             f"\"{settings['lr schedule']}\" (train's: linear decays to zero). The rate is chosen on validation accuracy (seed {SELECTION_SEED}; grid: "
             "centre / 3, centre, centre × 3; a tie goes to the smaller rate). Test accuracy: mean ± sd (n − 1) over "
             f"seeds {', '.join(map(str, settings['seeds']))} at the chosen rate. `*` marks the chosen rate; \"edge\": "
             "it is the grid's smallest or largest, so a rate outside the grid may be better.", "",
             "| method | trainable parameters | chosen rate | test accuracy | validation accuracy per rate (seed "
             f"{SELECTION_SEED}) | training time (s) |", "|---|---:|---:|---|---|---:|"]
    for row in recording["summary"]:
        rates = recording["grid"][row["method"]]
        per_rate = ", ".join(f"{lr:.3g}{'*' if lr == row['chosen rate'] else ''}: {accuracy:.3f}"
                             for lr, accuracy in zip(rates, row["grid validation accuracy"]))
        edge = " (edge)" if row["at the edge of the grid"] else ""
        lines.append(f"| {row['method']} | {row['trainable parameters']:,} | {row['chosen rate']:.3g}{edge} "
                     f"| {row['test accuracy mean']:.3f} ± {row['test accuracy sd']:.3f} | {per_rate} "
                     f"| {row['training time mean (s)']:.1f} |")
    lines += ["", "## Every run", "", "| method | learning rate | seed | validation accuracy | test accuracy | steps "
              "| training loss (mean of the last epoch) | training time (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in recording["runs"]:
        lines.append(f"| {run['method']} | {run['learning rate']:.3g} | {run['seed']} "
                     f"| {run['validation accuracy']:.3f} | {run['test accuracy']:.3f} | {run['steps']} "
                     f"| {run['training loss (mean of the last epoch)']:.4f} | {run['training time (s)']:.1f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=tuple(TASKS), default="polarity",
                        help="polarity (the default) or BBC News; the same step budget")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated method names (default: all): {', '.join(METHODS)}")
    parser.add_argument("--jobs", type=int, default=None, help="runs trained at once (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {', '.join(QUICK_METHODS)}, 2 steps, "
                        "32 validation and test sentences")
    parser.add_argument("--out", required=True, help="path without extension: writes .json and .md")
    parser.add_argument("--resume", metavar="LOG", action="append", help="the printed output of an interrupted "
                        "sweep, or a recording's .json: its runs are kept, not trained again (may be repeated)")
    args = parser.parse_args(argv)
    if args.methods is None:
        args.methods = list(QUICK_METHODS if args.quick else METHODS)
    else:
        args.methods = [name.strip() for name in args.methods.split(",") if name.strip()]
        unknown = [name for name in args.methods if name not in METHODS]
        if unknown or not args.methods:
            parser.error(f"unknown method(s) {unknown}; the methods are: {', '.join(METHODS)}")
    if args.jobs is None:
        args.jobs = 1 if args.quick else 2
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: at least 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    os.environ.setdefault("PEFT_EDU_PROGRESS", "0")  # the workers inherit it
    settings = dict(TASKS[args.task][2], **(QUICK_OVERRIDES if args.quick else {}))
    load_start, start = list(os.getloadavg()), time.perf_counter()
    done, _ = load_done(args.resume) if args.resume else ([], [])
    runs, chosen = sweep(args.methods, settings, args.jobs, done, args.task)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from harness import cpu_name, write_report  # same folder

    recording = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/choosing_recorded.py " + " ".join(argv),
        "machine": {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "jobs": args.jobs, "torch_threads_per_job": 1,
                    "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
                    "wall_time_s": time.perf_counter() - start, "device": "cpu"},
        "versions": versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "task": args.task,
        "settings": dict(settings, quick=args.quick, selection_seed=SELECTION_SEED, grid_factor=GRID_FACTOR),
        "grid": {name: grid(name) for name in args.methods},
        "chosen": chosen,
        "runs": runs,
    }
    recording["summary"] = summary(runs, chosen)
    write_report(args.out + ".md", markdown(recording).rstrip("\n"), recording)   # and args.out + ".json"
    return recording


if __name__ == "__main__":
    main()
