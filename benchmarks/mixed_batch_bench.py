"""Serving many LoRA adapters from one SmolLM2: generation throughput of a mixed-adapter batch.

A batch of ``--batch`` prompts, row i using adapter i mod n, for each n of ``--adapters``; greedy generation of
exactly ``--new-tokens`` tokens per row (end-of-sequence suppressed, so every variant produces the same number of
tokens). The variants, taking turns in every round so that background load hits them alike:

* **peft_edu mixed batch**: ``model.generate(..., adapter_names=rows)``; every adapted layer gathers each row's A
  and B and computes all rows with one batched product per factor (Punica, arXiv 2310.18547; S-LoRA, arXiv
  2311.03285);
* **PEFT mixed batch**: ``PeftModel.generate(..., adapter_names=rows)``, which loops over the adapters present in
  every adapted layer, one sub-batch each;
* **merged, one task at a time**: for each adapter, merge it into the base (peft_edu.merge), generate its rows
  alone, unmerge; the time includes the merges;
* **base model**: the same batch with no adapter at all, the floor.

The n adapters are PEFT's (random A, and B drawn small instead of PEFT's zeros, so that every adapter changes the
output), saved by PEFT and loaded into peft_edu with ``load_adapter``: the same numbers in both libraries. The report
says whether the two mixed batches generated the same tokens.

    python benchmarks/mixed_batch_bench.py --threads 2 --adapters 1,4,16 --batch 32 --new-tokens 16 --rounds 3 \\
        --out <scratch>.md          # then copied into benchmarks/results/mixed_batch_cpu.md

Target (issue 15): peft_edu's mixed batch ≥ 1.5 × PEFT's throughput at 16 adapters, judged on paired per-round
ratios of the generation times (``harness.paired_ratio``, ``harness.verdict``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_info, paired_ratio, sync, verdict, write_report  # noqa: E402 (same folder)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["peft_edu mixed batch", "PEFT mixed batch", "merged, one task at a time", "base model"]
THROUGHPUT_TARGET = 1.5  # peft_edu / PEFT tokens per second, at the largest number of adapters (16 in the issue)


def prompts(tokenizer, batch: int, device) -> dict:
    """``batch`` questions of the course's QA pairs as chat prompts, left-padded for generation."""
    from peft_edu.assets import load_qa_pairs

    questions = load_qa_pairs()["train"]["question"]
    texts = [f"Question: {questions[i % len(questions)]}\nAnswer:" for i in range(batch)]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True).to(device)


def build(base, n_adapters: int, r: int, folder: Path, device):
    """(PEFT model, peft_edu model) holding the same ``n_adapters`` LoRA adapters task0, task1, ..."""
    import peft

    import peft_edu

    names = [f"task{i}" for i in range(n_adapters)]
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=names[0])
        for name in names[1:]:
            theirs.add_adapter(name, config)
    generator = torch.Generator().manual_seed(n_adapters)
    with torch.no_grad():
        for param_name, param in sorted(theirs.named_parameters()):
            if ".lora_B." in param_name:  # PEFT starts B at zero: an adapter that changes nothing would prove nothing
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    theirs.save_pretrained(folder, selected_adapters=names)
    ours = copy.deepcopy(base)
    for name in names:  # PEFT writes an adapter not named "default" to folder/<name>
        ours = peft_edu.load_adapter(ours, folder / name, adapter_name=name)
    return theirs.to(device).eval(), ours.to(device).eval(), names


def generate(model, batch: dict, new_tokens: int, pad_token_id: int, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=pad_token_id, **extra)


def merged_one_task_at_a_time(ours, names, rows, batch, new_tokens, pad_token_id) -> torch.Tensor:
    """Each adapter merged into the base in turn, its rows generated alone; the outputs back in the batch's order."""
    import peft_edu

    outputs = [None] * len(rows)
    for name in names:
        index = [i for i, row in enumerate(rows) if row == name]
        peft_edu.set_adapter(ours, name, inference_mode=True)
        peft_edu.merge(ours)
        sub = {key: value[index] for key, value in batch.items()}
        for i, tokens in zip(index, generate(ours, sub, new_tokens, pad_token_id)):
            outputs[i] = tokens
        peft_edu.unmerge(ours)
    return torch.stack(outputs)


def measure(n_adapters: int, base, tokenizer, args, device) -> dict:
    batch = prompts(tokenizer, args.batch, device)
    with tempfile.TemporaryDirectory() as folder:
        theirs, ours, names = build(base, n_adapters, args.r, Path(folder), device)
    rows = [names[i % n_adapters] for i in range(args.batch)]
    pad = tokenizer.pad_token_id
    runs = {
        "peft_edu mixed batch": lambda: generate(ours, batch, args.new_tokens, pad, adapter_names=rows),
        "PEFT mixed batch": lambda: generate(theirs, batch, args.new_tokens, pad, adapter_names=rows),
        "merged, one task at a time": lambda: merged_one_task_at_a_time(ours, names, rows, batch, args.new_tokens, pad),
        "base model": lambda: _without_adapters(ours, batch, args.new_tokens, pad),
    }
    times = {v: [] for v in runs}
    tokens = {}
    for round_ in range(args.warmup + args.rounds):
        for variant, run in runs.items():
            sync(device)
            start = time.perf_counter()
            tokens[variant] = run()
            sync(device)
            if round_ >= args.warmup:
                times[variant].append(time.perf_counter() - start)
    generated = args.batch * args.new_tokens
    prompt_len = batch["input_ids"].shape[1]
    same = {v: int((tokens[v][:, prompt_len:] == tokens["PEFT mixed batch"][:, prompt_len:]).all(dim=1).sum())
            for v in runs}
    result = {"adapters": n_adapters, "rows_per_adapter": args.batch // n_adapters, "prompt_tokens": prompt_len,
              "generated_tokens": generated, "times_s": times,
              "tokens_per_s": {v: generated / statistics.median(t) for v, t in times.items()},
              "rows_equal_to_peft": same}
    value, low, high = paired_ratio(times["peft_edu mixed batch"], times["PEFT mixed batch"])
    result["peft_edu_over_peft_throughput"] = {"value": 1 / value, "low": 1 / high, "high": 1 / low}
    value, low, high = paired_ratio(times["peft_edu mixed batch"], times["merged, one task at a time"])
    result["peft_edu_over_merged_throughput"] = {"value": 1 / value, "low": 1 / high, "high": 1 / low}
    return result


def _without_adapters(ours, batch, new_tokens, pad) -> torch.Tensor:
    import peft_edu

    with peft_edu.disable_adapter(ours):
        return generate(ours, batch, new_tokens, pad)


def target(results: list[dict]) -> dict:
    """The issue's target at the largest number of adapters measured: time ratio ours / PEFT ≤ 1 / 1.5."""
    last = results[-1]
    ratio = last["peft_edu_over_peft_throughput"]  # of tokens per second: the time ratio's inverse
    rounds = len(last["times_s"]["PEFT mixed batch"])
    return {"adapters": last["adapters"], "throughput_ratio": ratio["value"], "interval": [ratio["low"], ratio["high"]],
            "target": f"peft_edu ≥ {THROUGHPUT_TARGET} × PEFT's tokens per second",
            "verdict": verdict(1 / ratio["value"], 1 / ratio["high"], 1 / ratio["low"], 1 / THROUGHPUT_TARGET, rounds)}


def markdown(record: dict) -> str:
    info, s = record["machine"], record["settings"]
    lines = ["# Mixed-adapter batches on SmolLM2: generation throughput", "",
             f"Command: `{record['command']}`", "",
             f"Machine: {info['cpu']}, {info['cpu_cores']} cores, torch threads {info['torch_threads']}; device "
             f"`{info['device']}`.",
             f"Versions: torch {info['torch']}, peft {info['peft']}, transformers {info['transformers']}, Python "
             f"{info['python']}. Date: {info['date']}.", "",
             f"Batch of {s['batch']} prompts (the course's QA questions, left-padded), row i on adapter i mod n; "
             f"greedy generation of exactly {s['new_tokens']} new tokens per row; LoRA r={s['r']} on "
             f"{', '.join(TARGETS)}. Times: {s['rounds']} rounds after {s['warmup']} warm-up, the variants in turn; "
             "tokens/s from the median. Ratios: median of the per-round ratios, 90 % bootstrap interval "
             "(harness.paired_ratio). 'rows = PEFT': rows whose generated tokens equal PEFT's mixed batch.", "",
             "| adapters | variant | tokens/s | every round (s) | rows = PEFT |", "|---:|---|---:|---|---:|"]
    for r in record["results"]:
        for v in VARIANTS:
            lines.append(f"| {r['adapters']} | {v} | {r['tokens_per_s'][v]:.1f} | "
                         f"{' '.join(f'{t:.2f}' for t in r['times_s'][v])} | {r['rows_equal_to_peft'][v]}/{s['batch']} |")
    lines += ["", "| adapters | peft_edu / PEFT (throughput) | 90 % interval | peft_edu / merged one at a time | 90 % "
              "interval |", "|---:|---:|---|---:|---|"]
    for r in record["results"]:
        a, b = r["peft_edu_over_peft_throughput"], r["peft_edu_over_merged_throughput"]
        lines.append(f"| {r['adapters']} | {a['value']:.2f} | {a['low']:.2f} – {a['high']:.2f} | {b['value']:.2f} | "
                     f"{b['low']:.2f} – {b['high']:.2f} |")
    t = record["target"]
    lines += ["", f"Target at {t['adapters']} adapters: {t['target']}: measured {t['throughput_ratio']:.2f} "
                  f"({t['interval'][0]:.2f} – {t['interval'][1]:.2f}): **{t['verdict']}**", ""]
    return "\n".join(lines)


def run(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", default="1,4,16", help="comma-separated numbers of distinct adapters per batch")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each variant once per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="also write the report (markdown) here, and its numbers as JSON "
                                                    "beside it (the same name, .json)")
    args = parser.parse_args(argv)
    args.adapters = [int(n) for n in args.adapters.split(",") if n.strip()]
    bad = [n for n in args.adapters if n < 1 or args.batch % n]
    if not args.adapters or bad:
        parser.error(f"--adapters {bad or args.adapters}: each a positive divisor of --batch {args.batch}, so that "
                     "every adapter gets the same number of rows")
    if args.rounds < 1 or args.new_tokens < 1:
        parser.error("--rounds and --new-tokens must be at least 1")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)

    from peft_edu.assets import load_causal_lm

    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    info = machine_info(device, packages=("transformers", "peft"))
    tokenizer, base = load_causal_lm()
    results = []
    for n in args.adapters:
        print(f"{n} adapters: {args.warmup}+{args.rounds} rounds of {len(VARIANTS)} variants ...", flush=True)
        results.append(measure(n, base.eval(), tokenizer, args, device))
    record = {"command": command, "machine": info,
              "settings": {"batch": args.batch, "new_tokens": args.new_tokens, "r": args.r, "rounds": args.rounds,
                           "warmup": args.warmup, "targets": TARGETS},
              "results": results, "target": target(results)}
    report = markdown(record)
    print(report)
    if args.out:
        write_report(args.out, report, record)
    return record


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
