"""Three of the source article's challenges as recorded experiments for the "Choosing a method" chapter.

All three train on the chapter's task at its budget (benchmarks/choosing_recorded.py: MiniLM on polarity, batch 16, at
most 32 tokens, 60 optimizer steps, the rate decaying linearly to zero) with its code (``run_one``); the transfer
experiment then trains on BBC News too.

* ``rank-rate``, hyper-parameter sensitivity: LoRA on the query and value projections at ranks 2, 8, 32 and 128, each at
  five learning rates a factor 3 apart, with alpha = 16 fixed and the update scaled by alpha / r (LoRA) or by
  alpha / sqrt(r) (rsLoRA, arXiv 2312.03732); seeds 0, 1 and 2. rsLoRA's argument is that alpha / r shrinks the update
  of a high rank so much that it needs a larger rate, while alpha / sqrt(r) keeps one rate right for every rank.
* ``data-size``, the performance trade-off: full fine-tuning, LoRA r=8 and prompt tuning on the first 80, 240 or 960
  training sentences, each at the rate the chapter's sweep chose for it (read from its recording), seeds 0, 1, 2.
  The step budget stays 60: 12 epochs of 80 sentences, 4 of 240, 1 of 960. The 960-sentence runs are the sweep's own
  runs (same settings, same seeds), read from its recording rather than trained again.
* ``transfer``, task specificity: per seed, LoRA r=8 trained on polarity (the sweep's LoRA run), then BBC News (5
  classes; the first 240 training articles, at most 48 tokens, 2 epochs of batch 16: 30 steps) with a new head, in
  four ways: LoRA from its usual start (B = 0), LoRA starting from the polarity adapter's A and B, the head alone on
  the polarity-adapted encoder (the adapter merged and frozen: the adapter "applied to another task"), and the head
  alone on the base encoder. Seeds 0, 1, 2; within a seed the four share the head's initial weights and the
  articles' order.

    OMP_NUM_THREADS=1 python benchmarks/challenges_recorded.py --jobs 2 --out benchmarks/results/challenges_polarity_cpu
    python benchmarks/challenges_recorded.py --quick --out /tmp/challenges_quick    # 2 steps per run (the test)

``--jobs N`` trains N runs at once in worker processes with one torch thread each; ``--resume LOG`` keeps the runs an
interrupted sweep printed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import choosing_recorded as choosing  # noqa: E402 (same folder; benchmarks/ is not a package)
from harness import cpu_name, write_report  # noqa: E402

import peft_edu  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SWEEP_RECORDING = os.path.join(HERE, "results", "choosing_polarity_cpu.json")

RANKS = (2, 8, 32, 128)   # r=8 at 5e-3, seed 0, is the sweep's LoRA run (same settings)
ALPHA = 16
SCALINGS = {"alpha / r": False, "alpha / sqrt(r)": True}  # name -> LoraConfig(use_rslora=...)
RATES = tuple(5e-3 * 3.0 ** k for k in range(-2, 3))       # 5.6e-4 ... 4.5e-2, LoRA r=8's 5e-3 in the middle
RANK_RATE_SEEDS = (0, 1, 2)

TRAIN_SIZES = (80, 240, 960)   # the last is the sweep's
QUICK_TRAIN_SIZES = (16,)
DATA_SIZE_METHODS = ("full fine-tuning", "LoRA r=8", "prompt tuning")
DATA_SIZE_SEEDS = (0, 1, 2)

TRANSFER_SETTINGS = {"train examples": 240, "evaluation examples": None, "batch size": 16, "max length": 48,
                     "epochs": 2, "lr schedule": "linear"}
QUICK_TRANSFER_SETTINGS = dict(TRANSFER_SETTINGS, **{"train examples": 16, "evaluation examples": 16,
                                                    "max length": 16, "epochs": 1})
TRANSFER_STARTS = ("LoRA, usual start", "LoRA, from the polarity adapter", "head only, polarity-adapted encoder",
                   "head only, base encoder")
TRANSFER_RATES = {"LoRA": 5e-3, "head": 3e-2}   # the polarity sweep's centres for LoRA r=8 and for the head alone
TRANSFER_SEEDS = (0, 1, 2)


def lora_variant(rank: int, rslora: bool):
    """build(seed, num_labels=2): LoRA at ``rank`` on the chapter's targets, alpha fixed, scaled by alpha/r or
    alpha/sqrt(r)."""
    config = dict(choosing.LORA, r=rank, lora_alpha=ALPHA, use_rslora=rslora)
    return lambda seed, num_labels=2: peft_edu.get_peft_model(choosing._encoder(seed, num_labels),
                                                              peft_edu.LoraConfig(**config))


def steps_of(settings: dict) -> int:
    return -(-settings["train examples"] // settings["batch size"]) * settings["epochs"]


def data_size_settings(train_examples: int, base: dict) -> dict:
    """``base`` with ``train_examples`` sentences and as many epochs as keep its number of steps (60 in the sweep)."""
    steps, per_epoch = steps_of(base), -(-train_examples // base["batch size"])
    if steps % per_epoch:
        raise ValueError(f"{train_examples} sentences make {per_epoch} batches, which do not divide {steps} steps")
    return dict(base, **{"train examples": train_examples, "epochs": steps // per_epoch})


def jobs_to_run(quick: bool, chosen: dict[str, float]) -> list[dict]:
    """Every run of both experiments, as picklable specifications."""
    specs = []
    for scaling, rslora in SCALINGS.items():
        for rank in RANKS[:1] if quick else RANKS:
            for lr in RATES[1:3] if quick else RATES:
                for seed in RANK_RATE_SEEDS[:1] if quick else RANK_RATE_SEEDS:
                    specs.append({"experiment": "rank-rate", "scaling": scaling, "rank": rank, "learning rate": lr,
                                  "seed": seed})
    for name in DATA_SIZE_METHODS[1:] if quick else DATA_SIZE_METHODS:
        for size in QUICK_TRAIN_SIZES if quick else TRAIN_SIZES[:-1]:
            for seed in DATA_SIZE_SEEDS[:1] if quick else DATA_SIZE_SEEDS:
                specs.append({"experiment": "data-size", "method": name, "train examples": size,
                              "learning rate": chosen[name], "seed": seed})
    for seed in TRANSFER_SEEDS[:1] if quick else TRANSFER_SEEDS:
        specs.append({"experiment": "transfer", "seed": seed, "learning rate": TRANSFER_RATES["LoRA"], "quick": quick})
    return specs


NEEDS_SOURCE = ("LoRA, from the polarity adapter", "head only, polarity-adapted encoder")


def transfer(seed: int, tokenizer, polarity, bbc, base: dict, device="cpu", quick: bool = False,
             starts=TRANSFER_STARTS) -> dict:
    """One seed of the transfer experiment: the polarity source's accuracy, and each start's accuracy on BBC News.

    ``starts``: a subset of TRANSFER_STARTS (the chapter's live sample); without one that needs the polarity adapter,
    the source is not trained and its accuracies are None.
    """
    unknown = [start for start in starts if start not in TRANSFER_STARTS]
    if unknown:
        raise ValueError(f"unknown start(s) {unknown}; the starts are: {', '.join(TRANSFER_STARTS)}")
    from peft_edu.assets import load_encoder
    from peft_edu.training import classification_loaders, evaluate_accuracy, set_seed, train

    device = torch.device(device)
    source, adapter, adapted_encoder = {"validation accuracy": None, "test accuracy": None}, None, None
    if any(start in NEEDS_SOURCE for start in starts):
        trained = []   # run_one returns accuracies; the source model itself is needed too
        source = choosing.run_one("LoRA r=8", TRANSFER_RATES["LoRA"], seed, tokenizer, polarity, device, base,
                                  build=lambda s, n: trained.append(choosing.METHODS["LoRA r=8"][0](s, n))
                                  or trained[-1])
        adapter = {name: p.detach().clone() for name, p in trained[0].named_parameters() if "lora_" in name}
        adapted_encoder = peft_edu.merge_and_unload(trained[0]).bert.state_dict()
    settings = QUICK_TRANSFER_SETTINGS if quick else TRANSFER_SETTINGS
    evaluation = settings["evaluation examples"]
    limit = {"train": settings["train examples"], **({"validation": evaluation, "test": evaluation} if evaluation else {})}

    def encoder():   # the same new 5-way head for every start of this seed
        set_seed(seed)
        return load_encoder(num_labels=5)[1]

    def lora(from_adapter: bool):
        model = peft_edu.get_peft_model(encoder(), peft_edu.LoraConfig(**choosing.LORA))
        if from_adapter:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_" in name:
                        p.copy_(adapter[name])
        return model

    def head_only(adapted: bool):
        model = encoder()
        if adapted:
            model.bert.load_state_dict(adapted_encoder)
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        return model

    builds = dict(zip(TRANSFER_STARTS, [(lambda: lora(False), "LoRA"), (lambda: lora(True), "LoRA"),
                                        (lambda: head_only(True), "head"), (lambda: head_only(False), "head")]))
    results = {}
    for start in starts:
        build, kind = builds[start]
        loaders = classification_loaders(tokenizer, bbc, batch_size=settings["batch size"],
                                         max_length=settings["max length"], seed=seed, limit=limit)
        model = build()
        history = train(model, loaders["train"], epochs=settings["epochs"], lr=TRANSFER_RATES[kind],
                        lr_schedule=settings["lr schedule"], device=device, seed=seed, print_summary=False,
                        progress=False)
        results[start] = {"validation accuracy": evaluate_accuracy(model, loaders["validation"], device),
                          "test accuracy": evaluate_accuracy(model, loaders["test"], device),
                          "steps": sum(h["steps"] for h in history), "learning rate": TRANSFER_RATES[kind],
                          "training time (s)": sum(h["seconds"] for h in history)}
    return {"source validation accuracy": source["validation accuracy"],
            "source test accuracy": source["test accuracy"], "starts": results}


# --- the runs, in worker processes -----------------------------------------------------------------------------------
_worker: dict = {}


def _start_worker(base_settings: dict) -> None:
    from peft_edu.assets import load_bbc_news
    torch.set_num_threads(1)
    tokenizer, data = choosing.load_data()
    _worker.update(tokenizer=tokenizer, data=data, settings=base_settings, bbc=load_bbc_news())


def run_spec(spec: dict, tokenizer=None, data=None, base_settings=None, device="cpu", bbc=None) -> dict:
    """Train one specification; the spec with its accuracies, steps, loss and time."""
    tokenizer = tokenizer or _worker["tokenizer"]
    data = data or _worker["data"]
    base = base_settings or _worker["settings"]
    if spec["experiment"] == "transfer":
        return {**spec, **transfer(spec["seed"], tokenizer, data, bbc or _worker["bbc"], base, device, spec["quick"])}
    if spec["experiment"] == "rank-rate":
        label = f"LoRA r={spec['rank']}, {spec['scaling']}"
        run = choosing.run_one(label, spec["learning rate"], spec["seed"], tokenizer, data, device, base,
                               build=lora_variant(spec["rank"], SCALINGS[spec["scaling"]]))
    else:
        settings = base if spec["train examples"] == base["train examples"] else \
            data_size_settings(spec["train examples"], base)
        run = choosing.run_one(spec["method"], spec["learning rate"], spec["seed"], tokenizer, data, device, settings)
    return {**spec, **{key: run[key] for key in ("validation accuracy", "test accuracy", "steps",
                                                    "training loss (mean of the last epoch)", "training time (s)",
                                                    "trainable parameters")}}


def _key(spec: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in spec.items() if k in ("experiment", "scaling", "rank", "method",
                                                                  "train examples", "learning rate", "seed")))


def run_all(specs: list[dict], base_settings: dict, jobs: int, done: list[dict] = ()) -> list[dict]:
    have = {_key(run) for run in done}
    runs = [run for run in done if _key(run) in {_key(spec) for spec in specs}]
    todo = [spec for spec in specs if _key(spec) not in have]
    if jobs == 1:
        _start_worker(base_settings)
        for spec in todo:
            runs.append(run_spec(spec))
            print(json.dumps(runs[-1], ensure_ascii=False), flush=True)
        return runs
    context = multiprocessing.get_context("spawn")  # forking a process whose OpenMP threads have started can hang
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                             initargs=(base_settings,)) as pool:
        pending = {pool.submit(run_spec, spec) for spec in todo}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    runs.append(future.result())
                    print(json.dumps(runs[-1], ensure_ascii=False), flush=True)
        except BaseException:
            for future in pending:  # a failed run (or Ctrl-C) ends the sweep
                future.cancel()
            raise
    return runs


def sweep_runs_at_full_size(sweep: dict) -> list[dict]:
    """The chapter sweep's runs that are the data-size experiment's 960-sentence cells (its chosen rate, each seed)."""
    rows = []
    for run in sweep["runs"]:
        name = run["method"]
        if name in DATA_SIZE_METHODS and run["learning rate"] == sweep["chosen"][name]:
            rows.append({"experiment": "data-size", "method": name, "train examples": sweep["settings"]["train examples"],
                         "learning rate": run["learning rate"], "seed": run["seed"], "from the sweep": True,
                         **{key: run[key] for key in ("validation accuracy", "test accuracy", "steps",
                                                       "training loss (mean of the last epoch)", "training time (s)",
                                                       "trainable parameters")}})
    return rows


# --- the recording ---------------------------------------------------------------------------------------------------
def summarise(runs: list[dict]) -> dict:
    """Means over seeds: the rank x rate grid (validation and test accuracy) and the data-size curves (test)."""
    def mean_sd(values):
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))
    grid = []
    for scaling in SCALINGS:
        for rank in RANKS:
            for lr in RATES:
                cell = [r for r in runs if r["experiment"] == "rank-rate" and r["scaling"] == scaling
                        and r["rank"] == rank and r["learning rate"] == lr]
                if cell:
                    grid.append({"scaling": scaling, "rank": rank, "learning rate": lr, "seeds": len(cell),
                                 "validation accuracy mean": statistics.mean(r["validation accuracy"] for r in cell),
                                 "test accuracy mean": statistics.mean(r["test accuracy"] for r in cell)})
    curves = []
    sizes = sorted({r["train examples"] for r in runs if r["experiment"] == "data-size"})
    for name in DATA_SIZE_METHODS:
        for size in sizes:
            cell = [r for r in runs if r["experiment"] == "data-size" and r["method"] == name
                    and r["train examples"] == size]
            if cell:
                mean, sd = mean_sd([r["test accuracy"] for r in cell])
                curves.append({"method": name, "train examples": size, "seeds": len(cell),
                               "test accuracy mean": mean, "test accuracy sd": sd})
    transfer_runs = [r for r in runs if r["experiment"] == "transfer"]
    starts = []
    for start in TRANSFER_STARTS:
        tests = [r["starts"][start]["test accuracy"] for r in transfer_runs]
        if tests:
            mean, sd = mean_sd(tests)
            starts.append({"start": start, "seeds": len(tests), "test accuracy mean": mean, "test accuracy sd": sd})
    return {"rank-rate": grid, "data-size": curves, "transfer": starts}


def markdown(recording: dict) -> str:
    machine = recording["machine"]
    lines = ["# Choosing a method, recorded challenges: rank x learning rate, training-set size, transfer", "",
             f"`{recording['command']}`, {recording['date']}; {machine['cpu']}, {machine['cpu_cores']} cores, "
             f"{machine['jobs']} run(s) at once with 1 torch thread each, {machine['wall_time_s'] / 60:.1f} min"
             + (f" (this invocation; {machine['resumed_runs']} runs were kept from an earlier one's log, with --resume"
                + (f", which took {machine['earlier_invocation']['wall_time_s'] / 60:.1f} min"
                   if "earlier_invocation" in machine else "") + ")" if machine.get("resumed_runs") else " in all")
             + "; "
             + ", ".join(f"{k} {v}" for k, v in recording["versions"].items()) + ".", "",
             "The task and budget of `benchmarks/choosing_recorded.py`: MiniLM on polarity, batch 16, at most 32 "
             f"tokens, {recording['settings']['steps']} steps, the rate decaying linearly to zero. See this script's docstring for the design.", "",
             f"## Rank x learning rate (LoRA on query and value, alpha = {ALPHA}; mean validation accuracy over "
             f"seeds {', '.join(map(str, RANK_RATE_SEEDS))})", "",
             "| scaling | rank | " + " | ".join(f"{lr:.3g}" for lr in RATES) + " |",
             "|---|---:|" + "---:|" * len(RATES)]
    grid = recording["summary"]["rank-rate"]
    for scaling in SCALINGS:
        for rank in RANKS:
            cells = {row["learning rate"]: row for row in grid if row["scaling"] == scaling and row["rank"] == rank}
            if cells:
                lines.append(f"| {scaling} | {rank} | " + " | ".join(
                    f"{cells[lr]['validation accuracy mean']:.3f}" if lr in cells else "" for lr in RATES) + " |")
    sizes = recording["settings"]["train_sizes"]
    lines += ["", f"## Training-set size ({recording['settings']['steps']} steps each; test accuracy, mean ± sd over "
              "seeds)", "", "| method | rate | " + " | ".join(f"{n} sentences" for n in sizes) + " |",
              "|---|---:|" + "---|" * len(sizes)]
    for name in DATA_SIZE_METHODS:
        cells = {row["train examples"]: row for row in recording["summary"]["data-size"] if row["method"] == name}
        if cells:
            lines.append(f"| {name} | {recording['chosen'][name]:.3g} | " + " | ".join(
                f"{cells[n]['test accuracy mean']:.3f} ± {cells[n]['test accuracy sd']:.3f}" if n in cells else ""
                for n in sizes) + " |")
    if recording["summary"]["transfer"]:
        lines += ["", "## Transfer: polarity's LoRA adapter and BBC News (test accuracy on BBC News, mean ± sd over "
                  "seeds)", "", "| start | seeds | test accuracy |", "|---|---:|---|"]
        lines += [f"| {row['start']} | {row['seeds']} | {row['test accuracy mean']:.3f} ± {row['test accuracy sd']:.3f} |"
                  for row in recording["summary"]["transfer"]]
        lines += ["", "| seed | polarity source, test | " + " | ".join(TRANSFER_STARTS) + " |",
                  "|---:|---:|" + "---:|" * len(TRANSFER_STARTS)]
        lines += [f"| {r['seed']} | {r['source test accuracy']:.3f} | "
                  + " | ".join(f"{r['starts'][start]['test accuracy']:.3f}" for start in TRANSFER_STARTS) + " |"
                  for r in recording["runs"] if r["experiment"] == "transfer"]
    lines += ["", "## Every run of the other two experiments", "", "| experiment | variant | train sentences | rate | seed | validation accuracy "
              "| test accuracy | steps | training time (s) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in (r for r in recording["runs"] if r["experiment"] != "transfer"):
        variant = (f"LoRA r={run['rank']}, {run['scaling']}" if run["experiment"] == "rank-rate" else run["method"]
                   + (" (the sweep's run)" if run.get("from the sweep") else ""))
        size = run.get("train examples", recording["settings"]["train examples"])
        lines.append(f"| {run['experiment']} | {variant} | {size} | {run['learning rate']:.3g} | {run['seed']} "
                     f"| {run['validation accuracy']:.3f} | {run['test accuracy']:.3f} | {run['steps']} "
                     f"| {run['training time (s)']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="runs trained at once (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few runs of 2 steps each")
    parser.add_argument("--out", required=True, help="path without extension: writes .json and .md")
    parser.add_argument("--resume", metavar="LOG", help="the printed output of an interrupted run: its runs are kept")
    args = parser.parse_args(argv)
    jobs = args.jobs if args.jobs is not None else (1 if args.quick else 2)
    if jobs < 1:
        parser.error(f"--jobs {jobs}: at least 1")
    os.environ.setdefault("PEFT_EDU_PROGRESS", "0")
    with open(SWEEP_RECORDING) as f:
        sweep = json.load(f)
    base = choosing.QUICK_SETTINGS if args.quick else choosing.SETTINGS
    if not args.quick and {k: sweep["settings"][k] for k in base} != base:
        raise SystemExit(f"{SWEEP_RECORDING} was recorded with other settings than choosing_recorded.SETTINGS; "
                         "record the sweep again first")
    done = []
    if args.resume:
        with open(args.resume) as log:
            done = [json.loads(line) for line in log if line.startswith("{")]
        print(f"resuming: {len(done)} runs of {args.resume} are kept", flush=True)
    load_start, start = list(os.getloadavg()), time.perf_counter()
    specs = jobs_to_run(args.quick, sweep["chosen"])
    runs = run_all(specs, base, jobs, done)
    if not args.quick:
        runs += sweep_runs_at_full_size(sweep)
    order = {_key(spec): i for i, spec in enumerate(specs)}
    runs.sort(key=lambda r: (("rank-rate", "data-size", "transfer").index(r["experiment"]), order.get(_key(r), len(order)),
                             r.get("method", ""), r.get("train examples", 0), r["seed"]))
    recording = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/challenges_recorded.py " + " ".join(argv),
        "machine": {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "jobs": jobs, "torch_threads_per_job": 1,
                    "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
                    "wall_time_s": time.perf_counter() - start, "device": "cpu", "resumed_runs": len(done)},
        "versions": choosing.versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": dict(base, quick=args.quick, steps=steps_of(base), ranks=list(RANKS), alpha=ALPHA,
                         rates=list(RATES), train_sizes=list(QUICK_TRAIN_SIZES if args.quick else TRAIN_SIZES), rank_rate_seeds=list(RANK_RATE_SEEDS),
                         data_size_seeds=list(DATA_SIZE_SEEDS), transfer=QUICK_TRANSFER_SETTINGS if args.quick
                         else TRANSFER_SETTINGS, transfer_rates=TRANSFER_RATES, transfer_seeds=list(TRANSFER_SEEDS)),
        "chosen": {name: sweep["chosen"][name] for name in DATA_SIZE_METHODS},
        "runs": runs,
    }
    recording["summary"] = summarise(runs)
    write_report(args.out + ".md", markdown(recording).rstrip("\n"), recording)   # and args.out + ".json"
    return recording


if __name__ == "__main__":
    main()
