"""The memory chapter's exercise checks (``notebooks/memory.ipynb``): AdamW's state in bytes, LoRA's trainable count,
NF4's bits per weight, and ZeRO's memory per device.

Each exercise is its ``request``, ``probe`` and ``judge`` (see ``peft_edu.checks``), bound once into an
``Exercise`` whose variable is the name the notebook's tests call. The answers are numbers: each seed draws
new inputs beside a few fixed real ones (SmolLM2-135M, Llama-3.1-8B, ZeRO's own example), so an answer fitted
to the public test's inputs fails a hidden one.
"""

from __future__ import annotations

import math

import torch

from .core import Exercise, _fail, _probe_each_case, _require_callable, _value_of


def _draw(g: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi, (1,), generator=g))


def _number(got, what: str, args: str):
    """The learner's value as a number, or feedback saying why it is not one."""
    if isinstance(got, bool) or not isinstance(got, (int, float)):
        kind = got.get("type") if isinstance(got, dict) else type(got).__name__
        _fail(f"For {args}, {what} returned a {kind}; return a number (an int or a float).")
    if isinstance(got, float) and not math.isfinite(got):
        _fail(f"For {args}, {what} returned {got}; return a finite number.")
    return got


def _equal(got, want: float, rel: float = 1e-12) -> bool:
    return math.isclose(got, want, rel_tol=rel, abs_tol=1e-12)


# --- memory chapter: AdamW's state in bytes -------------------------------------------------------
def _adam_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    # SmolLM2-135M's LoRA (r=8 on q_proj, v_proj) in float32, Llama-3.1-8B in 16-bit, then drawn counts
    cases = [[460_800, False], [8_030_261_248, True]]
    cases += [[_draw(g, 1_000, 10**7) * 7 + 3, bool((seed + i) % 2)] for i in range(3)]
    return {"cases": cases}


def _adam_probe(adam_state_bytes, request: dict) -> dict:
    return _probe_each_case(adam_state_bytes, request["cases"], lambda case: case)


def _adam_judge(request: dict, observed: dict) -> None:
    """``adam_state_bytes(trainable, master_copy)``: AdamW's two float32 moments, plus a float32 master copy of the
    weights when ``master_copy`` (16-bit weights), in bytes."""
    _require_callable(observed, "adam_state_bytes")
    for (n, master), call in zip(request["cases"], observed["calls"]):
        args = f"trainable={n:,}, master_copy={master}"
        got = _number(_value_of(call, "adam_state_bytes"), "adam_state_bytes", args)
        want = (8 + (4 if master else 0)) * n
        if _equal(got, want):
            continue
        if _equal(got, want * 8):
            _fail(f"For {args} you return {got:,}: that is bits. Return bytes (a float32 number is 4 bytes, 32 bits).")
        if master and _equal(got, 8 * n):
            _fail(f"For {args} you return 8 bytes per parameter: with master_copy=True the weights are 16-bit, and the "
                  "optimizer updates a float32 master copy of them (4 more bytes per parameter), as ZeRO counts it.")
        if not master and _equal(got, 12 * n):
            _fail(f"For {args} you return 12 bytes per parameter: with master_copy=False the weights are already "
                  "float32, so there is no master copy; only the two moments remain.")
        if _equal(got, want - 4 * n):
            _fail(f"For {args} you return {got:,}: one moment is missing, or each is counted in 16 bits. Adam keeps "
                  "two float32 moments per parameter (m and v), 4 bytes each.")
        if _equal(got, 16 * n):
            _fail(f"For {args} you return 16 bytes per parameter: that includes the weights and the gradients. Count "
                  "only what the optimizer keeps: its moments (and the master copy).")
        _fail(f"For {args}, adam_state_bytes is not {got!r}. AdamW keeps two float32 numbers (m and v) per trainable "
              "parameter, and one more (a float32 master copy) when the weights are 16-bit.")


check_adam_state_bytes = Exercise(
    "function", _adam_request, _adam_probe, _adam_judge,
    doc="``adam_state_bytes(trainable, master_copy)``: AdamW's two float32 moments (plus a float32 master copy when "
        "master_copy), in bytes.")


# --- memory chapter: LoRA's trainable count -------------------------------------------------------
SMOLLM2_Q_V = tuple(shape for _ in range(30) for shape in ((576, 576), (192, 576)))  # (d_out, d_in) of q_proj, v_proj


def _lora_count_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = [[SMOLLM2_Q_V, 8]]
    for _ in range(3):
        layers = _draw(g, 1, 5)
        shapes = []
        for _ in range(layers):
            d_in = _draw(g, 8, 200)
            shapes.append((d_in + _draw(g, 1, 300), d_in))   # d_out ≠ d_in: counting A twice cannot pass
        shapes.append(shapes[0])                              # a repeated shape: every layer counts
        cases.append([tuple(shapes), _draw(g, 1, 33)])
    return {"cases": cases}


def _lora_count_probe(lora_trainable_count, request: dict) -> dict:
    return _probe_each_case(lora_trainable_count, request["cases"], lambda case: case)


def _lora_count_judge(request: dict, observed: dict) -> None:
    """``lora_trainable_count(shapes, r)``: Σ r·(d_in + d_out) over the adapted layers, ``shapes`` their (d_out, d_in)."""
    _require_callable(observed, "lora_trainable_count")
    for (shapes, r), call in zip(request["cases"], observed["calls"]):
        args = f"r={r} and {len(shapes)} layers, the first of shape (d_out, d_in) = {shapes[0]}"
        got = _number(_value_of(call, "lora_trainable_count"), "lora_trainable_count", args)
        want = sum(r * (d_in + d_out) for d_out, d_in in shapes)
        if _equal(got, want):
            continue
        if _equal(got, sum(r * d_out for d_out, _ in shapes)):
            _fail(f"For {args} you count B (d_out × r) only: A (r × d_in) trains too.")
        if _equal(got, sum(r * d_in for _, d_in in shapes)):
            _fail(f"For {args} you count A (r × d_in) only: B (d_out × r) trains too.")
        if _equal(got, sum(2 * r * d_in for _, d_in in shapes)) or _equal(got, sum(2 * r * d_out for d_out, _ in shapes)):
            _fail(f"For {args} you count as if every layer were square: A is r × d_in and B is d_out × r, "
                  "and here d_out ≠ d_in.")
        if _equal(got, sum(d_in * d_out for d_out, d_in in shapes)) or _equal(got, sum(r * d_in * d_out for d_out, d_in in shapes)):
            _fail(f"For {args} you count a dense d_out × d_in matrix: LoRA trains the two thin factors instead, "
                  "r·(d_in + d_out) numbers per layer.")
        if _equal(got, sum(r * (d_in + d_out) for d_out, d_in in set(shapes))):
            _fail(f"For {args} you count each distinct shape once: every adapted layer has its own A and B, "
                  "even when two layers have the same shape.")
        if _equal(got, r * (shapes[0][0] + shapes[0][1])):
            _fail(f"For {args} you count the first layer only: add up every layer of the list.")
        _fail(f"For {args}, lora_trainable_count is not {got!r}. Each adapted layer of shape (d_out, d_in) trains "
              "A (r × d_in) and B (d_out × r).")


check_lora_trainable_count = Exercise(
    "function", _lora_count_request, _lora_count_probe, _lora_count_judge,
    doc="``lora_trainable_count(shapes, r)``: Σ r·(d_in + d_out) over the adapted layers, ``shapes`` their (d_out, d_in).")


# --- memory chapter: NF4's bits per weight --------------------------------------------------------
def _bits_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = [[64, False, 256], [64, True, 256]]   # QLoRA's settings: 4.5 and 4.127 bits
    cases += [[2 ** _draw(g, 4, 10), bool((seed + i) % 2 == 0), 2 ** _draw(g, 6, 10)] for i in range(3)]
    return {"cases": cases}


def _bits_probe(bits_per_weight, request: dict) -> dict:
    return _probe_each_case(bits_per_weight, request["cases"], lambda case: case)


def _bits_judge(request: dict, observed: dict) -> None:
    """``bits_per_weight(blocksize, double_quant, second_blocksize)``: 4 + 32/b, or with double quantisation
    4 + 8/b + 32/(b·b₂)."""
    _require_callable(observed, "bits_per_weight")
    for (b, double, b2), call in zip(request["cases"], observed["calls"]):
        args = f"blocksize={b}, double_quant={double}, second_blocksize={b2}"
        got = _number(_value_of(call, "bits_per_weight"), "bits_per_weight", args)
        want = 4 + 8 / b + 32 / (b * b2) if double else 4 + 32 / b
        if _equal(got, want):
            continue
        if _equal(got, want / 8):
            _fail(f"For {args} you return {got:g}: that is bytes per weight. The question asks for bits.")
        if _equal(got, 4):
            _fail(f"For {args} you return 4: the codes are 4 bits, but each block also stores its absmax constant, "
                  "shared by its weights.")
        if double and _equal(got, 4 + 8 / b):
            _fail(f"For {args} you return {got:g}: the 8-bit absmax are counted, but not the float32 constant that each "
                  "block of second_blocksize absmax needs to be dequantised.")
        if double and _equal(got, 4 + 32 / b):
            _fail(f"For {args} you return {got:g}, the cost without double quantisation: with it, the absmax are "
                  "8-bit codes plus one float32 constant per second_blocksize of them.")
        if _equal(got, 4 + 16 / b) or (double and _equal(got, 4 + 8 / b + 16 / (b * b2))):
            _fail(f"For {args} you count a 16-bit constant: the absmax (and the second-level constants) are float32, "
                  "32 bits.")
        if _equal(got, 4 + 32 * b) or _equal(got, 4 + 32):
            _fail(f"For {args} you return {got:g}: one 32-bit absmax is shared by the blocksize weights of its block, "
                  "32 / blocksize bits per weight.")
        _fail(f"For {args}, bits_per_weight is not {got!r}. Add the 4-bit code and each weight's share of the constants "
              "of its block (and, with double quantisation, of the second-level block).")


check_bits_per_weight = Exercise(
    "function", _bits_request, _bits_probe, _bits_judge,
    doc="``bits_per_weight(blocksize, double_quant, second_blocksize)``: NF4's storage per weight in bits, "
        "constants included.")


# --- memory chapter: ZeRO's memory per device -----------------------------------------------------
def _zero_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = [[7_500_000_000, 64, stage] for stage in range(4)]   # the example of ZeRO's Figure 1
    cases += [[_draw(g, 10**6, 10**9), _draw(g, 2, 17), (seed + i) % 4] for i in range(4)]
    return {"cases": cases}


def _zero_probe(zero_bytes_per_device, request: dict) -> dict:
    return _probe_each_case(zero_bytes_per_device, request["cases"], lambda case: case)


def _zero(n: int, devices: int, stage: int, k: int = 12, shift: int = 0) -> float:
    """ZeRO's model states per device: 2Ψ weights, 2Ψ gradients, kΨ optimizer state; stage s partitions s of them."""
    parts = {"optimizer": k * n, "gradients": 2 * n, "weights": 2 * n}
    partitioned = list(parts)[:min(max(stage + shift, 0), 3)]
    return sum(size / devices if name in partitioned else size for name, size in parts.items())


def _zero_judge(request: dict, observed: dict) -> None:
    """``zero_bytes_per_device(n_params, devices, stage)``: (2 + 2 + 12)Ψ with stage 1 partitioning the optimizer
    state, stage 2 also the gradients, stage 3 also the weights (stage 0 is plain data parallelism)."""
    _require_callable(observed, "zero_bytes_per_device")
    for (n, devices, stage), call in zip(request["cases"], observed["calls"]):
        args = f"n_params={n:,}, devices={devices}, stage={stage}"
        got = _number(_value_of(call, "zero_bytes_per_device"), "zero_bytes_per_device", args)
        want = _zero(n, devices, stage)
        if _equal(got, want, rel=1e-6):
            continue
        if _equal(got, want * 8, rel=1e-6):
            _fail(f"For {args} you return bits; the answer is in bytes.")
        if stage > 0 and _equal(got, _zero(n, devices, stage, k=8), rel=1e-6):
            _fail(f"For {args} your optimizer state is 8 bytes per parameter: in mixed precision it also holds the "
                  "float32 master weights, K = 12 bytes (ZeRO §3.1).")
        if stage == 0 and _equal(got, _zero(n, devices, stage, k=8), rel=1e-6):
            _fail(f"For {args} you return 12 bytes per parameter: mixed-precision Adam keeps 2 + 2 + 12 = 16 "
                  "(16-bit weights and gradients, float32 master weights and two moments).")
        if _equal(got, _zero(n, devices, stage, shift=1), rel=1e-6):
            _fail(f"For {args} you partition one part too many: stage 1 partitions only the optimizer state, stage 2 "
                  "also the gradients, stage 3 also the weights.")
        if stage > 0 and _equal(got, _zero(n, devices, stage, shift=-1), rel=1e-6):
            _fail(f"For {args} you partition one part too few: stage {stage} partitions "
                  f"{['the optimizer state', 'the optimizer state and the gradients', 'everything'][stage - 1]}.")
        if stage < 3 and _equal(got, 16 * n / devices, rel=1e-6):
            _fail(f"For {args} you divide everything by the number of devices: only stage 3 partitions all of it.")
        if stage > 0 and _equal(got, 16 * n, rel=1e-6):
            _fail(f"For {args} you return the replicated 16Ψ: stage {stage} partitions part of it across the devices.")
        _fail(f"For {args}, zero_bytes_per_device is not {got!r}. Start from 2Ψ (weights) + 2Ψ (gradients) + 12Ψ "
              "(optimizer state) and divide by the number of devices what the stage partitions.")


check_zero_bytes_per_device = Exercise(
    "function", _zero_request, _zero_probe, _zero_judge,
    doc="``zero_bytes_per_device(n_params, devices, stage)``: ZeRO's model-state bytes per device for mixed-precision "
        "Adam (2 + 2 + 12 bytes per parameter) at stage 0 to 3.")
