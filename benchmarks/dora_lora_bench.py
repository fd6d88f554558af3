"""Train-step time and peak memory: peft_edu vs Hugging Face PEFT, LoRA vs DoRA, on the course's real models.

For each model (MiniLM sequence classification on polarity sentences, SmolLM2 causal LM on packed
QA pairs) it builds four copies of the base model, {peft_edu, PEFT} x {LoRA, DoRA} with the same
targets, r, alpha, dropout and seed, and measures one training step (forward + backward + AdamW):

* time: the median over ``--steps`` timed steps, after ``--warmup`` steps. The four variants take
  their steps in turn (round robin), so a change in background load hits all of them alike.
* peak memory: one extra step per variant, measured on its own, as the peak of the bytes the step
  allocated above what was allocated before it (weights, optimizer state; gradients are set to
  None first). CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the step.
  CPU: the running sum of the tensor allocations and frees that PyTorch's CPU allocator reports to
  torch.profiler(profile_memory=True), taken at its maximum (allocations made outside PyTorch's
  allocator, e.g. oneDNN's scratch buffers, are not seen).

    python benchmarks/dora_lora_bench.py --device cpu --steps 5 --batch-size 8 --seq-len 64 \\
        --out benchmarks/results/dora_lora_cpu.md
    python benchmarks/dora_lora_bench.py --device cuda --steps 30 --batch-size 32 --seq-len 256 --out gpu.md

Speed and memory targets belong here, never in timed tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MODELS = {
    # name: (task_type, default targets: every nn.Linear of the transformer blocks)
    "minilm": ("SEQ_CLS", ["query", "key", "value", "dense"]),
    "smollm2": ("CAUSAL_LM", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}
LIBRARIES = ("peft_edu", "PEFT")
METHODS = ("LoRA", "DoRA")


# --- data -----------------------------------------------------------------------------------------
def minilm_batch(tokenizer, batch_size: int, seq_len: int) -> dict:
    """Real polarity sentences with their labels, padded to seq_len (every step sees the same shape)."""
    from peft_edu.assets import load_polarity

    train = load_polarity()["train"]
    rows = train.select(range(batch_size))
    batch = tokenizer(list(rows["text"]), padding="max_length", truncation=True, max_length=seq_len,
                      return_tensors="pt")
    return {**batch, "labels": torch.tensor(rows["label"])}


def smollm2_batch(tokenizer, batch_size: int, seq_len: int) -> dict:
    """QA pairs as chat text, packed back to back into batch_size rows of exactly seq_len tokens."""
    from peft_edu.assets import load_qa_pairs

    pairs = load_qa_pairs()["train"]
    ids: list[int] = []
    for q, a in zip(pairs["question"], pairs["answer"]):
        ids += tokenizer(f"Question: {q}\nAnswer: {a}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= batch_size * seq_len:
            break
    if len(ids) < batch_size * seq_len:
        raise SystemExit(f"Not enough QA text for {batch_size} x {seq_len} tokens; use a smaller --batch-size or --seq-len.")
    input_ids = torch.tensor(ids[: batch_size * seq_len]).view(batch_size, seq_len)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def load_model(name: str, batch_size: int, seq_len: int, dtype: torch.dtype):
    from peft_edu.assets import load_causal_lm, load_encoder

    torch.manual_seed(0)  # MiniLM's classification head is new
    if name == "minilm":
        tokenizer, model = load_encoder(num_labels=2)
        batch = minilm_batch(tokenizer, batch_size, seq_len)
    else:
        tokenizer, model = load_causal_lm()
        batch = smollm2_batch(tokenizer, batch_size, seq_len)
    return model.to(dtype), batch


# --- the four variants ----------------------------------------------------------------------------
def build_variant(base, library: str, method: str, config: dict, device):
    import peft

    import peft_edu

    model = copy.deepcopy(base)
    torch.manual_seed(1)
    cfg = dict(config, use_dora=(method == "DoRA"))
    if library == "peft_edu":
        model = peft_edu.get_peft_model(model, peft_edu.LoraConfig(**cfg))
    else:
        model = peft.get_peft_model(model, peft.LoraConfig(**cfg))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params)


def step(model, optimizer, batch) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_step_bytes(model, optimizer, batch, device) -> int:
    """Peak bytes allocated during one step above those allocated before it (see module docstring)."""
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        del loss
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        del loss
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def bench_model(name: str, args, device, dtype) -> dict:
    task_type, default_targets = MODELS[name]
    base, batch = load_model(name, args.batch_size, args.seq_len, dtype)
    batch = {k: v.to(device) for k, v in batch.items()}
    config = dict(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, task_type=task_type,
                  target_modules=args.targets.split(",") if args.targets else default_targets)
    variants = {}
    for method in METHODS:
        for library in LIBRARIES:
            model, optimizer, n_trainable = build_variant(base, library, method, config, device)
            variants[(library, method)] = {"model": model, "optimizer": optimizer, "trainable": n_trainable,
                                           "times": [], "losses": []}
    del base
    for i in range(args.warmup + args.steps):  # round robin: background load hits all variants alike
        for v in variants.values():
            torch.manual_seed(i)  # the same dropout masks for every variant in step i
            sync(device)
            start = time.perf_counter()
            loss = step(v["model"], v["optimizer"], batch)  # .item() waits for the device
            sync(device)
            if i >= args.warmup:
                v["times"].append(time.perf_counter() - start)
            v["losses"].append(loss)
    rows = []
    for (library, method), v in variants.items():
        peak = peak_step_bytes(v["model"], v["optimizer"], batch, device)
        rows.append({"model": name, "library": library, "method": method, "trainable_params": v["trainable"],
                     "median_step_s": statistics.median(v["times"]), "min_step_s": min(v["times"]),
                     "step_times_s": v["times"], "peak_step_bytes": peak, "first_loss": v["losses"][0],
                     "last_loss": v["losses"][-1]})
    for v in variants.values():
        del v["model"], v["optimizer"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "config": {k: v for k, v in config.items()}, "batch_shape": list(batch["input_ids"].shape),
            "rows": rows}


# --- report ---------------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU's model name from lscpu (platform.processor() often says only "x86_64")."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - lscpu missing: keep platform's answer
        return platform.processor() or "unknown"


def machine_info(device) -> dict:
    import peft
    import transformers

    info = {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def memory_method(device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated() minus memory_allocated() before the step"
    return ("peak of the running sum of CPU tensor allocations/frees reported to torch.profiler(profile_memory=True) "
            "during the step (PyTorch's CPU allocator; oneDNN scratch buffers not included)")


def markdown(results: list[dict], info: dict, args, command: str) -> str:
    lines = [
        "# peft_edu vs PEFT: LoRA and DoRA train steps", "",
        f"Command: `{command}`", "",
        f"Machine: {info['cpu']}, {info['cpu_cores']} cores, torch threads {info['torch_threads']}"
        + (f", GPU {info['gpu']}" if "gpu" in info else "") + f"; device `{info['device']}`, dtype {args.dtype}.",
        f"Versions: torch {info['torch']}, peft {info['peft']}, transformers {info['transformers']}, "
        f"Python {info['python']}.", "",
        f"Step = zero_grad + forward + backward + AdamW step. Time: median of {args.steps} steps after "
        f"{args.warmup} warm-up steps, the four variants of a model taking steps in turn (and the minimum, "
        "which background load on a shared machine disturbs least).",
        "Losses: each step is seeded, so peft_edu and PEFT see the same dropout masks and should print the same "
        "losses (a check that the variants compute the same thing).",
        f"Peak memory: {memory_method(torch.device(info['device']))}; MB = 10^6 bytes, above the memory "
        "allocated before the step (weights, optimizer state).", "",
    ]
    for res in results:
        cfg = res["config"]
        targets = cfg["target_modules"]
        lines += [
            f"## {res['model']} (batch {res['batch_shape'][0]} x {res['batch_shape'][1]} tokens, r={cfg['r']}, "
            f"alpha={cfg['lora_alpha']}, dropout={cfg['lora_dropout']}, targets {', '.join(targets)})", "",
            "| method | library | trainable params | median step (ms) | min step (ms) | peak step memory (MB) "
            "| loss, first → last step |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        by = {(r["library"], r["method"]): r for r in res["rows"]}
        for method in METHODS:
            for library in LIBRARIES:
                r = by[(library, method)]
                lines.append(f"| {method} | {library} | {r['trainable_params']:,} | {1e3 * r['median_step_s']:.1f} | "
                             f"{1e3 * r['min_step_s']:.1f} | {r['peak_step_bytes'] / 1e6:.1f} | "
                             f"{r['first_loss']:.5f} → {r['last_loss']:.5f} |")
        lines += ["", "| ratio | time (median) | time (min) | peak memory |", "|---|---:|---:|---:|"]
        pairs = [(f"{m}: peft_edu / PEFT", by[("peft_edu", m)], by[("PEFT", m)]) for m in METHODS]
        pairs += [(f"{lib}: DoRA / LoRA", by[(lib, "DoRA")], by[(lib, "LoRA")]) for lib in LIBRARIES]
        for label, a, b in pairs:
            lines.append(f"| {label} | {a['median_step_s'] / b['median_step_s']:.3f} | "
                         f"{a['min_step_s'] / b['min_step_s']:.3f} | {a['peak_step_bytes'] / b['peak_step_bytes']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--models", default="minilm,smollm2", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--targets", default=None, help="comma-separated target_modules (default: every linear layer)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--out", default=None, help="write the table here (.md) and the raw numbers next to it (.json)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    dtype = getattr(torch, args.dtype)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")

    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    info = machine_info(device)
    results = []
    for name in models:
        print(f"[{name}] building 4 variants and timing {args.warmup}+{args.steps} steps each ...", flush=True)
        results.append(bench_model(name, args, device, dtype))
    report = markdown(results, info, args, command)
    print(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(report + "\n")
        out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": info, "args": vars(args),
                                                         "memory_method": memory_method(device),
                                                         "results": results}, indent=2) + "\n")
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
