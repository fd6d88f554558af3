"""PEFT's custom-model test cases, re-created (not copied): the models of PEFT's ``tests/test_custom_models.py``
(MLPs, embeddings, Conv1D, convolutions, grouped convolutions, multi-head attention) and the kit that checks one
adapter on them against PEFT with every verb (outputs, gradients, merge/unmerge, adapter files both ways).
Used by ``test_peft_case_matrix.py`` and ``test_lora_layers.py``; the shared comparisons are in ``parity.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft_edu
from parity import assert_base_restored, assert_close, make_pair, randomize
from peft_edu.model import PEFT_KEY_PREFIX, adapter_state_dict


# --- PEFT's custom test models, re-created ----------------------------------------------------------
# The small models of PEFT's tests/test_custom_models.py, with its layer names and sizes, so that its cases' configs
# apply unchanged. Each takes CUSTOM_INPUT (PEFT's: the integers 0..89 as a 9 × 10 tensor) and ends in a log-softmax.
CUSTOM_INPUT = torch.arange(90).view(9, 10)


class _Custom(nn.Module):
    def head(self, X):
        return torch.log_softmax(X, dim=-1)


class CustomMLP(_Custom):
    """PEFT's MLP, or with ``layer=MatmulLayer`` its MlpUsingParameters (the target of target_parameters)."""

    def __init__(self, layer: type = nn.Linear):
        super().__init__()
        self.lin0, self.drop, self.lin1 = layer(10, 20), nn.Dropout(0.5), layer(20, 2)

    def forward(self, X):
        return self.head(self.lin1(self.drop(torch.relu(self.lin0(X.float())))))


class CustomEmbConv1D(_Custom):
    """Token embedding, then transformers' Conv1D (GPT-2's layer: weight stored transposed) on each token."""

    def __init__(self):
        super().__init__()
        self.emb, self.conv1d, self.lin0 = nn.Embedding(100, 5), Conv1D(1, 5), nn.Linear(10, 2)

    def forward(self, X):
        return self.head(self.lin0(torch.relu(self.conv1d(self.emb(X))).flatten(1)))


class CustomConv(_Custom):
    """A convolution (named conv1d, conv2d or conv3d, as PEFT's configs name it) on X reshaped to ``input_shape``
    (Conv3d: X repeated 3 times along a new last axis first, as PEFT's), flattened into ``lin0``."""

    def __init__(self, conv: nn.Module, input_shape: tuple, head_in: int):
        super().__init__()
        self.conv_name = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}[type(conv)]
        setattr(self, self.conv_name, conv)
        self.input_shape, self.lin0 = input_shape, nn.Linear(head_in, 2)

    def forward(self, X):
        X = X.float()
        if self.conv_name == "conv3d":
            X = torch.stack([X] * 3, dim=-1)
        conv = getattr(self, self.conv_name)
        return self.head(self.lin0(torch.relu(conv(X.reshape(self.input_shape))).flatten(1)))


class CustomGroups(_Custom):
    """PEFT's Conv2dGroups: a Linear makes 2 images of 16 channels, then a convolution with groups=8."""

    def __init__(self):
        super().__init__()
        self.lin0, self.conv2d, self.lin1 = nn.Linear(90, 288), nn.Conv2d(16, 16, 3, groups=8), nn.Linear(16, 2)

    def forward(self, X):
        images = self.lin0(X.float().flatten()).reshape(2, 16, 3, 3)
        return self.head(self.lin1(torch.relu(self.conv2d(images)).flatten(1)))


class CustomGroups2(_Custom):
    """PEFT's Conv2dGroups2: a grouped convolution with padding on its own (scaled) 9 × 16 × 20 × 20 input."""

    def __init__(self):
        super().__init__()
        self.conv2d, self.lin0 = nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.Linear(12800, 2)

    def forward(self, X):
        images = torch.arange(9 * 16 * 20 * 20, dtype=torch.float32).view(9, 16, 20, 20) / (9 * 16 * 20 * 20)
        return self.head(self.lin0(torch.relu(self.conv2d(images)).flatten(1)))


class CustomMHA(_Custom):
    def __init__(self):
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(10, 2), nn.Linear(10, 2)

    def forward(self, X):
        X = X.float() / 90
        return self.head(self.lin0(self.mha(X, X, X)[0]))


class MatmulLayer(nn.Module):
    """x @ W + b with a bare parameter W (in, out), no nn.Linear: what PEFT's target_parameters adapts."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(d_in, d_out)), nn.Parameter(torch.ones(d_out))

    def forward(self, x):
        return x @ self.weight + self.bias


CUSTOM_MODELS = {
    "MLP": CustomMLP,
    "EmbConv1D": CustomEmbConv1D,
    "Conv1d": lambda: CustomConv(nn.Conv1d(1, 1, 2), (-1, 1, 10), 9),
    "Conv2d": lambda: CustomConv(nn.Conv2d(5, 10, 3), (-1, 5, 3, 3), 10),
    "Conv2dGroups": CustomGroups,
    "Conv2dGroups2": CustomGroups2,
    "Conv3d": lambda: CustomConv(nn.Conv3d(5, 10, 3), (-1, 5, 3, 3, 3), 10),
    "MHA": CustomMHA,
    "MlpUsingParameters": lambda: CustomMLP(MatmulLayer),
}


def build_custom(model_id: str, seed: int = 0) -> nn.Module:
    """A fresh CUSTOM_MODELS model, in eval mode, the same weights for the same seed."""
    torch.manual_seed(seed)
    return CUSTOM_MODELS[model_id]().eval()


# --- one adapter, both libraries, every verb -----------------------------------------------------------
def file_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under their adapter-file keys (``base_model.model.`` included), for a peft_edu or a PEFT
    model; they share storage with the parameters."""
    if isinstance(model, peft.PeftModel):
        return peft.get_peft_model_state_dict(model)
    return {PEFT_KEY_PREFIX + key: tensor for key, tensor in adapter_state_dict(model).items()}


def trainable_by_file_key(model) -> dict[str, nn.Parameter]:
    """The trainable parameters under their file keys, matched by storage: this compares the two libraries even where
    they name a parameter differently (PEFT's ``lin1.modules_to_save.default.weight`` is the file's ``lin1.weight``)."""
    key_of = {tensor.data_ptr(): key for key, tensor in file_tensors(model).items()}
    return {key_of[p.data_ptr()]: p for p in model.parameters() if p.requires_grad}


def random_adapter(model, seed: int = 0) -> None:
    """New adapter values, drawn by file key: N(0, 0.5²), and scales (IA³'s l, DoRA's m) 1 + N(0, 0.3²)."""
    def draw(key, tensor, noise):
        return 1 + 0.3 * noise if ("ia3_l" in key or "magnitude" in key) else 0.5 * noise
    randomize(trainable_by_file_key(model), seed=seed, draw=draw)


def custom_run(model, X, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train-mode output on X (after torch.manual_seed(seed): dropout) and the gradients of a fixed random projection
    of it, by file key."""
    model.train()
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = model(X)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * weights).sum().backward()
    grads = {key: p.grad for key, p in trainable_by_file_key(model).items()}
    model.eval()
    return out.detach(), grads


def assert_same_tensors(ours: dict, theirs: dict, rel=1e-5, what="tensors") -> None:
    assert set(ours) == set(theirs), f"{what}: keys differ {sorted(set(ours) ^ set(theirs))}"
    for key, tensor in theirs.items():
        assert ours[key] is not None and tensor is not None, f"{what}: {key} is missing"
        assert ours[key].shape == tensor.shape, f"{what}: {key} {tuple(ours[key].shape)} vs {tuple(tensor.shape)}"
        assert_close(ours[key], tensor, rel=rel)


def check_against_peft(model_id: str, method: str, config: dict, directory, same_init: bool = True,
                       rel: float = 1e-5) -> list[str]:
    """One adapter config on a CUSTOM_MODELS model, peft_edu beside PEFT: the same initial tensors (``same_init``) and
    start; PEFT's random adapter saved and loaded by peft_edu gives the same outputs and gradients; peft_edu's file
    loaded by PEFT gives the same outputs; merge, unmerge (back to W₀), merge_and_unload and disable_adapter agree,
    or both refuse to merge. Raises AssertionError at the first difference; returns the checks done."""
    directory, X = Path(directory), CUSTOM_INPUT
    base = build_custom(model_id)
    done = []
    ours, theirs = make_pair(base, method, **config)
    if same_init:
        assert_same_tensors(file_tensors(ours), file_tensors(theirs), rel=0, what="initial adapter")
        done.append("init")
    assert_close(forward_custom(ours, X), forward_custom(theirs, X), rel=rel)
    random_adapter(theirs)
    theirs.save_pretrained(directory / "peft")
    ours = peft_edu.load_adapter(copy.deepcopy(base), directory / "peft", is_trainable=True)
    assert_same_tensors(file_tensors(ours), file_tensors(theirs), rel=0, what="PEFT's file loaded by peft_edu")
    expected = forward_custom(theirs, X)
    assert not torch.allclose(expected, forward_custom(base, X), atol=1e-4), "the adapter changes nothing"
    assert_close(forward_custom(ours, X), expected, rel=rel)
    done.append("PEFT file -> peft_edu")
    out_ours, grads_ours = custom_run(ours, X)
    out_theirs, grads_theirs = custom_run(theirs, X)
    assert_close(out_ours, out_theirs, rel=rel)
    assert_same_tensors(grads_ours, grads_theirs, rel=rel, what="gradients")
    assert all(g.abs().sum() > 0 for g in grads_theirs.values()), "a zero gradient would prove nothing"
    done.append("gradients")
    peft_edu.save_adapter(ours, directory / "ours")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory / "ours").eval()
    assert_close(forward_custom(reloaded, X), expected, rel=rel)
    done.append("peft_edu file -> PEFT")
    done.append(_check_merge(ours, theirs, base, X, expected, rel))
    with peft_edu.disable_adapter(ours), theirs.disable_adapter():
        assert_close(forward_custom(ours, X), forward_custom(base, X), rel=0)
        assert_close(forward_custom(theirs, X), forward_custom(base, X), rel=0)
    done.append("disable_adapter")
    return done


def forward_custom(model, X):
    """The output in eval mode (a layer added to an eval-mode model, e.g. LoRA's dropout, starts in train mode)."""
    model.eval()
    with torch.no_grad():
        return model(X)


def _check_merge(ours, theirs, base, X, expected, rel) -> str:
    try:
        theirs.merge_adapter()
    except (NotImplementedError, ValueError) as refusal:
        try:
            peft_edu.merge(ours)
        except type(refusal):
            return "merge refused by both"
        raise AssertionError(f"PEFT refuses to merge ({refusal}), peft_edu merged")
    assert_close(forward_custom(theirs, X), expected, rel=rel)
    theirs.unmerge_adapter()
    peft_edu.merge(ours, safe_merge=True)
    assert_close(forward_custom(ours, X), expected, rel=rel)
    peft_edu.unmerge(ours)
    assert_close(forward_custom(ours, X), expected, rel=rel)
    assert_base_restored(ours, base)
    plain_ours, plain_theirs = peft_edu.merge_and_unload(copy.deepcopy(ours)), copy.deepcopy(theirs).merge_and_unload()
    assert set(plain_ours.state_dict()) == set(base.state_dict())
    assert_close(forward_custom(plain_ours, X), forward_custom(plain_theirs, X), rel=rel)
    assert_close(forward_custom(plain_ours, X), expected, rel=rel)
    return "merge, unmerge, merge_and_unload"


def check_mha_against_peft(config: dict, directory) -> list[str]:
    """``check_against_peft`` for the MHA model, where PEFT 0.21.2 adds out_proj's LoRA update twice
    (W_out + 2s·B′A′: its MultiheadAttention.merge adds it by hand and again through out_proj.merge; huggingface/peft
    PR #3774). Pinned instead: peft_edu computes the base model with every update added once by hand, PEFT the same
    with out_proj's added twice, and they agree once PEFT's B′ is halved (gradients too, but for A′'s: PEFT's second
    copy is added to .data, outside autograd, so its A′ gets half of peft_edu's); files travel both ways unchanged;
    merging and disabling behave as for every other layer."""
    directory, X = Path(directory), CUSTOM_INPUT
    base = build_custom("MHA")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**copy.deepcopy(config)))
    random_adapter(theirs)
    theirs.save_pretrained(directory / "peft")
    ours = peft_edu.load_adapter(copy.deepcopy(base), directory / "peft", is_trainable=True)
    tensors = file_tensors(theirs)
    assert_same_tensors(file_tensors(ours), tensors, rel=0, what="PEFT's file loaded by peft_edu")
    scaling = ours.mha.scaling

    def by_hand(out_proj_times: int) -> torch.Tensor:
        merged = copy.deepcopy(base)
        weights = {"mha": merged.mha.in_proj_weight, "mha.base_layer.out_proj": merged.mha.out_proj.weight}
        with torch.no_grad():
            for key in tensors:
                if key.endswith(".lora_A.weight"):
                    name = key.removeprefix(PEFT_KEY_PREFIX).removesuffix(".lora_A.weight")
                    delta = scaling * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
                    target = weights[name] if name in weights else merged.get_submodule(name).weight
                    target.add_((out_proj_times if name.endswith("out_proj") else 1) * delta)
        return forward_custom(merged, X)

    expected = by_hand(1)
    assert not torch.allclose(expected, forward_custom(base, X), atol=1e-4), "the adapter changes nothing"
    assert_close(forward_custom(ours, X), expected)
    assert_close(forward_custom(theirs, X), by_hand(2))
    done = ["PEFT file -> peft_edu: W + ΔW (PEFT: W_out + 2ΔW_out)"]
    halved = copy.deepcopy(theirs)
    out_proj_B = "base_model.model.mha.base_layer.out_proj.lora_B.weight"
    with torch.no_grad():
        trainable_by_file_key(halved)[out_proj_B].mul_(0.5)
    out_ours, grads_ours = custom_run(ours, X)
    out_halved, grads_halved = custom_run(halved, X)
    assert_close(out_ours, out_halved)
    out_proj_A = out_proj_B.replace("lora_B", "lora_A")
    grads_halved[out_proj_A] = grads_halved[out_proj_A] * 2
    assert_same_tensors(grads_ours, grads_halved, what="gradients")
    assert all(g.abs().sum() > 0 for g in grads_ours.values())
    done.append("gradients (PEFT with B′ halved; its A′ gradient doubled)")
    peft_edu.save_adapter(ours, directory / "ours")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory / "ours")
    assert_same_tensors(file_tensors(reloaded), tensors, rel=0, what="peft_edu's file loaded by PEFT")
    assert_close(forward_custom(reloaded, X), by_hand(2))
    done.append("peft_edu file -> PEFT")
    peft_edu.merge(ours, safe_merge=True)
    assert_close(forward_custom(ours, X), expected)
    peft_edu.unmerge(ours)
    assert_close(forward_custom(ours, X), expected)
    assert_base_restored(ours, base)
    assert_close(forward_custom(peft_edu.merge_and_unload(copy.deepcopy(ours)), X), expected)
    done.append("merge, unmerge, merge_and_unload")
    with peft_edu.disable_adapter(ours):
        assert_close(forward_custom(ours, X), forward_custom(base, X), rel=0)
    done.append("disable_adapter")
    return done
