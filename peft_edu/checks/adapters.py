"""The adapters chapter's exercise checks (``notebooks/adapters.ipynb``): a bottleneck adapter's parameter
count and forward pass, IA³ in the feed-forward network, and an adapter that starts as the identity and
still learns.

Each exercise is its ``request``, ``probe`` and ``judge`` (see ``peft_edu.checks``), bound once into an
``Exercise`` whose variable is the name the notebook's tests call. The tensor exercises draw their shapes
and dtypes from the seed (float32, float64 and, where the arithmetic allows it, bfloat16), so an answer that
hard-codes a shape or returns float32 whatever it is given fails a hidden test.
"""

from __future__ import annotations

import torch
from torch import nn

from .core import Exercise, _answer_kind, _call, _capture, _fail, _probe_each_case, _require_callable, _value_of

# How close an answer computed in a dtype must be to the float64 reference (absolute, relative).
_TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 3e-2)}


def _draw(generator: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Random normal numbers drawn in float64 (the same for every dtype), then cast."""
    return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high, (1,), generator=generator))


def _matches(got, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """``got`` has ``want``'s shape and equals it (computed in float64) within the tolerance of ``dtype``."""
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape) or not got.is_floating_point():
        return False
    atol, rtol = _TOLERANCE[dtype]
    return torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol)


def _require_tensor_like(got, want: torch.Tensor, dtype: torch.dtype, what: str, inputs: str) -> None:
    """Fail if ``got`` is not a tensor of ``want``'s shape, or has the right values in the wrong dtype."""
    if not isinstance(got, torch.Tensor):
        kind = got.get("type") if isinstance(got, dict) else type(got).__name__
        _fail(f"{what} should return a tensor, it returned {kind}.")
    if tuple(got.shape) != tuple(want.shape):
        _fail(f"{what} should return a tensor of shape {tuple(want.shape)} for these inputs ({inputs}); "
              f"yours has shape {tuple(got.shape)}.")
    if got.dtype != dtype and _matches(got, want, got.dtype if got.dtype in _TOLERANCE else dtype):
        _fail(f"Right values, but your result is {got.dtype} for {dtype} inputs: keep the inputs' dtype "
              "(no .float(), and create any new tensor with torch.zeros_like / new_zeros, not torch.zeros).")


# --- Adapters chapter: parameters of a bottleneck adapter ---------------------------------------
def _bn_params_request(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    random_cases = [[_randint(g, 64, 4096), _randint(g, 3, 65)] for _ in range(3)]
    # 384 // 16 = 24 (MiniLM, Pfeiffer), 768 // 5 = 153 (not a divisor), 384 // 2 = 192 (parallel)
    return {"cases": [[384, 16], [768, 5], [384, 2]] + random_cases}


def _bn_params_probe(bottleneck_params, request: dict) -> dict:
    return _probe_each_case(bottleneck_params, request["cases"], lambda case: case)


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
_ADAPTER_ARGS = ("h", "W_down", "b_down", "W_up", "b_up")


def _adapter_request(seed: int) -> dict:
    """Two cases, float32 and float64 (in an order the seed picks), each with its own d > m and batch shape."""
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float64][:: 1 if seed % 2 == 0 else -1]
    cases = []
    for dtype in dtypes:
        d = _randint(g, 8, 25)
        m = _randint(g, 2, d // 2 + 1)  # m < d: swapped projections cannot pass by accident
        batch, tokens = _randint(g, 1, 4), _randint(g, 2, 6)
        cases.append({"h": _draw(g, batch, tokens, d, dtype=dtype), "W_down": _draw(g, m, d, dtype=dtype),
                      "b_down": _draw(g, m, dtype=dtype), "W_up": _draw(g, d, m, dtype=dtype),
                      "b_up": _draw(g, d, dtype=dtype)})
    return {"cases": cases}


def _adapter_probe(adapter_forward, request: dict) -> dict:
    return _probe_each_case(adapter_forward, request["cases"], lambda case: [case[k].clone() for k in _ADAPTER_ARGS])


def _adapter_judge(request: dict, observed: dict) -> None:
    """``adapter_forward(h, W_down, b_down, W_up, b_up)`` must be h + W_up·ReLU(W_down·h + b_down) + b_up."""
    _require_callable(observed, "adapter_forward")
    for case, call in zip(request["cases"], observed["calls"]):
        got = _value_of(call, "adapter_forward")
        h, W_down, b_down, W_up, b_up = (case[k].double() for k in _ADAPTER_ARGS)
        dtype = case["h"].dtype
        down = h @ W_down.T + b_down
        branch = torch.relu(down) @ W_up.T + b_up
        want = h + branch
        if _matches(got, want, dtype) and got.dtype == dtype:
            continue
        _require_tensor_like(got, want, dtype, "adapter_forward",
                             f"h {tuple(h.shape)}, d={W_down.shape[1]}, m={W_down.shape[0]}")
        if _matches(got, branch, dtype):
            _fail("Your output is the adapter branch alone: the residual (skip) connection h + ... is missing, so the "
                  "adapter would replace the hidden state instead of adding a small correction to it.")
        if _matches(got, h + torch.relu(down @ W_up.T + b_up), dtype):
            _fail("The ReLU is in the wrong place: you apply it after the up-projection. The non-linearity sits in the "
                  "bottleneck, between W_down and W_up: h + W_up·f(W_down·h + b_down) + b_up.")
        if _matches(got, torch.relu(h + branch), dtype):
            _fail("You apply the ReLU to the sum h + branch; it belongs inside the bottleneck, between W_down and W_up "
                  "(a ReLU after the residual would zero every negative feature of h).")
        if _matches(got, h + down @ W_up.T + b_up, dtype):
            _fail("The non-linearity is missing: without it the adapter is a linear (low-rank) map. "
                  "Apply ReLU to W_down·h + b_down.")
        if any(_matches(got, wrong, dtype) for wrong in (h + torch.relu(h @ W_down.T) @ W_up.T,
                                                          h + torch.relu(down) @ W_up.T, h + torch.relu(h @ W_down.T) @ W_up.T + b_up)):
            _fail("A bias is missing: the down-projection adds b_down (before the ReLU), the up-projection adds b_up.")
        _fail("adapter_forward(h, W_down, b_down, W_up, b_up) does not equal h + W_up·ReLU(W_down·h + b_down) + b_up. "
              "With h of shape (..., d): first h @ W_down.T (to m units), then ReLU, then @ W_up.T (back to d).")


check_adapter_forward = Exercise(
    "function", _adapter_request, _adapter_probe, _adapter_judge,
    doc="``adapter_forward(h, W_down, b_down, W_up, b_up)`` must be h + W_up·ReLU(W_down·h + b_down) + b_up.")


# --- Adapters chapter: IA³ in the feed-forward network ------------------------------------------
_IA3_ARGS = ("x", "W", "b", "l")


def _ia3_ffn_request(seed: int) -> dict:
    """A square layer first (where scaling the output would run), then the FFN's d_ff → d (where it cannot);
    float32, float64 and bfloat16 among the cases, in an order the seed picks."""
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float64, torch.bfloat16]
    dtypes = dtypes[seed % 3:] + dtypes[:seed % 3]
    square = _randint(g, 4, 13)
    d_out = _randint(g, 3, 9)
    shapes = [(square, square), (d_out * _randint(g, 2, 5), d_out), (d_out + _randint(g, 1, 7), d_out)]
    cases = []
    for (d_in, d_out), dtype in zip(shapes, dtypes):
        batch, tokens = _randint(g, 1, 4), _randint(g, 2, 5)
        l = (2 * torch.rand(d_in, generator=g, dtype=torch.float64)).to(dtype)
        cases.append({"x": _draw(g, batch, tokens, d_in, dtype=dtype), "W": _draw(g, d_out, d_in, dtype=dtype),
                      "b": _draw(g, d_out, dtype=dtype), "l": l})
    return {"cases": cases}


def _ia3_ffn_probe(ia3_scale_ffn, request: dict) -> dict:
    return _probe_each_case(ia3_scale_ffn, request["cases"], lambda case: [case[k].clone() for k in _IA3_ARGS])


def _ia3_ffn_judge(request: dict, observed: dict) -> None:
    """``ia3_scale_ffn(x, W, b, l)`` must be W (l ⊙ x) + b: IA³ scales the input of the FFN's second projection."""
    _require_callable(observed, "ia3_scale_ffn")
    for case, call in zip(request["cases"], observed["calls"]):
        x, W, b, l = (case[k].double() for k in _IA3_ARGS)
        dtype = case["x"].dtype
        if call["status"] == "raised" and "size of tensor" in call["error"] and W.shape[0] != W.shape[1]:
            _fail(f"ia3_scale_ffn raised {call['error']} for a layer with d_in={W.shape[1]}, d_out={W.shape[0]}. "
                  "l has d_in entries: it scales the layer's *input* (the FFN's inner activation), not its output.")
        got = _value_of(call, "ia3_scale_ffn")
        want = (x * l) @ W.T + b
        if _matches(got, want, dtype) and got.dtype == dtype:
            continue
        _require_tensor_like(got, want, dtype, "ia3_scale_ffn", f"x {tuple(x.shape)}, W {tuple(W.shape)}")
        square = W.shape[0] == W.shape[1]  # only there can the output be scaled by l without an error
        if square and (_matches(got, l * (x @ W.T + b), dtype) or _matches(got, l * (x @ W.T) + b, dtype)):
            _fail("You scaled the layer's output. For the feed-forward layer IA³ scales the *input*, the FFN's inner "
                  "activation (l_ff ⊙ γ(W₁x) in the paper), before the projection: W (l ⊙ x) + b.")
        if _matches(got, (x * l) @ W.T, dtype):
            _fail("The bias b is missing: the layer still adds it, unscaled: W (l ⊙ x) + b.")
        if square and _matches(got, (x * l) @ W.T + b * l, dtype):
            _fail("You scaled the bias too. Only the input is scaled: W (l ⊙ x) + b.")
        if _matches(got, x @ W.T + b, dtype):
            _fail("Your output is the frozen layer's: the learned vector l is not used.")
        _fail("ia3_scale_ffn(x, W, b, l) does not equal W (l ⊙ x) + b, i.e. (x * l) @ W.T + b.")


check_ia3_scale_ffn = Exercise(
    "function", _ia3_ffn_request, _ia3_ffn_probe, _ia3_ffn_judge,
    doc="``ia3_scale_ffn(x, W, b, l)`` must be W (l ⊙ x) + b (IA³ scales the FFN's inner activation).")


# --- Adapters chapter: start as the identity, and still learn -----------------------------------
_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


def _identity_init_request(seed: int) -> dict:
    """Three adapters, float32, float64 and bfloat16 (in an order the seed picks), each of its own d > m.

    The dtype travels by name (a request crosses the grading sandbox as JSON and tensors)."""
    g = torch.Generator().manual_seed(seed)
    dtypes = ["float32", "float64", "bfloat16"]
    dtypes = dtypes[seed % 3:] + dtypes[:seed % 3]
    cases = []
    for dtype in dtypes:
        d = _randint(g, 6, 33)
        m = _randint(g, 2, d // 2 + 1)
        tokens = _randint(g, 4, 9)
        cases.append({"d": d, "m": m, "dtype": dtype, "init_seed": _randint(g, 0, 10_000),
                      "h": _draw(g, 2, tokens, d, dtype=getattr(torch, dtype)),
                      "grad_out": _draw(g, 2, tokens, d, dtype=getattr(torch, dtype))})
    return {"cases": cases}


def _identity_init_probe(adapter_class, request: dict) -> dict:
    """Build the learner's adapter for each case, cast it to the case's dtype, run it once and backpropagate."""
    observed = _answer_kind(adapter_class)
    if not observed["callable"]:
        return observed
    observed["name"] = getattr(adapter_class, "__name__", "your class")
    observed["cases"] = []
    for case in request["cases"]:
        record: dict = {}
        observed["cases"].append(record)
        torch.manual_seed(case["init_seed"])
        record["construct"], adapter = _call(adapter_class, case["d"], case["m"])
        if record["construct"]["status"] != "ok":
            continue
        record["is_module"] = isinstance(adapter, nn.Module)
        if not record["is_module"]:
            continue
        adapter = adapter.to(getattr(torch, case["dtype"]))
        parameters = dict(adapter.named_parameters())
        record["shapes"] = {name: tuple(p.shape) for name, p in parameters.items()}
        record["trainable"] = sorted(name for name, p in parameters.items() if p.requires_grad)
        record["init"] = {name: parameters[name].detach().clone() for name in _PARTS if name in parameters}
        outcome, out = _call(adapter, case["h"].clone())
        record["out"] = outcome | {"value": _capture(out)} if outcome["status"] == "ok" else outcome
        if isinstance(out, torch.Tensor) and out.requires_grad and out.shape == case["grad_out"].shape:
            try:
                out.backward(case["grad_out"].to(out.dtype))
            except Exception as error:
                record["backward_error"] = f"{type(error).__name__}: {error}"[:500]
        record["grads"] = {name: None if p.grad is None else p.grad.detach().clone() for name, p in parameters.items()}
    return observed


def _default_init(case: dict) -> dict[str, torch.Tensor]:
    """What nn.Linear's own initialisation gives for this case: the blank cell's adapter."""
    torch.manual_seed(case["init_seed"])
    down, up = nn.Linear(case["d"], case["m"]), nn.Linear(case["m"], case["d"])
    values = {"down.weight": down.weight, "down.bias": down.bias, "up.weight": up.weight, "up.bias": up.bias}
    return {name: value.detach().to(getattr(torch, case["dtype"])) for name, value in values.items()}


def _identity_init_judge(request: dict, observed: dict) -> None:
    """The adapter h + up(ReLU(down(h))) must return exactly h at initialisation, and still be able to learn:
    W_up gets a gradient that depends on the input (W_down stays random), all four tensors train."""
    _require_callable(observed, "Your adapter class", kind="class")
    name = observed["name"]
    for case, record in zip(request["cases"], observed["cases"]):
        d, m, dtype = case["d"], case["m"], getattr(torch, case["dtype"])
        if record["construct"]["status"] != "ok":
            _value_of(record["construct"], f"{name}(d={d}, m={m})")
        if not record["is_module"]:
            _fail(f"{name}(d, m) should build an nn.Module (class {name}(nn.Module): ...).")
        want_shapes = {"down.weight": (m, d), "down.bias": (m,), "up.weight": (d, m), "up.bias": (d,)}
        shapes = {part: tuple(shape) for part, shape in record["shapes"].items()}  # lists, after the sandbox
        if shapes != want_shapes:
            _fail(f"Keep the two layers the cell gives you, self.down = nn.Linear(d, m) and self.up = nn.Linear(m, d), "
                  f"and add no parameter. For d={d}, m={m} the parameters should be {want_shapes}; yours are "
                  f"{shapes}.")
        if record["trainable"] != sorted(_PARTS):
            _fail(f"All four tensors of the adapter must train (requires_grad); yours train {record['trainable']}. "
                  "Starting at zero is not the same as being frozen: a frozen zero up-projection stays zero forever.")
        init = record["init"]
        default = _default_init(case)
        if all(torch.equal(init[part], default[part]) for part in _PARTS):
            _fail("Your adapter starts with nn.Linear's own random initialisation, as the blank cell does: the "
                  "initialisation is not implemented yet. Change the starting values so that the adapter returns h "
                  "unchanged, and can still learn.")
        out = _value_of(record["out"], f"{name}(d, m)(h)")
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(case["h"].shape):
            _fail(f"The forward pass should return a tensor of h's shape {tuple(case['h'].shape)}; keep the forward the "
                  "cell gives you, h + self.up(torch.relu(self.down(h))).")
        if out.dtype != dtype:
            _fail(f"For an adapter cast to {dtype} your forward returns {out.dtype}: keep the forward the cell gives you.")
        h = case["h"]
        if not torch.equal(out, h):
            change = (out.double() - h.double()).abs().max().item()
            if torch.count_nonzero(init["up.weight"]) == 0:
                _fail(f"W_up is zero, but your adapter still changes h by up to {change:.2g}: the up-projection's "
                      "bias b_up is added to every token. Zero it too.")
            if change < 0.1 * h.double().abs().max().item():
                _fail(f"Close to the identity, but not exactly: your adapter changes h by up to {change:.2g} at "
                      "initialisation. Small random weights (Houlsby's near-identity start) still move every output; "
                      "which of the four tensors must be exactly zero for h + up(ReLU(down(h))) to equal h?")
            _fail(f"At initialisation your adapter changes h by up to {change:.2g}. The model must start exactly as the "
                  "pretrained one: make the adapter's branch up(ReLU(down(h))) zero for every h.")
        grads = record["grads"]
        if "backward_error" in record or any(grads[part] is None for part in _PARTS):
            _fail(f"Backpropagating through your adapter failed or left a parameter without a gradient "
                  f"({record.get('backward_error', 'no gradient')}); keep the forward the cell gives you.")
        bottleneck = torch.relu(h.double() @ init["down.weight"].double().T + init["down.bias"].double())
        if torch.count_nonzero(grads["up.weight"]) == 0:
            _fail("Your adapter is the identity, but it can never learn: its bottleneck ReLU(W_down h + b_down) is 0 for "
                  "every token (W_down = 0, b_down ≤ 0), so ∂L/∂W_up = δ·ReLU(...)ᵀ = 0, and no gradient reaches the "
                  "down-projection either (it is multiplied by W_up, and by ReLU'(0) = 0). Neither projection would "
                  "ever move; only b_up would, a constant shift. Keep the down-projection random and zero only what "
                  "the identity needs.")
        if torch.count_nonzero(init["down.weight"]) == 0 or bottleneck.flatten(0, -2).std(dim=0).max() == 0:
            _fail("Your adapter is the identity, but its bottleneck ReLU(W_down h + b_down) is the same for every token "
                  "(W_down is zero): at first it can only learn a constant shift, the same for every input. Keep the "
                  "down-projection random, as nn.Linear initialises it, and zero only what the identity needs.")


check_identity_init = Exercise(
    "class", _identity_init_request, _identity_init_probe, _identity_init_judge,
    doc="``adapter_class(d, m)`` must build h + up(ReLU(down(h))) that returns h exactly at initialisation, with "
        "W_down random and every tensor trainable, so that W_up gets an input-dependent gradient.")
