"""What the benchmark scripts share: the machine they ran on, the course's real batches, a training step, memory.

``compare_methods.py`` (every method against its reference), ``qlora_bench.py``, ``checkpointing_bench.py`` and
the recorded sweeps import from here, so that a batch, a step and a memory figure mean the same in each of them.
(``dora_lora_bench.py``, the LoRA/DoRA-only benchmark these helpers came from, was retired when
``compare_methods.py`` took over its measurements; its recordings stay in ``results/dora_lora_cpu*.{md,json}``,
and the script in the history: ``git show 255eae2:benchmarks/dora_lora_bench.py``.)
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import torch


# --- the machine ---------------------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU's model name from lscpu (platform.processor() often says only "x86_64")."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - lscpu missing: keep platform's answer
        return platform.processor() or "unknown"


def package_version(package: str) -> str:
    try:
        return importlib.import_module(package).__version__
    except ImportError:
        return "missing"


def machine_info(device, packages=("transformers", "peft", "adapters")) -> dict:
    """CPU, cores, threads, load, versions of torch and ``packages``, device, date: what a recording must carry."""
    info = {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, **{name: package_version(name) for name in packages},
            "python": platform.python_version(), "device": str(device),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --- the course's real batches ----------------------------------------------------------------------------------
def minilm_batch(tokenizer, batch_size: int, seq_len: int) -> dict:
    """Real polarity sentences with their labels, padded to seq_len (every step sees the same shape)."""
    from peft_edu.assets import load_polarity

    rows = load_polarity()["train"].select(range(batch_size))
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


# --- a step, and its memory -----------------------------------------------------------------------------------
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_loss(model, batch) -> torch.Tensor:
    """The loss the model computes itself (transformers': a causal LM's over the whole batch's logits at once)."""
    return model(**batch).loss


def chunked_loss(model, batch) -> torch.Tensor:
    """The same causal-LM loss, 128 positions at a time (``peft_edu.chunked_causal_lm_loss``)."""
    from peft_edu import chunked_causal_lm_loss

    return chunked_causal_lm_loss(model, **batch)


LOSSES = {"model": model_loss, "chunked": chunked_loss}


def train_step(model, optimizer, batch, amp=contextlib.nullcontext, loss_of=model_loss) -> float:
    """zero_grad + forward + backward + optimizer step; the loss (``.item()`` waits for the device)."""
    optimizer.zero_grad(set_to_none=True)
    with amp():
        loss = loss_of(model, batch)
    loss.backward()
    optimizer.step()
    return loss.item()


def peak_step_bytes(model, optimizer, batch, device, amp=contextlib.nullcontext, loss_of=model_loss) -> int:
    """Peak bytes one step allocates above what was allocated before it (weights, optimizer state; gradients are
    set to None first). CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before. CPU: the running sum of
    the allocations and frees PyTorch's CPU allocator reports to ``torch.profiler(profile_memory=True)``, at its
    maximum (allocations made outside that allocator, such as oneDNN's scratch buffers, are not seen)."""
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_step(model, optimizer, batch, amp, loss_of)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    return peak_bytes(lambda: train_step(model, optimizer, batch, amp, loss_of))


def peak_bytes(work) -> int:
    """CPU: the peak of the running sum of the allocations and frees that ``work()`` makes through PyTorch's CPU
    allocator, as ``torch.profiler(profile_memory=True)`` reports them (what was allocated before is not counted;
    oneDNN's scratch buffers are not seen)."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # kineto's "USDT ..." line per profiled block, quiet
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


# --- a report and its numbers ----------------------------------------------------------------------------------
def write_report(out, report: str, record: dict) -> None:
    """The markdown report at ``out`` and its numbers as JSON beside it (the same name, ``.json``): a recording."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    out.with_suffix(".json").write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")


# --- ratios of times measured in turn ------------------------------------------------------------------------
def paired_ratio(ours: list[float], theirs: list[float], level: float = 0.90, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """(median, low, high) of the per-round ratios ours[i] / theirs[i], with a bootstrap interval over the rounds.

    Both sides of round i ran back to back, so the load of that moment divides out of their ratio; the spread of
    the ratios over the rounds is what is left of the noise. The interval (``level``, percentile bootstrap of the
    median) says whether a run can tell the ratio from a target at all.
    """
    per_round = [a / b for a, b in zip(ours, theirs, strict=True)]
    draw = random.Random(seed)
    medians = sorted(statistics.median(draw.choices(per_round, k=len(per_round))) for _ in range(resamples))
    tail = (1 - level) / 2
    return (statistics.median(per_round), medians[int(tail * resamples)],
            medians[min(resamples - 1, int((1 - tail) * resamples))])


MIN_ROUNDS = 5  # fewer paired rounds than this (--quick) say too little about the noise for any verdict on a time


def verdict(value: float, low: float | None, high: float | None, target: float, rounds: int | None = None) -> str:
    """PASS or FAIL when the interval lies on one side of the target; NOT RESOLVED when it holds the target, or
    when a time was measured over fewer than ``MIN_ROUNDS`` rounds."""
    if low is None:  # a deterministic quantity (bytes): no noise to resolve
        return "PASS" if value <= target else "FAIL"
    if rounds is not None and rounds < MIN_ROUNDS:
        return "NOT RESOLVED"
    if high <= target:
        return "PASS"
    return "FAIL" if low > target else "NOT RESOLVED"


# --- a process tree with a time limit ----------------------------------------------------------------------
def run_bounded(command: list[str], timeout_s: float, env: dict | None = None, cwd=None) -> tuple[int | None, str]:
    """Run ``command``; (its return code, its output), or (None, output) when it ran past ``timeout_s``.

    Whatever happens, every process it started is gone afterwards. ``torchrun`` starts its workers in sessions of
    their own, so killing its process group misses them; a worker left waiting for a dead peer then holds the
    output pipe open and a reader of that pipe waits for ever (a test run hung so). So the output goes to a file,
    not a pipe, and each process that inherited this call's marker in its environment is killed at the end.
    """
    marker = uuid.uuid4().hex
    env = {**(os.environ if env is None else env), "PEFT_EDU_LAUNCH": marker}
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _kill_marked(f"PEFT_EDU_LAUNCH={marker}".encode())
            process.wait()
        log.seek(0)
        return code, log.read()


def _kill_marked(entry: bytes) -> None:
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if entry in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):  # gone already, or not ours to read
            continue
