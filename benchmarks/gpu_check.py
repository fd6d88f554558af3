"""The GPU check (``make gpu-check``): every GPU path of the course in one prepared run of at most 10 minutes.

Parts, each in its own try/except (a failure is recorded with its traceback and the next part runs), each given
at most what is left of a global time budget (``--budget-s``, default 540 s; a part that would start with less
than its minimum is recorded as skipped):

1. **environment**: the versions this machine has (Python, torch, CUDA, transformers, peft, adapters,
   bitsandbytes, accelerate), the course's pins beside them, the card's name and driver.
2. **harness**: ``compare_methods.py`` on CUDA, every method against its reference (train step, step memory with
   the measured CUDA peak, inference, file size), three times: float32; bfloat16 weights (adapters included); and
   float32 weights under bfloat16 autocast, the way ``peft_edu.training`` trains on CUDA.
3. **QLoRA**: PEFT LoRA on transformers + bitsandbytes' 4-bit model (bitsandbytes' CUDA kernels, bfloat16
   compute) against peft_edu LoRA on ``peft_edu.quantize_model`` (its ``Linear4bit``, the same NF4 codes), and
   peft_edu LoRA on the unquantised bfloat16 model: step time (interleaved medians), measured peak step memory,
   resident bytes, first losses (the two QLoRA variants should agree to bfloat16 rounding).
4. **mixed batch**: ``mixed_batch_bench.py`` on CUDA: SmolLM2 generation with 1, 4 and 16 distinct LoRA
   adapters in a batch of 32, peft_edu's batched gather against PEFT's mixed batch and against merging each
   adapter in turn (issue 15's throughput target: ≥ 1.5 × PEFT at 16 adapters).
5. **gradient checkpointing**: peft_edu LoRA with and without transformers' checkpointing (use_reentrant=True, its
   default, which peft_edu mends): peak step memory saved, step time paid, and the largest difference between the
   two runs' gradients.
6. **distributed**: ``tests/distributed_worker.py`` (the CPU test's training script) on the card: DDP with two
   processes sharing it (gloo, which takes CUDA tensors) against one process; the largest difference of the
   saved adapters and the wall time of each launch.
7. **chapter run**: the LoRA chapter's experiment at full length (MiniLM on the whole polarity training split,
   ``peft_edu.training.train``); needs the course's assets, else skipped.

Results go to ``benchmarks/results/gpu/<card-name-slug>/``: ``gpu_check.json`` (everything, with the command,
machine, versions and date), ``gpu_check.md`` (a summary), the harness's own ``compare_methods_<precision>.{md,json}``
and ``mixed_batch.{md,json}``.

    python benchmarks/gpu_check.py                  # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --cpu-dry-run    # every code path on the CPU at tiny sizes, into a temp folder

**What it needs** (it does not need the course's pinned virtual environment): torch with CUDA, transformers,
peft, adapters (the harness) and bitsandbytes (QLoRA), importable by the Python that runs it; ``peft_edu`` is
imported from this working tree. It checks and records the versions it finds first, and each part that lacks
a package fails on its own. The course pins peft 0.21.2, adapters 1.3.0, bitsandbytes 0.50.2, transformers
4.57.x; with other versions a part may fail, and the record says which. Without the course's model packages
(``peft_edu.assets``; the GPU machine has no network to fetch them) the parts use randomly initialised models of
the same shapes (MiniLM's for the harness, SmolLM2-135M's for QLoRA and checkpointing) and random token ids,
which is enough for time and memory, and say so; the chapter run is then skipped.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PEFT_EDU_PROGRESS", "0")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]  # compare_methods.py, and peft_edu from this tree without an install

PINNED = {"peft": "0.21.2", "adapters": "1.3.0", "bitsandbytes": "0.50.2", "transformers": "4.57"}
PACKAGES = ("torch", "transformers", "peft", "adapters", "bitsandbytes", "accelerate", "safetensors", "numpy")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PartTimeout(Exception):
    pass


# --- environment ---------------------------------------------------------------------------------------------
def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception as error:  # noqa: BLE001 - a missing package is a finding, not a crash
            found[name] = f"missing ({type(error).__name__}: {error})"
    return found


def environment(ctx) -> dict:
    import torch

    info = {"versions": versions(), "pinned": PINNED, "cuda_available": torch.cuda.is_available(),
            "torch_cuda": torch.version.cuda, "cpu_cores": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as error:  # noqa: BLE001
            info["driver"] = f"unknown ({error})"
    info["assets"] = ctx["assets"]
    differs = {k: (info["versions"].get(k), v) for k, v in PINNED.items()
               if not str(info["versions"].get(k, "")).startswith(v)}
    info["differs_from_pins"] = differs
    return info


def assets_available(dry: bool) -> dict:
    """Which of the course's models and data are installed (peft_edu.assets); a dry run needs no SmolLM2."""
    found = {}
    for name, loader in (("minilm", "load_encoder"), ("polarity", "load_polarity"), ("smollm2", "load_causal_lm")):
        if dry and name == "smollm2":
            found[name] = False
            continue
        try:
            getattr(importlib.import_module("peft_edu.assets"), loader)()
            found[name] = True
        except Exception:  # noqa: BLE001 - not installed here: the parts fall back to random models
            found[name] = False
    return found


# --- models --------------------------------------------------------------------------------------------------
def llama(ctx):
    """(SmolLM2-135M or a random model of its shapes; tiny in a dry run, what it is)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if ctx["assets"]["smollm2"] and not ctx["dry"]:
        from peft_edu.assets import load_causal_lm

        return load_causal_lm()[1], "SmolLM2-135M (peft_edu.assets)"
    sizes = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=1000) if ctx["dry"] else
             dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                  intermediate_size=1536, vocab_size=49152))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, max_position_embeddings=2048, **sizes))
    return model, ("a tiny random Llama" if ctx["dry"] else "random weights with SmolLM2-135M's shapes")


def token_batch(vocab: int, batch_size: int, seq_len: int, device) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}


def interleaved_steps(variants: dict, batch, rounds: int, warmup: int, device) -> dict:
    from compare_methods import interleaved
    from harness import train_step

    losses = {k: [] for k in variants}
    runs = {k: (lambda i, k=k, mo=mo: losses[k].append(train_step(*mo, batch))) for k, mo in variants.items()}
    times = interleaved(runs, rounds, warmup, seed=0, device=device)
    return {k: {"median_step_s": statistics.median(times[k]), "min_step_s": min(times[k]), "losses": losses[k]}
            for k in variants}


def peak_bytes(model, optimizer, batch, device) -> int:
    """CUDA: the measured peak of a step; CPU (dry run): the deterministic bytes kept for backward."""
    from compare_methods import saved_for_backward_bytes
    from harness import peak_step_bytes

    if device.type == "cuda":
        return peak_step_bytes(model, optimizer, batch, device)
    return saved_for_backward_bytes(model, batch)


# --- the parts -----------------------------------------------------------------------------------------------
def harness(ctx, precision: str) -> dict:
    import compare_methods

    out = ctx["out"] / f"compare_methods_{precision}"
    dtype = ["--dtype", "bfloat16"] if precision == "bfloat16" else []
    dtype += ["--autocast-bf16"] if precision == "autocast_bf16" else []
    if ctx["dry"]:
        argv = ["--models", "tiny-bert", "--quick", "--device", "cpu"] + dtype
    else:
        models = ",".join([m for m in ("minilm", "smollm2") if ctx["assets"][m]] or ["minilm-random"])
        argv = ["--models", models, "--device", "cuda"] + dtype + ["--steps", "20", "--warmup", "5",
                "--batch-size", "32", "--seq-len", "128", "--infer-batch", "32", "--infer-reps", "20"]
    record = compare_methods.run(argv + ["--out", str(out)])
    return {"files": [f"{out.name}.md", f"{out.name}.json"], "targets": record["targets"],
            "ratios": {res["model"]: res["ratios"] for res in record["results"]}}


def qlora(ctx) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import peft
    import peft_edu
    from qlora_bench import resident_bytes

    device = ctx["device"]
    bf16 = torch.bfloat16
    base, source = llama(ctx)
    base = base.to(bf16)  # both sides quantise the same bfloat16 weights
    lora = dict(r=16, lora_alpha=32, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(folder)
        bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=bf16)
        theirs = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config, dtype=bf16,
                                                      device_map={"": str(device)}, local_files_only=True)
        torch.manual_seed(1)
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(**lora))
        torch.manual_seed(1)
        ours = peft_edu.get_peft_model(peft_edu.quantize_model(copy.deepcopy(base).to(device), compute_dtype=bf16),
                                       peft_edu.LoraConfig(**lora))
        torch.manual_seed(1)
        plain = peft_edu.get_peft_model(copy.deepcopy(base).to(device), peft_edu.LoraConfig(**lora))
    variants = {}
    for name, model in (("QLoRA (peft_edu Linear4bit)", ours), ("QLoRA (PEFT + bitsandbytes)", theirs),
                        ("LoRA bf16 (peft_edu)", plain)):
        model.train()
        variants[name] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    counts = {k: sum(p.numel() for p in mo[0].parameters() if p.requires_grad) for k, mo in variants.items()}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"trainable counts differ: {counts}")
    batch_size, seq_len, rounds, warmup = (2, 16, 2, 1) if ctx["dry"] else (8, 512, 15, 3)
    batch = token_batch(base.config.vocab_size, batch_size, seq_len, device)
    result = {"model": source, "batch": [batch_size, seq_len], "lora": lora, "trainable_params": counts[next(iter(counts))],
              "time": interleaved_steps(variants, batch, rounds, warmup, device), "memory": {}}
    for name, (model, optimizer) in variants.items():
        result["memory"][name] = {"resident_bytes": resident_bytes(model, optimizer),
                                  "peak_step_bytes": peak_bytes(model, optimizer, batch, device)}
    t = result["time"]
    result["ratios"] = {
        "step: peft_edu QLoRA / PEFT + bitsandbytes": t["QLoRA (peft_edu Linear4bit)"]["median_step_s"]
        / t["QLoRA (PEFT + bitsandbytes)"]["median_step_s"],
        "step: peft_edu QLoRA / LoRA bf16": t["QLoRA (peft_edu Linear4bit)"]["median_step_s"]
        / t["LoRA bf16 (peft_edu)"]["median_step_s"],
        "resident: peft_edu QLoRA / PEFT + bitsandbytes": result["memory"]["QLoRA (peft_edu Linear4bit)"]["resident_bytes"]
        / result["memory"]["QLoRA (PEFT + bitsandbytes)"]["resident_bytes"],
        "peak step: peft_edu QLoRA / PEFT + bitsandbytes": result["memory"]["QLoRA (peft_edu Linear4bit)"]["peak_step_bytes"]
        / result["memory"]["QLoRA (PEFT + bitsandbytes)"]["peak_step_bytes"],
        "first loss difference (peft_edu - PEFT)": t["QLoRA (peft_edu Linear4bit)"]["losses"][0]
        - t["QLoRA (PEFT + bitsandbytes)"]["losses"][0],
    }
    step_ratio = result["ratios"]["step: peft_edu QLoRA / PEFT + bitsandbytes"]
    result["targets"] = [{"passed": step_ratio <= 1.10, "target": f"peft_edu QLoRA step / PEFT + bitsandbytes = "
                                                                  f"{step_ratio:.3f} (issue 14's target ≤ 1.10)"}]
    return result


def checkpointing(ctx) -> dict:
    import torch

    import peft_edu

    device = ctx["device"]
    base, source = llama(ctx)
    batch_size, seq_len, rounds, warmup = (2, 16, 2, 1) if ctx["dry"] else (8, 1024, 10, 2)
    batch = token_batch(base.config.vocab_size, batch_size, seq_len, device)
    variants = {}
    for name, checkpointed in (("without checkpointing", False), ("with checkpointing", True)):
        torch.manual_seed(1)
        model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(r=16, lora_alpha=32,
                                        target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")).to(device).train()
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        variants[name] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    grads = {}
    for name, (model, _) in variants.items():  # one backward each, before any optimizer step: the same weights
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads[name] = {n: None if p.grad is None else p.grad.detach().float().clone()
                       for n, p in model.named_parameters() if p.requires_grad}
    # None: backward never reached the tensor (what reentrant checkpointing does to a frozen model unmended). A zero
    # gradient is expected: LoRA's A gets none while B starts at zero.
    missing = [n for n, g in grads["with checkpointing"].items() if g is None]
    if missing:
        raise RuntimeError(f"{len(missing)} adapter tensors got no gradient under checkpointing, e.g. {missing[0]}")
    max_diff = max((grads["with checkpointing"][n] - g).abs().max().item() for n, g in grads["without checkpointing"].items())
    memory = {name: peak_bytes(model, opt, batch, device) for name, (model, opt) in variants.items()}
    times = interleaved_steps(variants, batch, rounds, warmup, device)
    return {"model": source, "batch": [batch_size, seq_len], "use_reentrant": True,
            "memory_measure": "measured CUDA peak step bytes" if device.type == "cuda" else
            "bytes kept for backward during the forward (CPU dry run)",
            "peak_step_bytes": memory, "time": times,
            "memory_with / without": memory["with checkpointing"] / memory["without checkpointing"],
            "step_time_with / without": times["with checkpointing"]["median_step_s"]
            / times["without checkpointing"]["median_step_s"],
            "max_grad_difference": max_diff, "adapter_tensors_without_gradient": len(missing)}


def distributed(ctx) -> dict:
    import torch
    from safetensors.torch import load_file

    from harness import run_bounded

    worker = Path(__file__).resolve().parents[1] / "tests" / "distributed_worker.py"
    env = {**os.environ, "PEFT_EDU_DEVICE": ctx["device"].type, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    launches, adapters = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for engine in ("single", "ddp"):
            out = Path(folder) / engine
            command = [sys.executable, str(worker), engine, str(out)] if engine == "single" else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--local-addr", "127.0.0.1", str(worker), engine, str(out)]  # no DNS lookup of the host's name
            begin = time.monotonic()
            returncode, output = run_bounded(command, 120, env=env)  # kills torchrun's workers too
            launches[engine] = {"seconds": time.monotonic() - begin, "returncode": returncode}
            if returncode != 0:
                raise RuntimeError(f"{engine} {'ran past 120 s' if returncode is None else 'failed'}: {output[-1500:]}")
            adapters[engine] = load_file(out / "adapter_model.safetensors")
    diff = max((adapters["ddp"][k] - v).abs().max().item() for k, v in adapters["single"].items())
    return {"engines": launches, "device": ctx["device"].type, "max_adapter_difference_ddp_vs_single": diff,
            "targets": [{"passed": diff <= 1e-5, "target": f"DDP adapter = one-process adapter (max diff {diff:.2e}, "
                                                           "tolerance 1e-5)"}]}


def mixed_batch(ctx) -> dict:
    import mixed_batch_bench

    out = ctx["out"] / "mixed_batch"
    if ctx["dry"]:
        argv = ["--adapters", "1,2", "--batch", "4", "--new-tokens", "2", "--rounds", "1", "--warmup", "0",
                "--device", "cpu"]
    else:
        # the CPU recording's settings; PEFT's loop and the 16 merges make the 16-adapter rounds the long ones
        argv = ["--adapters", "1,4,16", "--batch", "32", "--new-tokens", "16", "--rounds", "5", "--warmup", "1",
                "--device", "cuda"]
    record = mixed_batch_bench.run(argv + ["--out", str(out.with_suffix(".md"))])
    t = record["target"]
    return {"files": [f"{out.name}.md", f"{out.name}.json"],
            "targets": [{"verdict": t["verdict"], "target": f"{t['target']} at {t['adapters']} adapters: "
                                                            f"{t['throughput_ratio']:.2f}"}]}


def chapter_lora(ctx) -> dict:
    import torch

    import peft_edu
    from peft_edu.assets import load_encoder, load_polarity
    from peft_edu.training import classification_loaders, train

    if not (ctx["assets"]["minilm"] and ctx["assets"]["polarity"]):
        raise RuntimeError("skipped: needs peft_edu.assets' MiniLM and polarity data, which are not installed here")
    torch.manual_seed(0)
    tokenizer, model = load_encoder(num_labels=2)
    model = peft_edu.get_peft_model(model, peft_edu.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                               task_type="SEQ_CLS"))
    limit = {"train": 64, "validation": 64, "test": 64} if ctx["dry"] else None
    loaders = classification_loaders(tokenizer, load_polarity(), batch_size=32, limit=limit)
    history = train(model, loaders["train"], loaders["validation"], epochs=1 if ctx["dry"] else 3, lr=1e-3,
                    device=ctx["device"], max_steps=2 if ctx["dry"] else None, print_summary=False)
    return {"experiment": "LoRA chapter: MiniLM, r=8, query+value, polarity, lr 1e-3, batch 32", "history": history}


# The limits keep a GPU run within its 10 minutes. A CPU dry run checks the code paths, not the speed, and on a
# loaded 2-core machine (make test runs the chapters beside it) its parts can take several times a GPU's; it gets
# this many times every limit and the budget, so that load alone does not fail it.
DRY_RUN_LIMIT_SCALE = 4
PARTS = [  # name, function, minimum seconds left to start it, its own limit (seconds)
    ("environment", environment, 1, 60),
    ("harness_float32", lambda ctx: harness(ctx, "float32"), 60, 150),
    ("harness_bfloat16", lambda ctx: harness(ctx, "bfloat16"), 60, 120),
    ("harness_autocast_bf16", lambda ctx: harness(ctx, "autocast_bf16"), 60, 120),
    ("qlora", qlora, 45, 120),
    ("mixed_batch", mixed_batch, 45, 150),
    ("gradient_checkpointing", checkpointing, 30, 90),
    ("distributed", distributed, 30, 90),
    ("chapter_lora_full_run", chapter_lora, 30, 120),
]


# --- driver --------------------------------------------------------------------------------------------------
def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def on_alarm(signum, frame):
    raise PartTimeout("the part ran past its time limit")


def run_parts(ctx, budget_s: float, only: list[str] | None, limit_scale: float = 1) -> dict:
    started, parts = time.monotonic(), {}
    has_alarm = hasattr(signal, "SIGALRM")
    previous_handler = signal.signal(signal.SIGALRM, on_alarm) if has_alarm else None
    for name, function, minimum, limit in PARTS:
        limit *= limit_scale
        if only and name not in only and name != "environment":
            continue
        left = budget_s - (time.monotonic() - started)
        if left < minimum:
            parts[name] = {"status": "skipped", "reason": f"{left:.0f} s of the budget left, the part needs {minimum} s"}
            continue
        print(f"== {name} (limit {min(limit, left):.0f} s)", flush=True)
        begin = time.monotonic()
        if has_alarm:
            signal.alarm(max(1, int(min(limit, left))))
        try:
            parts[name] = {"status": "ok", "result": function(ctx)}
        except (Exception, SystemExit) as error:  # noqa: BLE001 - record and go on to the next part
            skipped = str(error).startswith("skipped:")
            parts[name] = {"status": "skipped" if skipped else "failed", "error": f"{type(error).__name__}: {error}",
                           "traceback": None if skipped else traceback.format_exc()}
            print(f"   {parts[name]['status']}: {parts[name]['error']}", flush=True)
        finally:
            if has_alarm:
                signal.alarm(0)
        parts[name]["seconds"] = time.monotonic() - begin
        if ctx["device"].type == "cuda":
            import torch

            torch.cuda.empty_cache()
    if has_alarm:
        signal.signal(signal.SIGALRM, previous_handler)
    return parts


def markdown(record: dict) -> str:
    env = record["parts"].get("environment", {}).get("result", {})
    lines = ["# GPU check", "", f"Command: `{record['command']}`", "",
             f"Card: {record['card']}; driver {env.get('driver', '–')}; date {record['date']}; "
             f"{record['total_seconds']:.0f} s in all (budget {record['budget_s']:.0f} s).",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in record["versions"].items()) + ".",
             f"Course assets found: {record['assets']} (where absent: random weights of the same shapes).",
             "", "| part | status | seconds | summary |", "|---|---|---:|---|"]
    for name, part in record["parts"].items():
        result = part.get("result", {})
        if part["status"] != "ok":
            summary = part.get("error") or part.get("reason", "")
        elif "files" in result:  # the harness: its report has every ratio
            counts = {v: sum(t["verdict"] == v for t in result["targets"]) for v in ("PASS", "FAIL", "NOT RESOLVED")}
            summary = (f"of {len(result['targets'])} targets: " + ", ".join(f"{n} {v}" for v, n in counts.items())
                       + "; " + "; ".join(f"{t['verdict']} {t['target']}" for t in result["targets"]
                                          if t["verdict"] != "PASS") + f" (see {result['files'][0]})")
        elif "targets" in result:
            summary = "; ".join(f"{'PASS' if t['passed'] else 'FAIL'} {t['target']}" for t in result["targets"])
        elif "memory_with / without" in result:
            summary = (f"memory with / without {result['memory_with / without']:.3f}, step time "
                       f"{result['step_time_with / without']:.3f}, max gradient difference "
                       f"{result['max_grad_difference']:.2e}")
        elif "history" in result:
            summary = ", ".join(f"epoch {h['epoch']}: accuracy {h.get('accuracy', float('nan')):.4f} in {h['seconds']:.1f} s"
                                for h in result["history"])
        else:
            summary = "recorded in gpu_check.json"
        summary = summary.replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {part['status']} | {part.get('seconds', 0):.1f} | {summary} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="every code path on the CPU at tiny sizes, written to a temporary folder (or --out-dir)")
    parser.add_argument("--budget-s", type=float, default=540, help="global time budget in seconds (default 540)")
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results/gpu/<card-name-slug>/")
    parser.add_argument("--parts", default=None, help="comma-separated part names (environment always runs): "
                        + ", ".join(p[0] for p in PARTS))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    only = [p.strip() for p in args.parts.split(",")] if args.parts else None
    unknown = [p for p in only or [] if p not in [q[0] for q in PARTS]]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {[q[0] for q in PARTS]}")
    start = time.monotonic()
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or use --cpu-dry-run to exercise the code on the CPU")
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    card = "cpu-dry-run" if args.cpu_dry_run else torch.cuda.get_device_name(0)
    out = Path(args.out_dir) if args.out_dir else (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.cpu_dry_run
                                                   else REPO / "benchmarks" / "results" / "gpu" / slug(card))
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu_dry_run:
        torch.set_num_threads(1)
    ctx = {"device": device, "dry": args.cpu_dry_run, "out": out, "assets": assets_available(args.cpu_dry_run)}
    print(f"gpu_check on {card}: versions {versions()}; course assets {ctx['assets']}; "
          f"writing to {out}", flush=True)
    scale = DRY_RUN_LIMIT_SCALE if args.cpu_dry_run else 1
    parts = run_parts(ctx, scale * args.budget_s - (time.monotonic() - start), only, scale)
    record = {"command": "python benchmarks/gpu_check.py " + " ".join(argv), "card": card, "slug": slug(card),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "versions": versions(),
              "assets": ctx["assets"], "budget_s": scale * args.budget_s, "total_seconds": time.monotonic() - start,
              "parts": parts}
    (out / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    report = markdown(record)
    (out / "gpu_check.md").write_text(report + "\n")
    print(report)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
