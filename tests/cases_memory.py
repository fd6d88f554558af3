"""The exercise-check cases of the memory chapter (see ``check_cases`` for what a case holds)."""

from __future__ import annotations

from chapter_cases import Chapter

from peft_edu import checks


# --- memory ---------------------------------------------------------------------------------------
def _zero(n, devices, stage, k=12, partitioned_from=None):
    """ZeRO's per-device model states with K bytes of optimizer state; ``partitioned_from`` overrides the stage."""
    parts = [k * n, 2 * n, 2 * n]   # optimizer state, gradients, weights: the order in which stages partition
    cut = stage if partitioned_from is None else partitioned_from
    return sum(size / devices if i < cut else size for i, size in enumerate(parts))


MEMORY = Chapter(
    name="memory",
    questions={
        "q1": ("adam_state_bytes", checks.check_adam_state_bytes),
        "q2": ("lora_trainable_count", checks.check_lora_trainable_count),
        "q3": ("bits_per_weight", checks.check_bits_per_weight),
        "q4": ("zero_bytes_per_device", checks.check_zero_bytes_per_device),
    },
    stub_must_not_contain=("8 *", "d_in + d_out", "32 /", "/ devices"),
    stub_feedback=r"not implemented yet",
    wrong={
        "q1": [
            ("one-moment", lambda n, master: (4 + (4 if master else 0)) * n, r"one moment is missing"),
            ("no-master-copy", lambda n, master: 8 * n, r"master copy of them"),
            ("master-copy-always", lambda n, master: 12 * n, r"no master copy"),
            ("bits", lambda n, master: 8 * (8 + (4 if master else 0)) * n, r"that is bits"),
            ("weights-and-gradients-too", lambda n, master: 16 * n, r"includes the weights and the gradients"),
            ("sixteen-bit-moments", lambda n, master: (4 + (4 if master else 0)) * n, r"counted in 16 bits"),
            ("a-string", lambda n, master: f"{8 * n} bytes", r"returned a str; return a number"),
            ("bool-flag-as-bytes", lambda n, master: 8 * n + master, r"adam_state_bytes is not"),
        ],
        "q2": [
            ("B-only", lambda shapes, r: sum(r * d_out for d_out, _ in shapes), r"count B \(d_out × r\) only"),
            ("A-only", lambda shapes, r: sum(r * d_in for _, d_in in shapes), r"count A \(r × d_in\) only"),
            ("square", lambda shapes, r: sum(2 * r * d_in for _, d_in in shapes), r"as if every layer were square"),
            ("dense-update", lambda shapes, r: sum(r * d_in * d_out for d_out, d_in in shapes), r"dense d_out × d_in"),
            ("distinct-shapes", lambda shapes, r: sum(r * (d_in + d_out) for d_out, d_in in set(shapes)),
             r"each distinct shape once"),
            ("first-layer", lambda shapes, r: r * sum(shapes[0]), r"first layer only"),
            ("r-squared", lambda shapes, r: sum(r * (d_in + d_out) + r * r for d_out, d_in in shapes),
             r"lora_trainable_count is not"),
        ],
        "q3": [
            ("codes-only", lambda b, double, b2: 4, r"each block also stores its absmax"),
            ("bytes", lambda b, double, b2: (4 + 8 / b + 32 / (b * b2) if double else 4 + 32 / b) / 8,
             r"that is bytes per weight"),
            ("no-second-level", lambda b, double, b2: 4 + 8 / b if double else 4 + 32 / b,
             r"not the float32 constant that each block of second_blocksize"),
            ("double-quant-ignored", lambda b, double, b2: 4 + 32 / b,
             r"the cost without double quantisation"),
            ("sixteen-bit-absmax", lambda b, double, b2: 4 + 8 / b + 16 / (b * b2) if double else 4 + 16 / b,
             r"16-bit constant"),
            ("absmax-per-weight", lambda b, double, b2: 36, r"shared by the blocksize weights"),
            ("a-tuple", lambda b, double, b2: (4, 32 / b), r"returned a tuple; return a number"),
        ],
        "q4": [
            ("no-master-weights", lambda n, devices, stage: _zero(n, devices, stage, k=8),
             r"master weights|2 \+ 2 \+ 12 = 16"),
            ("one-stage-ahead", lambda n, devices, stage: _zero(n, devices, stage, partitioned_from=min(stage + 1, 3)),
             r"one part too many"),
            ("one-stage-behind", lambda n, devices, stage: _zero(n, devices, stage, partitioned_from=max(stage - 1, 0)),
             r"one part too few|replicated 16Ψ"),
            ("everything-divided", lambda n, devices, stage: 16 * n / devices, r"divide everything"),
            ("nothing-divided", lambda n, devices, stage: 16 * n, r"one part too few|replicated 16Ψ"),
            ("bits", lambda n, devices, stage: 8 * _zero(n, devices, stage), r"return bits"),
            ("weights-sharded-first", lambda n, devices, stage: _zero(n, devices, 0)
             - (1 - 1 / devices) * 2 * n * (stage >= 1), r"zero_bytes_per_device is not"),
        ],
    },
)
