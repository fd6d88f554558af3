"""QLoRA on SmolLM2: the bytes of a 4-bit base, the memory of training on it, and the time dequantising costs.

Three measurements, each against the paper's arithmetic or a reference (QLoRA, arXiv 2305.14314):

* **storage**: the bytes of SmolLM2's 210 linear weights (the ones transformers and ``peft_edu.quantize_model``
  quantise: every nn.Linear but the tied output head) in float32, bfloat16, NF4 and NF4 with double quantisation,
  as bits per parameter against 4 + 32/64 = 4.5 and 4 + 8/64 + 32/(64·256) ≈ 4.127; and the whole model's bytes
  (embeddings and norms stay in float32, as transformers keeps them).
* **training memory**: LoRA on the float32 base vs QLoRA (peft_edu on its 4-bit base; PEFT on bitsandbytes' base,
  loaded by transformers with BitsAndBytesConfig) at the same batch: resident bytes (weights, buffers, bitsandbytes'
  quantisation state, optimizer state) plus the peak a training step allocates on top (``harness.peak_step_bytes``,
  torch.profiler's CPU allocations).
  Both with the 4-bit layers computing in float32 and, as the paper's QLoRA does, in bfloat16 (``--compute-dtypes``;
  the bfloat16 family is a bfloat16 base, so also LoRA on a bfloat16 base, to show what each half saves).
* **step time**: zero_grad + forward + backward + AdamW, the variants taking steps in turn (round robin) so that
  background load hits them alike; median and minimum of ``--steps`` steps. QLoRA / LoRA-fp32 is the cost of
  dequantising every base weight twice per step (forward, and backward for the input's gradient): it weighs most
  at small batches, where the matrix products are small.

Memory and time are measured for each of ``--batch-sizes`` (rows of ``--seq-len`` tokens of QA text).

    python benchmarks/qlora_bench.py --threads 1 --steps 7 --warmup 2 --batch-sizes 1,8 --seq-len 64 \\
        --out <scratch>.md       # then copied into benchmarks/results/qlora_cpu.md with the other runs

The loss over the vocabulary: transformers' causal-LM loss holds the whole batch's logits in float32, which at
8 × 64 tokens is more than half of a QLoRA step's peak. Two variants compute it with
``peft_edu.chunked_causal_lm_loss`` instead (the same value and gradients, 128 positions at a time), LoRA on the
float32 base and QLoRA in bfloat16, so that each side of the memory target is measured with either loss.

Targets (issue 14): 4-bit weights ≤ 0.30 × their float32 bytes; QLoRA peak training memory ≤ 0.5 × LoRA's on the
float32 base (judged for each loss, the same on both sides); peft_edu QLoRA step ≤ 1.10 × PEFT + bitsandbytes
(paired per-round ratios, ``harness.verdict``). CPU only: bitsandbytes' CUDA kernels are not here.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (LOSSES, machine_info, paired_ratio, peak_step_bytes, smollm2_batch, train_step,  # noqa: E402
                     verdict, write_report)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# variant: (library, base, loss). A base is "<kind> <compute dtype>": the float SmolLM2, peft_edu's 4-bit copy of it
# (quantize_model) or transformers + bitsandbytes' 4-bit load. In the bfloat16 family the embedding and norms are
# bfloat16 too (what loading with dtype=torch.bfloat16 gives) and the 4-bit layers compute in bfloat16, as the
# paper's QLoRA does (its Eq. 5: BF16 inputs and BF16 adapters on an NF4 base). The loss is transformers' own
# (model(**batch).loss: the whole batch's logits at once, in float32) or peft_edu.chunked_causal_lm_loss (128
# positions at a time), which changes no number of the step but what the loss over the vocabulary keeps.
VARIANTS = {
    "LoRA fp32 (peft_edu)": ("peft_edu", "float float32", "model"),
    "QLoRA (peft_edu)": ("peft_edu", "nf4 float32", "model"),
    "QLoRA (PEFT + bitsandbytes)": ("PEFT", "bnb float32", "model"),
    "LoRA bf16 (peft_edu)": ("peft_edu", "float bfloat16", "model"),
    "QLoRA bf16 (peft_edu)": ("peft_edu", "nf4 bfloat16", "model"),
    "QLoRA bf16 (PEFT + bitsandbytes)": ("PEFT, bfloat16 adapters", "bnb bfloat16", "model"),
    # PEFT's default, autocast_adapter_dtype=True, keeps A and B in float32 on a bfloat16 base, and casts each
    # layer's input to float32 for them: more memory kept for backward
    "QLoRA bf16, float32 adapters (PEFT's default)": ("PEFT", "bnb bfloat16", "model"),
    "LoRA fp32 (peft_edu), chunked loss": ("peft_edu", "float float32", "chunked"),
    "QLoRA bf16 (peft_edu), chunked loss": ("peft_edu", "nf4 bfloat16", "chunked"),
}
BASELINE = "LoRA fp32 (peft_edu)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def variants_for(compute_dtypes: list[str]) -> list[str]:
    return [v for v, (_, base, _) in VARIANTS.items() if base.split()[1] in compute_dtypes]


# --- the bases -----------------------------------------------------------------------------------------
def load_bases(compute_dtypes: list[str]):
    """(tokenizer, {base name: model}) for every compute dtype asked for; see VARIANTS."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import peft_edu
    from peft_edu.assets import load_causal_lm

    tokenizer, fp32 = load_causal_lm()
    bases = {}
    for name in ["float32"] + [d for d in compute_dtypes if d != "float32"]:
        dtype = DTYPES[name]
        # loaded in the dtype, as transformers loads the 4-bit model (not fp32.to(dtype), which would also round
        # the rotary embedding's float32 inv_freq buffer and so compute another function)
        float_base = fp32 if dtype == torch.float32 else load_causal_lm(dtype)[1]
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
        bases[f"float {name}"] = float_base
        bases[f"nf4 {name}"] = peft_edu.quantize_model(copy.deepcopy(float_base), compute_dtype=dtype)
        bases[f"bnb {name}"] = AutoModelForCausalLM.from_pretrained(
            fp32.name_or_path, quantization_config=config, dtype=dtype, device_map="cpu", local_files_only=True)
    return tokenizer, bases


def resident_bytes(model, optimizer=None) -> int:
    """Bytes the model keeps between steps: parameters, buffers, bitsandbytes' quantisation state (its absmax,
    code books and double-quantisation constants live outside the parameters) and the optimizer's state."""
    tensors = {}
    for t in list(model.parameters()) + list(model.buffers()):
        tensors[t.data_ptr()] = t.numel() * t.element_size()
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        for holder in (state, getattr(state, "state2", None)):
            for name in ("absmax", "code", "offset"):
                t = getattr(holder, name, None)
                if isinstance(t, torch.Tensor):
                    tensors[t.data_ptr()] = t.numel() * t.element_size()
    if optimizer is not None:
        for state in optimizer.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor):
                    tensors[t.data_ptr()] = t.numel() * t.element_size()
    return sum(tensors.values())


# --- storage ----------------------------------------------------------------------------------------------
def storage(bases: dict) -> dict:
    from peft_edu.qlora import Linear4bit
    from peft_edu.quantization import NF4Weight, paper_bits_per_parameter, quantize_absmax, quantize_nf4

    fp32, ours = bases["float float32"], bases["nf4 float32"]
    weights = {n: m.weight for n, m in fp32.named_modules() if isinstance(ours.get_submodule(n), Linear4bit)}
    params = sum(w.numel() for w in weights.values())
    nf4 = dq = 0
    for w in weights.values():
        plain = quantize_nf4(w)  # the double-quantised form reuses its absmax
        nf4 += plain.nbytes()
        dq += NF4Weight(plain.codes, quantize_absmax(plain.absmax), plain.shape, plain.dtype).nbytes()
    quantised = {"float32": 4 * params, "bfloat16": 2 * params, "NF4": nf4, "NF4 + double quantisation": dq}
    paper = {"float32": 32.0, "bfloat16": 16.0, "NF4": paper_bits_per_parameter(False),
             "NF4 + double quantisation": paper_bits_per_parameter(True)}
    whole = {"float32": resident_bytes(fp32), "bfloat16": resident_bytes(fp32) // 2,
             "4-bit (peft_edu.quantize_model)": resident_bytes(ours),
             "4-bit (transformers + bitsandbytes)": resident_bytes(bases["bnb float32"])}
    if "nf4 bfloat16" in bases:
        whole["4-bit, bfloat16 embedding and norms (peft_edu)"] = resident_bytes(bases["nf4 bfloat16"])
        whole["4-bit, bfloat16 embedding and norms (transformers + bitsandbytes)"] = resident_bytes(bases["bnb bfloat16"])
    return {"layers": len(weights), "params": params, "quantised": quantised, "paper_bits": paper, "whole_model": whole}


# --- training ---------------------------------------------------------------------------------------------------
def build(variant: str, bases: dict, r: int, lora_alpha: float):
    import peft

    import peft_edu

    library, base, _ = VARIANTS[variant]
    config = dict(r=r, lora_alpha=lora_alpha, target_modules=TARGETS, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    if library.startswith("PEFT"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(copy.deepcopy(bases[base]), peft.LoraConfig(**config),
                                        autocast_adapter_dtype=library == "PEFT")
    else:
        model = peft_edu.get_peft_model(copy.deepcopy(bases[base]), peft_edu.LoraConfig(**config))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def train_at(batch_size: int, bases: dict, tokenizer, args) -> dict:
    """Memory, then step times, of the variants at one batch size."""
    batch = smollm2_batch(tokenizer, batch_size, args.seq_len)
    runs = {v: {"model_optimizer": build(v, bases, args.r, args.lora_alpha), "times": [], "losses": []}
            for v in variants_for(args.compute_dtypes)}
    memory = {}
    for variant, run in runs.items():
        model, optimizer = run["model_optimizer"]
        loss_of = LOSSES[VARIANTS[variant][2]]
        train_step(model, optimizer, batch, loss_of=loss_of)  # the optimizer's state exists from the first step on
        peak = peak_step_bytes(model, optimizer, batch, torch.device("cpu"), loss_of=loss_of)
        resident = resident_bytes(model, optimizer)
        adapter_dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
        memory[variant] = {"resident_bytes": resident, "peak_step_bytes": peak, "total_bytes": resident + peak,
                           "adapter_dtype": str(adapter_dtype).removeprefix("torch."), "loss": VARIANTS[variant][2]}
    for i in range(args.warmup + args.steps):  # round robin: background load hits every variant alike
        for variant, run in runs.items():
            torch.manual_seed(i)
            start = time.perf_counter()
            loss = train_step(*run["model_optimizer"], batch, loss_of=LOSSES[VARIANTS[variant][2]])
            if i >= args.warmup:
                run["times"].append(time.perf_counter() - start)
            run["losses"].append(loss)
    times = {v: {"median_step_s": statistics.median(r["times"]), "min_step_s": min(r["times"]),
                 "step_times_s": r["times"], "losses": r["losses"]} for v, r in runs.items()}
    run = {"batch": [batch_size, args.seq_len], "memory": memory, "time": times}
    return {**run, "ratios": ratios(run)}


# --- targets ----------------------------------------------------------------------------------------------------
MEMORY_TARGET, TIME_TARGET = 0.5, 1.10
# (label, variant, against, target or None): memory as total bytes, times as paired per-round step-time ratios
MEMORY_RATIOS = [
    ("QLoRA fp32 / LoRA fp32 (peft_edu)", "QLoRA (peft_edu)", BASELINE, MEMORY_TARGET),
    ("QLoRA bf16 / LoRA fp32 (peft_edu), transformers' loss", "QLoRA bf16 (peft_edu)", BASELINE, MEMORY_TARGET),
    ("QLoRA bf16 / LoRA fp32 (peft_edu), both with the chunked loss", "QLoRA bf16 (peft_edu), chunked loss",
     "LoRA fp32 (peft_edu), chunked loss", MEMORY_TARGET),
]
TIME_RATIOS = [
    ("QLoRA fp32: peft_edu / PEFT + bitsandbytes", "QLoRA (peft_edu)", "QLoRA (PEFT + bitsandbytes)", TIME_TARGET),
    ("QLoRA bf16: peft_edu / PEFT + bitsandbytes", "QLoRA bf16 (peft_edu)", "QLoRA bf16 (PEFT + bitsandbytes)",
     TIME_TARGET),
    ("peft_edu: QLoRA fp32 / LoRA fp32 (the cost of dequantising)", "QLoRA (peft_edu)", BASELINE, None),
    ("peft_edu: QLoRA bf16 / LoRA bf16 (the cost of dequantising)", "QLoRA bf16 (peft_edu)", "LoRA bf16 (peft_edu)",
     None),
    ("PEFT + bitsandbytes QLoRA fp32 / peft_edu LoRA fp32", "QLoRA (PEFT + bitsandbytes)", BASELINE, None),
    ("LoRA fp32: chunked loss / transformers' loss (the head run twice)", "LoRA fp32 (peft_edu), chunked loss",
     BASELINE, None),
    ("QLoRA bf16: chunked loss / transformers' loss", "QLoRA bf16 (peft_edu), chunked loss", "QLoRA bf16 (peft_edu)",
     None),
]


def ratios(run: dict) -> list[dict]:
    """Every ratio of one batch size that this run measured: value, interval (times), target and verdict."""
    memory, times = run["memory"], run["time"]
    out = []
    for label, a, b, target in MEMORY_RATIOS:
        if a in memory and b in memory:
            value = memory[a]["total_bytes"] / memory[b]["total_bytes"]
            out.append({"label": label, "kind": "memory", "value": value, "low": None, "high": None,
                        "target": target, "verdict": verdict(value, None, None, target)})
    for label, a, b, target in TIME_RATIOS:
        if a in times and b in times:
            value, low, high = paired_ratio(times[a]["step_times_s"], times[b]["step_times_s"])
            out.append({"label": label, "kind": "step time", "value": value, "low": low, "high": high,
                        "target": target, "verdict": None if target is None else
                        verdict(value, low, high, target, len(times[a]["step_times_s"]))})
    return out


# --- report -----------------------------------------------------------------------------------------------------
def markdown(result: dict, info: dict, args, command: str) -> str:
    mb = lambda n: f"{n / 1e6:.1f}"  # noqa: E731
    s = result["storage"]
    fp32_bytes = s["quantised"]["float32"]
    lines = [
        "# QLoRA on SmolLM2 (CPU): 4-bit storage, training memory, step time", "",
        f"Command: `{command}`", "",
        f"Machine: {info['cpu']}, {info['cpu_cores']} cores, torch threads {info['torch_threads']}; device `cpu`.",
        f"Versions: torch {info['torch']}, peft {info['peft']}, transformers {info['transformers']}, bitsandbytes "
        f"{info['bitsandbytes']}, Python {info['python']}. Date: {info['date']}.", "",
        f"## Storage of the {s['layers']} quantised linear weights ({s['params']:,} parameters)", "",
        "| format | MB | bits / parameter (measured) | paper | × float32 |", "|---|---:|---:|---:|---:|",
    ]
    for fmt, nbytes in s["quantised"].items():
        lines.append(f"| {fmt} | {mb(nbytes)} | {8 * nbytes / s['params']:.4f} | {s['paper_bits'][fmt]:.4f} | "
                     f"{nbytes / fp32_bytes:.4f} |")
    lines += ["", "The measured bits include each weight's partial last block and one float32 mean per matrix.", "",
              "Whole model (parameters, buffers, bitsandbytes' quantisation state; the 49,152 × 576 embedding, tied "
              "to the output head, and the norms stay float32, or bfloat16 where a row says so):", "",
              "| model | MB | × float32 model |", "|---|---:|---:|"]
    whole = s["whole_model"]
    for name, nbytes in whole.items():
        lines.append(f"| {name} | {mb(nbytes)} | {nbytes / whole['float32']:.4f} |")
    lines += ["", f"## Training (r={args.r}, alpha={args.lora_alpha}, targets {', '.join(TARGETS)})", "",
              "Memory: resident = weights, buffers, quantisation state and AdamW state after a first step; step peak = "
              "the peak a step allocates above that (torch.profiler's CPU allocations, harness.peak_step_bytes; "
              "oneDNN scratch buffers not seen). MB = 10^6 bytes. × LoRA fp32 = total / LoRA on the float32 base.",
              "The bf16 variants: embedding, norms and 4-bit layers' compute in bfloat16, adapters bfloat16 as in the "
              "paper's Eq. 5, except PEFT's default row (autocast_adapter_dtype=True: float32 adapters).",
              f"Time: zero_grad + forward + backward + AdamW; median and minimum of {args.steps} steps after "
              f"{args.warmup} warm-up steps, the variants taking steps in turn. Losses: the same data and seeds, "
              "so the two float32 QLoRA variants print the same losses. The two bfloat16 ones compute the same function "
              "(equal logits before training) but do not start equal: peft_edu draws A in bfloat16, PEFT draws it in "
              "float32 and rounds (about 0.2 % of the entries differ), so their losses differ a little.",
              "Loss: model = transformers' own (model(**batch).loss, the whole batch's logits at once, in float32); "
              "chunked = peft_edu.chunked_causal_lm_loss, 128 positions at a time with each chunk's logits recomputed "
              "in backward (the same value and gradients).",
              "Ratios: memory as total bytes (deterministic: PASS or FAIL); step times as the median of the per-round "
              "ratios with a 90 % bootstrap interval over the rounds (harness.paired_ratio): PASS or FAIL when the "
              "interval lies on one side of the target, NOT RESOLVED when it holds it. The interval covers "
              "round-to-round noise, not what stays fixed for a whole run.", ""]
    for run in result["training"]:
        batch = f"{run['batch'][0]} × {run['batch'][1]}"
        memory, times = run["memory"], run["time"]
        lines += [f"### batch {batch} tokens", "",
                  "| variant | adapters | loss | resident MB | step peak MB | total MB | × LoRA fp32 | median step (ms) "
                  "| min step (ms) | every timed step (ms) | loss, first → last step |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for variant in memory:
            m, t = memory[variant], times[variant]
            share = m["total_bytes"] / memory[BASELINE]["total_bytes"]
            lines.append(f"| {variant} | {m['adapter_dtype']} | {m['loss']} | {mb(m['resident_bytes'])} "
                         f"| {mb(m['peak_step_bytes'])} "
                         f"| {mb(m['total_bytes'])} | {share:.3f} | {1e3 * t['median_step_s']:.0f} "
                         f"| {1e3 * t['min_step_s']:.0f} | {' '.join(f'{1e3 * x:.0f}' for x in t['step_times_s'])} "
                         f"| {t['losses'][0]:.5f} → {t['losses'][-1]:.5f} |")
        lines += ["", "| ratio | value | 90 % interval | target | verdict |", "|---|---:|---|---:|---|"]
        for r in run["ratios"]:
            interval = "" if r["low"] is None else f"{r['low']:.3f} – {r['high']:.3f}"
            target = "" if r["target"] is None else f"≤ {r['target']:.2f}"
            lines.append(f"| {r['kind']}: {r['label']} | {r['value']:.3f} | {interval} | {target} "
                         f"| {r['verdict'] or ''} |")
        lines.append("")
    return "\n".join(lines)


def run(argv=None) -> dict:
    """Measure, print the report, write it (and the raw numbers as JSON next to it) if asked; the raw numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (rows of --seq-len tokens)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--compute-dtypes", default="float32,bfloat16",
                        help="comma-separated: float32 (the 4-bit layers compute in float32), bfloat16 (the paper's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--out", default=None, help="also write the report (markdown) to this file, and its numbers "
                                                    "as JSON beside it (the same name, .json)")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.compute_dtypes = [d.strip() for d in args.compute_dtypes.split(",") if d.strip()]
    if not args.compute_dtypes or any(d not in DTYPES for d in args.compute_dtypes):
        parser.error(f"--compute-dtypes {','.join(args.compute_dtypes)!r}: a comma-separated list of {', '.join(DTYPES)}")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    import bitsandbytes

    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    info = dict(machine_info(torch.device("cpu"), packages=("transformers", "peft")),
                bitsandbytes=bitsandbytes.__version__, date=time.strftime("%Y-%m-%d"))
    print(f"loading SmolLM2 and its 4-bit versions ({', '.join(args.compute_dtypes)}) ...", flush=True)
    tokenizer, bases = load_bases(args.compute_dtypes)
    result = {"storage": storage(bases)}
    result["training"] = []
    for batch_size in args.batch_sizes:
        print(f"batch {batch_size} x {args.seq_len}: memory, then {args.warmup}+{args.steps} steps per variant ...",
              flush=True)
        result["training"].append(train_at(batch_size, bases, tokenizer, args))
    report = markdown(result, info, args, command)
    print(report)
    record = {"command": command, "machine": info,
              "settings": {"r": args.r, "lora_alpha": args.lora_alpha, "seq_len": args.seq_len, "targets": TARGETS,
                           "compute_dtypes": args.compute_dtypes, "steps": args.steps, "warmup": args.warmup},
              **result}
    if args.out:
        write_report(args.out, report, record)
    return record


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
