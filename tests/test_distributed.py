"""peft_edu models train unchanged under the ecosystem's engines: DDP (torchrun), accelerate and FSDP2.

Two processes on the CPU (gloo) each take half of every global batch; after the same steps the adapter the
main process writes equals, to float32 rounding, the adapter of one process that saw the whole batches
(``tests/distributed_worker.py`` is the training script). Each launch is bounded in time, and its whole
process group is killed if it overruns, so a hung rendezvous cannot hang the suite.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
sys.path.insert(0, str(WORKER.parents[1] / "benchmarks"))
from harness import run_bounded  # noqa: E402 (benchmarks/ is not a package)

TIME_LIMIT_S = 300

pytestmark = pytest.mark.slow


def launch(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}  # loopback: no network needed
    returncode, output = run_bounded(command, TIME_LIMIT_S, env=env, cwd=cwd)  # kills torchrun's workers too
    if returncode is None:
        pytest.fail(f"{' '.join(command)} did not finish in {TIME_LIMIT_S} s:\n{output[-3000:]}")
    assert returncode == 0, f"{' '.join(command)} failed:\n{output[-3000:]}"


def adapter_of(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def one_process_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "adapter"
    launch([sys.executable, str(WORKER), "single", str(out)], cwd=WORKER.parent)
    return adapter_of(out)


@pytest.mark.parametrize("engine", ["ddp", "accelerate", "fsdp2"])
def test_two_processes_train_the_adapter_one_process_trains(engine, one_process_adapter, tmp_path):
    out = tmp_path / "adapter"
    # --local-addr: without it torchrun names this machine by socket.getfqdn(), a DNS lookup that can stall on a
    # machine whose resolver is unreachable
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--local-addr", "127.0.0.1"]
    launch(torchrun + [str(WORKER), engine, str(out)], cwd=WORKER.parent)
    trained = adapter_of(out)
    assert trained.keys() == one_process_adapter.keys()
    assert any("lora_A" in key for key in trained) and any("classifier" in key for key in trained)
    initial = adapter_of_untrained()
    for key, expected in one_process_adapter.items():
        assert not torch.equal(expected, initial[key]), f"{key} did not train: the comparison would prove nothing"
        torch.testing.assert_close(trained[key], expected, rtol=1e-5, atol=1e-6, msg=key)


def adapter_of_untrained() -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(WORKER.parent))
    from distributed_worker import adapted_model

    import peft_edu
    return {f"base_model.model.{k}": v for k, v in peft_edu.model.adapter_state_dict(adapted_model()).items()}


def test_launcher_kills_workers_in_other_sessions():
    # what hung a CI run: torchrun's worker, in a session of its own, outlived its killed parent and held the pipe.
    # Here a parent starts a worker in a new session that would sleep for a minute, then the parent waits too.
    worker = "import time; time.sleep(60)"
    parent = ("import subprocess, sys, time; "
              f"w = subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True); "
              "print(w.pid, flush=True); time.sleep(60)")
    start = time.monotonic()
    returncode, output = run_bounded([sys.executable, "-c", parent], timeout_s=3)
    assert returncode is None and time.monotonic() - start < 20
    worker_pid = int(output.split()[0])
    time.sleep(0.2)
    state = Path(f"/proc/{worker_pid}/stat")
    assert not state.exists() or state.read_text().split()[2] == "Z", "the worker in its own session survived"
    # and a command that ends in time: its code and output come back
    assert run_bounded([sys.executable, "-c", "print('done'); raise SystemExit(3)"], timeout_s=30) == (3, "done\n")
