"""A short training loop the chapters share: any device, seeded, with a progress bar.

The loop is deliberately plain (forward, loss, backward, step) so that the only thing that
differs between full fine-tuning, LoRA and the other methods is *which parameters require grad*.
On CUDA it runs under bf16 autocast; on a CPU in float32.

    loaders = classification_loaders(tokenizer, polarity, batch_size=32)
    history = train(model, loaders["train"], loaders["validation"], epochs=2, lr=1e-3)
"""

from __future__ import annotations

import os
import random
import time
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
from torch.utils import flop_counter
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


def pick_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def full_run() -> bool:
    """Whether chapters should train at full length rather than in a short CPU demo.

    Set ``PEFT_EDU_FULL_RUN=1`` (or ``0``) to choose; by default it is on exactly when a GPU is present.
    """
    choice = os.environ.get("PEFT_EDU_FULL_RUN", "auto").lower()
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"PEFT_EDU_FULL_RUN={choice!r}: use 1 (long runs), 0 (short CPU runs) or auto.")
    return torch.cuda.is_available() if choice == "auto" else choice == "1"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def classification_loaders(tokenizer, dataset, batch_size: int = 32, max_length: int = 64, seed: int = 0,
                           limit: dict[str, int] | None = None) -> dict[str, DataLoader]:
    """One DataLoader per split of a ``DatasetDict`` with ``text`` and ``label`` columns.

    Batches are tokenised on the fly and padded to the longest sentence in the batch;
    ``limit={"train": 800}`` keeps only the first 800 examples of a split (for short CPU runs).
    """
    def collate(rows):
        batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        batch["labels"] = torch.tensor([r["label"] for r in rows])
        return batch

    loaders = {}
    for split, data in dataset.items():
        if limit and split in limit:
            data = data.select(range(min(limit[split], len(data))))
        generator = torch.Generator().manual_seed(seed)
        loaders[split] = DataLoader(data, batch_size=batch_size, shuffle=(split == "train"),
                                    collate_fn=collate, generator=generator)
    return loaders


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, loader: DataLoader, device: torch.device | None = None) -> float:
    """Fraction of examples whose arg-max logit is the label."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        total += len(batch["labels"])
    model.train(was_training)
    return correct / total


def train(model: torch.nn.Module, train_loader: DataLoader, eval_loader: DataLoader | None = None, *,
          epochs: int = 1, lr: float = 1e-3, weight_decay: float = 0.0, max_steps: int | None = None,
          device: torch.device | None = None, seed: int = 0, progress: bool | None = None,
          evaluate=None, lr_schedule: str = "constant", print_summary: bool = True) -> list[dict]:
    """Train the parameters that require grad with AdamW; evaluate after each epoch.

    Returns one dict per epoch: ``epoch``, ``train_loss`` (mean over the epoch), ``steps``,
    ``seconds`` (training time of the epoch) and, with an ``eval_loader``, the metrics that
    ``evaluate(model, eval_loader, device)`` returns as a dict (default: ``{"accuracy": ...}``).
    The model's forward must return ``.loss`` when given ``labels``. ``progress`` shows a progress
    bar per epoch (default: on, unless the environment sets ``PEFT_EDU_PROGRESS=0``, as the book
    build does); a one-line summary per epoch is printed unless ``print_summary=False`` (the history
    holds the same numbers). ``lr_schedule="linear"`` decays the learning rate linearly from ``lr``
    to zero over the run, as transformers' ``Trainer`` does by default (without warm-up); in a short
    run it keeps the last steps small, so the final model depends less on its last few batches.
    The default, ``"constant"``, keeps ``lr`` throughout.
    """
    if lr_schedule not in ("constant", "linear"):
        raise ValueError(f"lr_schedule={lr_schedule!r}: use 'constant' (lr throughout) or 'linear' (lr decaying to 0).")
    if progress is None:
        progress = os.environ.get("PEFT_EDU_PROGRESS", "1") != "0"
    evaluate = evaluate or (lambda m, loader, d: {"accuracy": evaluate_accuracy(m, loader, d)})
    set_seed(seed)
    device = device or pick_device()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("No parameter requires grad: nothing to train. Did you freeze everything, or forget get_peft_model?")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = None
    if lr_schedule == "linear":
        total_steps = epochs * len(train_loader) if max_steps is None else min(max_steps, epochs * len(train_loader))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1 - done / total_steps)
    history, step = [], 0
    for epoch in range(1, epochs + 1):
        start, losses = time.perf_counter(), []
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False)
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(device):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "steps": len(losses),
                  "seconds": time.perf_counter() - start}
        if eval_loader is not None:
            record.update(evaluate(model, eval_loader, device))
        history.append(record)
        metrics = "".join(f", {k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "train_loss", "steps", "seconds"))
        if print_summary:
            print(f"epoch {epoch}/{epochs}: train loss {record['train_loss']:.4f}{metrics} ({record['seconds']:.1f} s)")
        if max_steps is not None and step >= max_steps:
            break
    model.eval()
    return history


# PyTorch's FlopCounterMode has formulas for the attention kernels scaled_dot_product_attention uses on CUDA (flash,
# memory-efficient, cuDNN), not for the one it uses on a CPU: without these two entries a CPU count leaves attention out.
def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops}


def count_flops(run: Callable[[], object]) -> int:
    """The floating-point operations of ``run()``, as PyTorch's FlopCounterMode counts them: matrix products and
    attention, two per multiply-add, on any device (element-wise operations, such as IA³'s rescaling, count zero).

        count_flops(lambda: model(**batch).loss.backward())   # one training step's forward and backward
    """
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION) as counter:
        run()
    return counter.get_total_flops()
