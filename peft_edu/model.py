"""The user-facing verbs: get_peft_model, named adapters, merge/unmerge, save_adapter/load_adapter.

Unlike PEFT, ``get_peft_model`` returns the *same* model object, changed in place: its layers are
wrapped (see ``injection.py``) and its config is stored as ``model.peft_edu_config``. Nothing else
wraps the model, so ``model(**batch)``, ``model.generate(...)`` and HF ``Trainer`` work unchanged.

A model can hold several adapters under names (``add_adapter`` here; the first one is "default"): only the active
one is in the model, so every verb below sees one adapter (``named_adapters.py``; mixed batches: ``mixed_batch.py``).

Adapter files use PEFT's format: ``adapter_config.json`` plus ``adapter_model.safetensors`` whose keys
are ``base_model.model.<module name>.<tensor>``, e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapterhub import is_adapterhub_directory, read_adapterhub_directory
from .checkpointing import inputs_require_grad_under_checkpointing
from .config import CLASSIFIER_HEAD_NAMES, ConfigUnion, PeftConfig, load_config
from .injection import AdapterLayer, adapter_layers, adapter_modules, matches, train_copies_of
from .mixed_batch import accept_adapter_names
from .named_adapters import (ParkedAdapter, active_config, check_new_name, delete_adapter, put_in,
                             list_adapters, refuse_while_merged, set_adapter, set_trainable, take_out)
from .registry import method_for
from .virtual_tokens import PROMPT_EMBEDDINGS_KEY


def inject(model: nn.Module, config: PeftConfig) -> PeftConfig:
    """Add the method(s) of ``config`` to ``model`` through the registry; return the config as applied.

    A ConfigUnion hands each method its own members, in the order the union lists them (the first member of a
    method decides when that method's turn comes), and is rebuilt from what each method resolved.
    """
    if not isinstance(config, ConfigUnion):
        (resolved,) = method_for(config.peft_type).inject(model, [config], False)
        return resolved
    by_method: dict[str, list[PeftConfig]] = {}
    for member in config.configs:
        by_method.setdefault(member.peft_type, []).append(member)
    resolved_members = {}
    for peft_type, members in by_method.items():
        applied = method_for(peft_type).inject(model, members, True)
        resolved_members.update(zip(map(id, members), applied, strict=True))
    return dataclasses.replace(config, configs=[resolved_members[id(c)] for c in config.configs])


PEFT_KEY_PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names


def _key_prefix(config: PeftConfig) -> str:
    """PEFT's key prefix: ``base_model.model.`` (its tuner wraps the model), but ``base_model.`` for prompt learning,
    whose PeftModel holds the model directly (the one key ``prompt_embeddings`` has no prefix at all)."""
    return "base_model." if config.is_prompt_learning else PEFT_KEY_PREFIX


def _nothing_to_merge(config: PeftConfig, verb: str) -> None:
    if config.is_prompt_learning:
        raise TypeError(f"{config.peft_type} adds virtual tokens in front of the input and changes no weight, so there is "
                        f"nothing to {verb}. peft_edu.unload(model) takes the adapter out.")


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> nn.Module:
    """Freeze ``model``, add the method described by ``config`` (as adapter ``adapter_name``) and return the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. a transformers model), not {type(model).__name__}.")
    if not isinstance(config, PeftConfig):
        raise TypeError(f"config must be a peft_edu config such as peft_edu.LoraConfig, not {type(config).__name__}.")
    if hasattr(model, "peft_edu_config"):
        raise ValueError("This model already has a peft_edu adapter; call peft_edu.unload(model) first or load a fresh "
                         "model, or add another adapter next to it with peft_edu.add_adapter(model, name, config).")
    check_new_name(model, adapter_name)
    config = config.revalidated()  # a field changed after the config was made is checked now
    model.peft_edu_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.peft_edu_config = config
    model.peft_edu_active_adapter, model.peft_edu_parked = adapter_name, {}
    try:
        model.requires_grad_(False)
        train_copies_of(model, _modules_to_save(model, config))
        model.peft_edu_config = inject(model, config)  # what save_adapter writes: the config as applied
        model.peft_edu_checkpointing_hook = inputs_require_grad_under_checkpointing(model)
        accept_adapter_names(model)  # a prompt-learning model refuses adapter_names (mixed_batch says why)
    except Exception:
        unload(model)  # a bad config leaves the model as it was: no wrappers, same requires_grad
        raise
    return model


def _modules_to_save(model: nn.Module, config: PeftConfig) -> list[str]:
    """The user's ``modules_to_save`` plus, for SEQ_CLS, the classification head (as PEFT adds it)."""
    entries = list(config.modules_to_save or [])
    if config.task_type != "SEQ_CLS":
        return entries
    names = [n for n, _ in model.named_modules()]
    heads = [h for h in CLASSIFIER_HEAD_NAMES if any(matches([h], n) for n in names)]
    if not heads:
        raise ValueError(
            f"task_type='SEQ_CLS' trains the classification head, but {type(model).__name__} has no module named "
            f"{' or '.join(CLASSIFIER_HEAD_NAMES)}. Load the model with AutoModelForSequenceClassification."
        )
    # PEFT writes both head names into adapter_config.json; only the one this model has is required.
    return [e for e in entries if e not in CLASSIFIER_HEAD_NAMES] + heads


# --- named adapters (the others are in named_adapters.py) ------------------------------------
def add_adapter(model: nn.Module, adapter_name: str, config: PeftConfig) -> None:
    """Add a new adapter next to the model's others, as PEFT's ``add_adapter``: it starts frozen and inactive;
    ``set_adapter(model, adapter_name)`` makes it the one the model computes with (and trains)."""
    active_config(model)
    check_new_name(model, adapter_name)
    if not isinstance(config, PeftConfig):
        raise TypeError(f"config must be a peft_edu config such as peft_edu.LoraConfig, not {type(config).__name__}.")
    config = config.revalidated()
    refuse_while_merged(model, "add an adapter")
    active_parts = take_out(model)
    try:
        train_copies_of(model, _modules_to_save(model, config))
        resolved = inject(model, config)
        new_parts = take_out(model)
    except Exception:
        take_out(model)  # what the failed injection put in
        raise
    finally:
        put_in(model, active_parts)
    set_trainable(new_parts, False)
    model.peft_edu_parked[adapter_name] = ParkedAdapter(resolved, new_parts)
    accept_adapter_names(model)


# --- counting ---------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, counted exactly as PEFT's ``get_nb_trainable_parameters``: a 4-bit
    weight packed two codes to a byte (bitsandbytes' or peft_edu's ``Linear4bit``) counts two per byte."""
    counts = {}  # by identity: a parameter shared by two modules counts once (a parked adapter's base layers)
    parked = [part for adapter in getattr(model, "peft_edu_parked", {}).values() for _, part in adapter.parts]
    for module in [*model.modules(), *(m for part in parked for m in part.modules())]:
        packed = type(module).__name__ == "Linear4bit"
        for name, param in module.named_parameters(recurse=False):
            per_element = 2 if packed and name == "weight" and param.dtype == torch.uint8 else 1
            counts[id(param)] = (param.numel() * per_element, param.requires_grad)
    return sum(n for n, grad in counts.values() if grad), sum(n for n, _ in counts.values())


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line, e.g. ``trainable params: 73,728 || all params: 22,786,944 || trainable%: 0.3236``."""
    trainable, total = count_parameters(model)
    if total == 0:
        raise ValueError(f"{type(model).__name__} has no parameters, so there is no share to report.")
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


# --- merge / unmerge / unload -----------------------------------------------------------------
def merge(model: nn.Module, safe_merge: bool = False) -> None:
    """Fold every adapter into its base weight (W₀ ← W₀ + ΔW); outputs stay the same.

    Merging a merged model is an error (it would add ΔW twice); ``unmerge`` undoes it, up to rounding: W₀ + ΔW − ΔW
    is rounded twice to the weight's dtype (measured on MiniLM, ``benchmarks/merge_drift.py``: at most 3e-8 in
    float32, 2.4e-4 in float16, 2e-3 in bfloat16, about 0.25 % of the largest weight). If one layer cannot be
    merged, the layers merged before it are unmerged again, so the model is as it was. Training a merged layer
    is an error (gradients would not reach the adapter).
    """
    _nothing_to_merge(active_config(model), "merge")
    layers = adapter_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("The adapter is already merged; merging again would add ΔW twice. Call unmerge(model) first.")
    _refuse_shared_base_weights(model, layers)
    done = []
    try:
        for name, layer in layers.items():
            _merge_layer(layer, safe_merge)
            done.append(layer)
    except Exception as error:
        for layer in reversed(done):
            layer.unmerge()
        message = (f"Merging {name} failed, so nothing was merged (the {len(done)} layers merged before it were "
                   f"unmerged again): {error}")
        try:
            wrapped = type(error)(message)
        except Exception:
            wrapped = RuntimeError(message)
        raise wrapped from error


def _merge_layer(layer: AdapterLayer, safe_merge: bool) -> None:
    """``layer.merge()``; with ``safe_merge`` (PEFT's option) on a copy first: a NaN or inf in the merged weight
    (a diverged adapter, or an overflow in float16) is refused and the weight kept as it was (every weight of the
    base layer: an nn.MultiheadAttention's out_proj too)."""
    if not safe_merge:
        layer.merge()
        return
    frozen = [p.detach().clone() for p in layer.base_layer.parameters()]
    layer.merge()
    if all(torch.isfinite(p).all() for p in layer.base_layer.parameters()):
        return
    with torch.no_grad():
        for param, before in zip(layer.base_layer.parameters(), frozen):
            param.copy_(before)
    layer.merged = False
    raise ValueError("safe_merge: the merged weight has NaN or infinite values (the adapter's weights are not "
                     "finite, or W₀ + ΔW overflows its dtype); nothing of this layer was changed. Check the adapter "
                     "for a diverged training run.")


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from its base weight again (W₀ ← W₀ − ΔW)."""
    _nothing_to_merge(active_config(model), "unmerge")
    merged = [layer for layer in adapter_layers(model).values() if layer.merged]
    if not merged:
        raise RuntimeError("The adapter is not merged, so there is nothing to unmerge.")
    for layer in merged:
        layer.unmerge()


def _refuse_shared_base_weights(model: nn.Module, layers: dict) -> None:
    """A base weight that is also another module's parameter (tied input and output embeddings) would change there
    too; PEFT merges with a warning, which silently changes the input embeddings. Here it is an error."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for layer_name, layer in layers.items():
        for param in layer.base_layer.parameters(recurse=False):
            elsewhere = [n for n in names_of.get(id(param), []) if not n.startswith(layer_name + ".")]
            if elsewhere:
                raise RuntimeError(
                    f"Cannot merge into {layer_name}: its weight is shared with {elsewhere[0]} (tied weights, e.g. "
                    "tie_word_embeddings=True), so merging would change that module too. Keep the adapter unmerged, "
                    "or untie the weights before get_peft_model (give the layer its own copy of the weight).")


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every adapter and give back the plain model with the merged weights (PEFT's ``merge_and_unload``).

    Modules trained in full (the classification head, ``modules_to_save``) stay as trained. Methods that cannot be
    merged (bottleneck adapters, virtual tokens) are refused before anything changes.
    """
    merge(model, safe_merge=safe_merge)
    for name, module in list(adapter_modules(model).items()):
        module.remove_keeping_what_was_learnt(model, name)
    return _forget_adapter(model)


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """``with peft_edu.disable_adapter(model):`` the model computes as the base model (PEFT's ``disable_adapter``):
    every adapter part is taken out for the block (a merged adapter is unmerged) and put back afterwards."""
    active_config(model)
    was_merged = any(layer.merged for layer in adapter_layers(model).values())
    if was_merged:
        unmerge(model)
    parts = take_out(model)
    try:
        yield model
    finally:
        put_in(model, parts)
        if was_merged:
            merge(model)


def unload(model: nn.Module) -> nn.Module:
    """Take the adapter out (unmerging it first if needed) and give back the original model."""
    active_config(model)
    for name, module in list(adapter_modules(model).items()):
        module.remove(model, name)  # unmerges a merged layer first; a prompt encoder removes its hook too
    return _forget_adapter(model)


def _forget_adapter(model: nn.Module) -> nn.Module:
    """Once the adapter's modules are out: the base model's own requires_grad flags back, peft_edu's marks gone."""
    for name, param in model.named_parameters():
        param.requires_grad_(model.peft_edu_requires_grad.get(name, True))
    hooks = [getattr(model, "peft_edu_checkpointing_hook", None), *getattr(model, "peft_edu_adapter_names_hooks", ())]
    for hook in hooks:
        if hook is not None:
            hook.remove()
    for mark in ("peft_edu_checkpointing_hook", "peft_edu_adapter_names_hooks", "generate", "peft_edu_active_adapter",
                 "peft_edu_parked"):
        model.__dict__.pop(mark, None)
    del model.peft_edu_config, model.peft_edu_requires_grad
    return model


# --- adapter files ----------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed as in PEFT's file (without the ``base_model.model.`` prefix).

    They share storage with the model's parameters, so copying into them loads an adapter. Prompt-learning
    methods have one tensor, ``prompt_embeddings`` (the prompt encoder's output, see ``virtual_tokens.py``).
    """
    return _tensors_of(adapter_modules(model).items())


def _tensors_of(parts) -> dict[str, torch.Tensor]:
    """The file's tensors of an adapter's modules, (name in the model, module): in the model or parked."""
    state = {}
    for name, module in parts:
        state.update(module.adapter_tensors(_file_name(name)))
    return state


def _file_name(module_name: str) -> str:
    """The module's name as the base model has it: ``torch.compile`` wraps the model in an ``OptimizedModule``
    whose ``_orig_mod.`` would otherwise end up in every file key (and not load into an uncompiled model)."""
    return ".".join(part for part in module_name.split(".") if part != "_orig_mod")


def save_adapter(model: nn.Module, directory: str | Path, overwrite: bool = False) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT does, for every adapter of the model:
    "default" into ``directory``, any other into ``directory/<name>`` (PEFT's ``save_pretrained`` layout; load one
    with ``load_adapter(model, directory / name, adapter_name=name)``).

    A directory that already holds an adapter is refused unless ``overwrite=True`` (PEFT overwrites without a
    word, which can silently replace another task's adapter).

    ``peft.PeftModel.from_pretrained(base_model, directory)`` loads the result. Bottleneck adapters (which
    PEFT does not have) are written the same way with ``"peft_type": "BOTTLENECK"`` (a ConfigUnion: "UNION");
    only peft_edu reads them.
    """
    active_config(model)
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise RuntimeError("Save the adapter before merging (or unmerge(model) first): a merged W₀ is no longer the base model's.")
    directory = Path(directory)
    adapters = {model.peft_edu_active_adapter: (model.peft_edu_config, adapter_state_dict(model))}
    for name, parked in model.peft_edu_parked.items():
        adapters[name] = (parked.config, _tensors_of(parked.parts))
    folders = {name: directory if name == "default" else directory / name for name in adapters}
    for folder in folders.values():  # all refused before any is written
        existing = [name for name in (CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin") if (folder / name).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{folder} already holds an adapter ({', '.join(existing)}); pass overwrite=True to "
                                  "replace it, or save into another directory.")
    name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    for name, (config, state) in adapters.items():
        _write_adapter(folders[name], config, state, name_or_path)


def _write_adapter(directory: Path, config: PeftConfig, state: dict[str, torch.Tensor], name_or_path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    prefix = _key_prefix(config)
    tensors = {(k if k == PROMPT_EMBEDDINGS_KEY else prefix + k): v.detach().contiguous().cpu()
               for k, v in state.items()}
    saved_config = dataclasses.replace(config, base_model_name_or_path=name_or_path, inference_mode=True)
    # Both files are written next to the target first and then moved in, weights before config, the old config
    # removed first: a reader sees the old pair, the new pair, or no config (an error), never a mixed pair; a
    # failure while writing leaves the directory as it was.
    staging = Path(tempfile.mkdtemp(prefix=".peft_edu-saving-", dir=directory))
    try:
        save_file(tensors, str(staging / WEIGHTS_NAME))
        saved_config.save(staging)
        (directory / CONFIG_NAME).unlink(missing_ok=True)
        (directory / "adapter_model.bin").unlink(missing_ok=True)  # an older PEFT file would be read otherwise
        os.replace(staging / WEIGHTS_NAME, directory / WEIGHTS_NAME)
        os.replace(staging / CONFIG_NAME, directory / CONFIG_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_adapter(base_model: nn.Module, directory: str | Path, is_trainable: bool = False,
                 adapter_name: str | None = None) -> nn.Module:
    """Add the adapter saved in ``directory`` (by PEFT or peft_edu) to ``base_model`` and return it.

    To a model that has peft_edu adapters already, the adapter is added under ``adapter_name`` (required then), and
    the active adapter stays active, as PEFT's ``PeftModel.load_adapter``; ``set_adapter`` switches to it.

    As PEFT's ``PeftModel.from_pretrained``, the adapter is loaded for inference: every parameter is frozen and the
    stored config says ``inference_mode=True``. Pass ``is_trainable=True`` to train it further.

    A bottleneck adapter saved by AdapterHub (``model.save_adapter(directory, name)``) is recognised by its
    files and converted (see ``adapterhub.py``).

    Every tensor in the file must find its parameter with the same shape, and every adapter
    parameter must be in the file; otherwise the error names the module and both shapes, and the
    base model is given back unchanged.
    """
    directory = Path(directory)
    if any(p.is_meta for p in base_model.parameters()):
        raise ValueError("The base model's weights are on the meta device (no values yet), so the adapter's tensors "
                         "would be dropped; load the model with its weights first (e.g. from_pretrained without "
                         "device_map='meta' / init_empty_weights).")
    if is_adapterhub_directory(directory):
        # the conversion reads the base model's layers: with adapters in the model, read it with them taken out
        with disable_adapter(base_model) if hasattr(base_model, "peft_edu_parked") else contextlib.nullcontext():
            config, saved = read_adapterhub_directory(base_model, directory)
    else:
        config = load_config(directory)
        saved = read_weights(directory)
    not_finite = [k for k, v in saved.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not_finite:
        raise ValueError(f"The adapter in {directory} has NaN or infinite values in {len(not_finite)} tensors, e.g. "
                         f"{not_finite[:3]}: the training that produced it diverged; it would turn every output NaN.")
    if not isinstance(is_trainable, bool):
        raise TypeError(f"is_trainable={is_trainable!r}: True (train the loaded adapter) or False (inference).")
    if hasattr(base_model, "peft_edu_config"):
        _load_next_to_others(base_model, adapter_name, config, saved, is_trainable)
        return base_model
    model = get_peft_model(base_model, config.as_loaded(), adapter_name=adapter_name or "default")
    try:
        _copy_into(model, saved, config)
    except Exception:
        unload(model)
        raise
    if not is_trainable:
        model.requires_grad_(False)  # unload gives back the base model's own requires_grad flags
    model.peft_edu_config = dataclasses.replace(model.peft_edu_config, inference_mode=not is_trainable)
    return model


def _load_next_to_others(model: nn.Module, adapter_name: str | None, config: PeftConfig,
                         saved: dict[str, torch.Tensor], is_trainable: bool) -> None:
    """``load_adapter`` into a model with adapters: add it, fill it while it is active and switch back, the active
    adapter's requires_grad as it was (a file that does not fit: the new adapter is deleted again)."""
    if adapter_name is None:
        raise ValueError(f"This model has peft_edu adapters already ({list_adapters(model)}); pass adapter_name=... to "
                         "load this one next to them, or peft_edu.unload(model) first.")
    add_adapter(model, adapter_name, config.as_loaded())
    previous, requires_grad = model.peft_edu_active_adapter, [(p, p.requires_grad) for p in model.parameters()]
    set_adapter(model, adapter_name)
    try:
        _copy_into(model, saved, config)
        model.peft_edu_config = dataclasses.replace(model.peft_edu_config, inference_mode=not is_trainable)
    except Exception:
        set_adapter(model, previous)
        delete_adapter(model, adapter_name)
        raise
    finally:
        if model.peft_edu_active_adapter != previous:
            set_adapter(model, previous)
        for param, flag in requires_grad:
            param.requires_grad_(flag)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter directory: ``adapter_model.safetensors``, or PEFT's older
    ``adapter_model.bin`` (read with ``weights_only=True``: tensors only, no code), with the path in every error."""
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for truncated or garbage files
            raise ValueError(f"{path} cannot be read as safetensors ({type(error).__name__}: {error}): the file is "
                             "truncated or damaged; save the adapter again.") from None
    path = directory / "adapter_model.bin"
    if path.is_file():
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{path} cannot be read as a PyTorch state dict of tensors ({type(error).__name__}: "
                             f"{error}); save the adapter again, preferably as safetensors.") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ValueError(f"{path} does not hold a dict of tensors.")
        return tensors
    raise FileNotFoundError(f"{directory} has adapter_config.json but no weights: neither adapter_model.safetensors "
                            "nor adapter_model.bin.")


def _copy_into(model: nn.Module, saved: dict[str, torch.Tensor], config: PeftConfig) -> None:
    expected = adapter_state_dict(model)
    given = {k.removeprefix(_key_prefix(config)): v for k, v in saved.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        lines = [f"The adapter file does not fit this {type(model).__name__} with {type(config).__name__}"
                 f"(target_modules={config.target_modules!r}):"]
        if missing:
            lines.append(f"  {len(missing)} tensors missing from the file, e.g. {missing[:3]}")
        if unexpected:
            lines.append(f"  {len(unexpected)} tensors in the file have no place in the model, e.g. {unexpected[:3]}")
        lines.append("Was the adapter trained on another base model?")
        raise ValueError("\n".join(lines))
    modules = {_file_name(name): module for name, module in adapter_modules(model).items()}
    owners = sorted(modules, key=len)
    for key, target in expected.items():
        if given[key].shape != target.shape:
            # "X.query" + "lora_A.weight" -> lora_A; "X.query" + "lora_magnitude_vector" (no .weight, as PEFT)
            module = next((n for n in reversed(owners) if key.startswith(n + ".")), "prompt_encoder")
            tensor = key.removeprefix(module + ".").removesuffix(".weight")
            raise ValueError(
                f"Shape mismatch at {module}: the file has {tensor} of shape {tuple(given[key].shape)}, "
                f"the model expects {tuple(target.shape)}. The adapter was trained on another base model "
                f"or with other settings (here {config.settings_summary()})."
            )
    for name, module in modules.items():  # a prefix encoder with a prefix_projection MLP refuses the table
        module.load_adapter_tensors(name, given)
