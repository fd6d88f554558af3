"""The adapters chapter's exercise checks (``notebooks/adapters.ipynb``): a bottleneck adapter's parameter
count and forward pass, and IA³ in the feed-forward network.

Each exercise is its ``request``, ``probe`` and ``judge`` (see ``peft_edu.checks``), bound once into an
``Exercise`` whose variable is the name the notebook's tests call.
"""

from __future__ import annotations

import torch

from .core import Exercise, _answer_kind, _close, _fail, _require_callable, _run, _value_of


# --- Adapters chapter: parameters of a bottleneck adapter ---------------------------------------
def _bn_params_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    random_cases = [[int(torch.randint(64, 4096, (1,), generator=g)), int(torch.randint(3, 65, (1,), generator=g))]
                    for _ in range(3)]
    # 384 // 16 = 24 (MiniLM, Pfeiffer), 768 // 5 = 153 (not a divisor), 384 // 2 = 192 (parallel)
    return {"cases": [[384, 16], [768, 5], [384, 2]] + random_cases}


def _bn_params_probe(bottleneck_params, request: dict) -> dict:
    observed = _answer_kind(bottleneck_params)
    if observed["callable"]:
        observed["calls"] = [_run(bottleneck_params, d, factor) for d, factor in request["cases"]]
    return observed


def _bn_params_judge(request: dict, observed: dict) -> None:
    """``bottleneck_params(d, reduction_factor)`` must be 2·d·m + m + d with m = d // reduction_factor."""
    _require_callable(observed, "bottleneck_params")
    for (d, factor), call in zip(request["cases"], observed["calls"]):
        got = _value_of(call, "bottleneck_params")
        m = max(1, d // factor)
        want = 2 * d * m + m + d
        if got == want:
            continue
        if got == 2 * d * m:
            _fail(f"For d={d}, reduction_factor={factor} you return 2·d·m = {got}: the two weight matrices only. "
                  "Both projections are nn.Linear layers with a bias: add m (down) + d (up).")
        if got in (2 * d * m + m, 2 * d * m + d):
            _fail(f"For d={d}, reduction_factor={factor} you return {got}: one of the two biases is missing "
                  "(W_down has a bias of m entries, W_up one of d entries).")
        if got in (d * m + m, d * m + d, d * m):
            _fail(f"For d={d}, reduction_factor={factor} you return {got}: that counts one projection only. "
                  "An adapter has a down-projection (d→m) and an up-projection (m→d).")
        exact = d / factor
        if isinstance(got, (int, float)) and m != exact and abs(got - (2 * d * exact + exact + d)) < 1e-6:
            _fail(f"For d={d}, reduction_factor={factor} the bottleneck size must be a whole number of units: "
                  f"m = d // reduction_factor = {m}, not d / reduction_factor = {exact:g}.")
        _fail(f"For d={d}, reduction_factor={factor} the answer is not {got!r}. With m = d // reduction_factor, "
              "count the weights and biases of the down-projection (d→m) and of the up-projection (m→d).")


check_bottleneck_params = Exercise(
    "function", _bn_params_request, _bn_params_probe, _bn_params_judge,
    doc="``bottleneck_params(d, reduction_factor)`` must be 2·d·m + m + d with m = d // reduction_factor.")


# --- Adapters chapter: the adapter's forward pass -----------------------------------------------
def _adapter_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d, m = 10, 4  # d ≠ m: swapped projections cannot pass by accident
    return {"h": torch.randn(2, 3, d, generator=g), "W_down": torch.randn(m, d, generator=g),
            "b_down": torch.randn(m, generator=g), "W_up": torch.randn(d, m, generator=g),
            "b_up": torch.randn(d, generator=g)}


def _adapter_probe(adapter_forward, q: dict) -> dict:
    observed = _answer_kind(adapter_forward)
    if observed["callable"]:
        observed["call"] = _run(adapter_forward, *(q[k].clone() for k in ("h", "W_down", "b_down", "W_up", "b_up")))
    return observed


def _adapter_judge(q: dict, observed: dict) -> None:
    """``adapter_forward(h, W_down, b_down, W_up, b_up)`` must be h + W_up·ReLU(W_down·h + b_down) + b_up."""
    _require_callable(observed, "adapter_forward")
    got = _value_of(observed["call"], "adapter_forward")
    h, W_down, b_down, W_up, b_up = q["h"], q["W_down"], q["b_down"], q["W_up"], q["b_up"]
    down = h @ W_down.T + b_down
    branch = torch.relu(down) @ W_up.T + b_up
    want = h + branch
    if _close(got, want):
        return
    if not isinstance(got, torch.Tensor):
        _fail(f"adapter_forward should return a tensor, it returned {got.get('type') if isinstance(got, dict) else type(got).__name__}.")
    if got.shape != want.shape:
        _fail(f"The output should have h's shape {tuple(want.shape)}, yours has {tuple(got.shape)}: the adapter "
              "projects down to m units and back up to d.")
    if _close(got, branch):
        _fail("Your output is the adapter branch alone: the residual (skip) connection h + ... is missing, so the "
              "adapter would replace the hidden state instead of adding a small correction to it.")
    if _close(got, h + torch.relu(down @ W_up.T + b_up)):
        _fail("The ReLU is in the wrong place: you apply it after the up-projection. The non-linearity sits in the "
              "bottleneck, between W_down and W_up: h + W_up·f(W_down·h + b_down) + b_up.")
    if _close(got, torch.relu(h + branch)):
        _fail("You apply the ReLU to the sum h + branch; it belongs inside the bottleneck, between W_down and W_up "
              "(a ReLU after the residual would zero every negative feature of h).")
    if _close(got, h + down @ W_up.T + b_up):
        _fail("The non-linearity is missing: without it the adapter is a linear (low-rank) map. "
              "Apply ReLU to W_down·h + b_down.")
    if _close(got, h + torch.relu(h @ W_down.T) @ W_up.T) or _close(got, h + torch.relu(down) @ W_up.T):
        _fail("A bias is missing: the down-projection adds b_down (before the ReLU), the up-projection adds b_up.")
    _fail("adapter_forward(h, W_down, b_down, W_up, b_up) does not equal h + W_up·ReLU(W_down·h + b_down) + b_up. "
          "With h of shape (..., d): first h @ W_down.T (to m units), then ReLU, then @ W_up.T (back to d).")


check_adapter_forward = Exercise(
    "function", _adapter_request, _adapter_probe, _adapter_judge,
    doc="``adapter_forward(h, W_down, b_down, W_up, b_up)`` must be h + W_up·ReLU(W_down·h + b_down) + b_up.")


# --- Adapters chapter: IA³ in the feed-forward network ------------------------------------------
def _ia3_ffn_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for d_in, d_out in ((8, 8), (16, 6)):  # square first (scaling the output would run), then the FFN's 4d → d
        cases.append({"x": torch.randn(2, 3, d_in, generator=g), "W": torch.randn(d_out, d_in, generator=g),
                      "b": torch.randn(d_out, generator=g), "l": torch.rand(d_in, generator=g) * 2})
    return {"cases": cases}


def _ia3_ffn_probe(ia3_scale_ffn, q: dict) -> dict:
    observed = _answer_kind(ia3_scale_ffn)
    if observed["callable"]:
        observed["calls"] = [_run(ia3_scale_ffn, *(c[k].clone() for k in ("x", "W", "b", "l"))) for c in q["cases"]]
    return observed


def _ia3_ffn_judge(q: dict, observed: dict) -> None:
    """``ia3_scale_ffn(x, W, b, l)`` must be W (l ⊙ x) + b: IA³ scales the input of the FFN's second projection."""
    _require_callable(observed, "ia3_scale_ffn")
    for case, call in zip(q["cases"], observed["calls"]):
        x, W, b, l = case["x"], case["W"], case["b"], case["l"]
        if call["status"] == "raised" and "size of tensor" in call["error"] and W.shape[0] != W.shape[1]:
            _fail(f"ia3_scale_ffn raised {call['error']} for a layer with d_in={W.shape[1]}, d_out={W.shape[0]}. "
                  "l has d_in entries: it scales the layer's *input* (the FFN's inner activation), not its output.")
        got = _value_of(call, "ia3_scale_ffn")
        want = (x * l) @ W.T + b
        if _close(got, want):
            continue
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            _fail(f"ia3_scale_ffn should return a tensor of shape {tuple(want.shape)} (..., d_out).")
        if _close(got, l * (x @ W.T + b)) or _close(got, l * (x @ W.T) + b):
            _fail("You scaled the layer's output. For the feed-forward layer IA³ scales the *input*, the FFN's inner "
                  "activation (l_ff ⊙ γ(W₁x) in the paper), before the projection: W (l ⊙ x) + b.")
        if _close(got, (x * l) @ W.T):
            _fail("The bias b is missing: the layer still adds it, unscaled: W (l ⊙ x) + b.")
        if _close(got, (x * l) @ W.T + b * l):
            _fail("You scaled the bias too. Only the input is scaled: W (l ⊙ x) + b.")
        if _close(got, x @ W.T + b):
            _fail("Your output is the frozen layer's: the learned vector l is not used.")
        _fail("ia3_scale_ffn(x, W, b, l) does not equal W (l ⊙ x) + b, i.e. (x * l) @ W.T + b.")


check_ia3_scale_ffn = Exercise(
    "function", _ia3_ffn_request, _ia3_ffn_probe, _ia3_ffn_judge,
    doc="``ia3_scale_ffn(x, W, b, l)`` must be W (l ⊙ x) + b (IA³ scales the FFN's inner activation).")
