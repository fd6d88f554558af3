"""One process of ``tests/test_distributed.py``: train a tiny model with a peft_edu adapter under an engine.

    torchrun --nproc_per_node 2 tests/distributed_worker.py ENGINE OUT_DIR     (ENGINE: ddp, accelerate, fsdp2)
    python tests/distributed_worker.py single OUT_DIR                           (the one-process reference)

PEFT_EDU_DEVICE=cuda runs the same on the GPU (the GPU check, ``benchmarks/gpu_check.py``): both processes share
one card, so the process group stays gloo (NCCL refuses two ranks on one device), which handles CUDA tensors.

Every run sees the same global batches (GLOBAL_BATCH rows a step); with two processes each takes its half.
The model is unchanged peft_edu (LoRA on the attention plus the trained classification head): only the
engine differs. The main process writes the adapter with ``peft_edu.save_adapter``; the test compares it
with the one-process run's.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity import build_batch, build_tiny  # noqa: E402

import peft_edu  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ = 4, 8, 8
# a run takes about 10 s; one still going after this long is stuck: it prints every thread's stack and exits, so the
# test's failure says where (the test kills the launch only later, after 300 s)
STUCK_AFTER_S = 120
DEVICE = torch.device(os.environ.get("PEFT_EDU_DEVICE", "cpu"))


def adapted_model() -> torch.nn.Module:
    base = build_tiny("bert_cls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    config = peft_edu.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    return peft_edu.get_peft_model(base, config).to(DEVICE).train()


def batches(rank: int, world_size: int):
    """Step k's global batch (seed k), and this process's contiguous share of its rows."""
    share = GLOBAL_BATCH // world_size
    for step in range(STEPS):
        batch = build_batch("bert_cls", batch=GLOBAL_BATCH, seq=SEQ, seed=100 + step)
        yield {k: v[rank * share:(rank + 1) * share].to(DEVICE) for k, v in batch.items()}


def train(model, optimizer, rank: int, world_size: int, backward=None) -> None:
    for batch in batches(rank, world_size):
        loss = model(**batch).loss  # the mean over this share; the engines average the shares' gradients
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        optimizer.zero_grad()


def optimizer_for(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def main(engine: str, out: Path) -> None:
    faulthandler.dump_traceback_later(STUCK_AFTER_S, exit=True)
    torch.set_num_threads(1)
    if engine == "single":
        model = adapted_model()
        train(model, optimizer_for(model), 0, 1)
        peft_edu.save_adapter(model, out)
        return

    if engine == "accelerate":
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=DEVICE.type == "cpu")  # starts its process group from torchrun's environment
        model = adapted_model()
        model, optimizer = accelerator.prepare(model, optimizer_for(model))
        train(model, optimizer, accelerator.process_index, accelerator.num_processes, backward=accelerator.backward)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            peft_edu.save_adapter(accelerator.unwrap_model(model), out)
        accelerator.end_training()
        return

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=STUCK_AFTER_S // 2))  # a lost peer: an error
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = adapted_model()
    if engine == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        train(wrapped, optimizer_for(wrapped), rank, world_size)
    elif engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(DEVICE.type, (world_size,))
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        train(model, optimizer_for(model), rank, world_size)
        model = unsharded_copy(model)  # a collective: every process takes part
    else:
        raise SystemExit(f"unknown engine {engine!r}: ddp, accelerate, fsdp2 or single")
    if rank == 0:
        peft_edu.save_adapter(model, out)
    dist.barrier()
    dist.destroy_process_group()


def unsharded_copy(model):
    """FSDP2 keeps each parameter as a DTensor shard: the same peft_edu model, not sharded, with the full values."""
    from torch.distributed.tensor import DTensor
    full = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu() for name, p in model.named_parameters()}
    plain = adapted_model().cpu()
    with torch.no_grad():
        for name, param in plain.named_parameters():
            param.copy_(full[name])
    return plain


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
