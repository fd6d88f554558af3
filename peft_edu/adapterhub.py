"""Reading the bottleneck adapters that AdapterHub's ``adapters`` library saves, for ``peft_edu.load_adapter``.

``model.save_adapter(directory, "name")`` (adapters 1.3.0) writes:

* ``adapter_config.json``: ``{"config": {...every BnConfig field...}, "name", "model_type", "model_class",
  "model_name", "hidden_size", "version"}``; a ``ConfigUnion`` is ``{"architecture": "union", "configs": [...]}``.
  Same file name as PEFT's, but no ``peft_type``: that is how ``load_adapter`` tells the two apart.
* the weights, ``pytorch_adapter.bin`` (``torch.save``) or, with ``use_safetensors=True``, ``adapter.safetensors``,
  under the model's own parameter names: ``<layers>.<i>.attention.output.adapters.<name>.adapter_down.0.weight``
  and ``<layers>.<i>.output.adapters.<name>.adapter_up.bias`` (BERT), ``<layers>.<i>.attention_adapters.adapters.
  <name>...`` and ``<layers>.<i>.output_adapters.adapters.<name>...`` (Llama). ``adapter_down.0`` is the down
  projection inside AdapterHub's ``nn.Sequential(Linear, activation)``; ours is ``adapter_down``.
* for a model with a fixed head (``BertForSequenceClassification``, ``LlamaForCausalLM``) also
  ``head_config.json`` and ``pytorch_model_head.bin`` / ``model_head.safetensors``: every parameter outside the
  base model (``classifier.*``, ``score.weight``, ``lm_head.weight``).

* a prefix tuning (alone, or in a union such as ``MAMConfig``): its module ``wte`` + ``control_trans`` (the MLP) or,
  with ``flat=True``, the table ``control_trans``, under ``...prefix_tuning.pool.prefix_tunings.<name>.self_prefix.``
  (once per layer, all the same tensors). It is read as its output P, the form PEFT's files store, and loaded as a
  member of a ConfigUnion, whose prefix is placed as AdapterHub places it (``prefix_tuning.py``).

The conversion maps each adapter to the site with the same layer index and location (so an adapter saved from
``BertForSequenceClassification`` loads into ``BertModel`` too), and the head as PEFT would hold it: a
classification head (``classifier``, ``score``) becomes ``task_type="SEQ_CLS"`` (trained, like AdapterHub's),
another head (``lm_head``) is loaded as ``modules_to_save`` only if it differs from the base model's.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .bottleneck import BnConfig, find_sites
from .config import CLASSIFIER_HEAD_NAMES, ConfigUnion, PeftConfig
from .prefix_tuning import PrefixTuningConfig
from .virtual_tokens import PROMPT_EMBEDDINGS_KEY

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_WEIGHTS_NAMES = ("model_head.safetensors", "pytorch_model_head.bin")

# AdapterHub options peft_edu does not implement: accepted at their off value only.
_OFF = {"phm_layer": False, "use_gating": False, "inv_adapter": None, "cross_adapter": False, "stochastic_depth": 0.0}
# Options that only matter when one of the options above is on.
_INERT = {"phm_dim", "factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule", "phm_c_init",
          "phm_init_range", "learn_phm", "hypercomplex_nonlinearity", "phm_rank", "phm_bias",
          "inv_adapter_reduction_factor", "architecture"}

_KEY = re.compile(r"(?:^|.*\.)(?P<layer>\d+)\.(?P<path>attention\.output\.adapters|output\.adapters|"
                  r"attention_adapters\.adapters|output_adapters\.adapters)\.(?P<name>[^.]+)\."
                  r"(?P<proj>adapter_down\.[01]|adapter_up|adapter_norm_before|adapter_norm_after)\.(?P<kind>weight|bias)$")


# The prefix module sits in a pool that every layer references: the same tensors under several names.
_PREFIX_KEY = re.compile(r"(?:^|.*\.)prefix_tuning\.(?:pool\.)?prefix_tunings\.(?P<name>[^.]+)\.(?P<location>[^.]+)\."
                         r"(?P<param>wte\.weight|control_trans|control_trans\.[02]\.(?:weight|bias))$")


def _prefix_tensors(weights: dict[str, torch.Tensor], name: str | None) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        match = _PREFIX_KEY.fullmatch(key)
        if match is None:
            continue
        if match["location"] not in ("self_prefix", "self"):
            raise ValueError(f"The AdapterHub file has a prefix at {match['location']!r} ({key!r}); peft_edu places a "
                             "prefix in the self-attention of an encoder-only or decoder-only model.")
        if name and match["name"] != name:
            raise ValueError(f"The AdapterHub file has a prefix of the adapter {match['name']!r}, its config names "
                             f"{name!r}: {key!r}.")
        if match["param"] in found and not torch.equal(found[match["param"]], tensor):
            raise ValueError(f"The AdapterHub file holds two different prefixes ({key!r}); peft_edu expects one.")
        found[match["param"]] = tensor
    if not found:
        raise ValueError("The AdapterHub config has a prefix tuning, but its file holds no prefix tensors.")
    return found


def is_adapterhub_directory(directory: str | Path) -> bool:
    """True for a directory AdapterHub's ``save_adapter`` wrote: its weight file, or its config layout."""
    directory = Path(directory)
    if any((directory / name).is_file() for name in WEIGHTS_NAMES):
        return True
    path = directory / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # not AdapterHub's; load_config then says what is wrong with the file
    return isinstance(d, dict) and "peft_type" not in d and "config" in d and "model_type" in d


def config_from_adapterhub_dict(d: dict, **fields) -> PeftConfig:
    """Our config from AdapterHub's ``config`` entry (a BnConfig's fields, or a union of them)."""
    if not isinstance(d, dict):
        raise ValueError(f"AdapterHub's adapter_config.json has config={d!r}; expected the adapter's fields.")
    architecture = d.get("architecture")
    if architecture == "union":
        members = [_prefix_config(c, fields.get("task_type")) if c.get("architecture") == "prefix_tuning"
                   else config_from_adapterhub_dict(c) for c in d["configs"]]
        return ConfigUnion(*members, **fields)
    if architecture == "prefix_tuning":  # a union of one: placed as AdapterHub places it (see _prefix_config)
        return ConfigUnion(_prefix_config(d, fields.get("task_type")), **fields)
    if architecture not in (None, "bottleneck"):
        raise ValueError(f"This AdapterHub adapter is a {architecture!r} adapter; peft_edu reads AdapterHub's "
                         "bottleneck adapters (BnConfig, SeqBnConfig, DoubleSeqBnConfig, ParBnConfig), and unions of "
                         "them with one prefix tuning (MAMConfig).")
    known = {f.name for f in dataclasses.fields(BnConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    kwargs, unsupported = {}, []
    for key, value in d.items():
        if key in known:
            kwargs[key] = value
        elif key in _OFF:
            if value != _OFF[key]:
                unsupported.append(f"{key}={value!r}")
        elif key not in _INERT:
            unsupported.append(f"{key}={value!r}")
    if unsupported:
        raise ValueError(f"The AdapterHub adapter uses options peft_edu does not implement: {', '.join(unsupported)}.")
    return BnConfig(**kwargs, **fields)


def _prefix_config(d: dict, task_type: str | None = None) -> PrefixTuningConfig:
    """AdapterHub's PrefixTuningConfig as ours, always as a member of a ConfigUnion: AdapterHub leaves the positions
    of the real tokens as they are, as peft_edu does for a prefix in a union (a PrefixTuningConfig alone follows
    PEFT, which shifts them by n, and would not give AdapterHub's outputs)."""
    off = {"dropout": 0.0, "use_gating": False, "leave_out": []}
    unsupported = [f"{k}={d.get(k)!r}" for k, v in off.items() if d.get(k, v) != v]
    if not d.get("flat", False) and d.get("non_linearity", "tanh").lower() != "tanh":
        unsupported.append(f"non_linearity={d['non_linearity']!r}")
    known = {"architecture", "prefix_length", "flat", "bottleneck_size", "non_linearity", "encoder_prefix",
             "cross_prefix", "shared_gating", "init_weights_seed", *off}
    unsupported += [f"{k}={v!r}" for k, v in d.items() if k not in known]
    if unsupported:
        raise ValueError(f"The AdapterHub prefix tuning uses options peft_edu does not implement: {', '.join(unsupported)} "
                         "(peft_edu's prefix has no dropout, gating or left-out layers, and its MLP uses tanh).")
    return PrefixTuningConfig(num_virtual_tokens=d["prefix_length"], prefix_projection=not d.get("flat", False),
                              encoder_hidden_size=None if d.get("flat", False) else d.get("bottleneck_size"),
                              task_type=task_type)


def _prefix_table(tensors: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """P, shape (n, 2·L·d_kv), from AdapterHub's prefix module: its flat table, or its MLP applied to its embedding
    (AdapterHub's ``eject``); the same layout as PEFT's ``prompt_embeddings``."""
    if "control_trans" in tensors:  # flat=True
        return tensors["control_trans"].view(length, -1)
    hidden = torch.tanh(tensors["wte.weight"] @ tensors["control_trans.0.weight"].T + tensors["control_trans.0.bias"])
    return hidden @ tensors["control_trans.2.weight"].T + tensors["control_trans.2.bias"]


def _load_tensors(directory: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
    for name in names:
        path = directory / name
        if path.is_file():
            try:
                tensors = (load_file(str(path)) if name.endswith(".safetensors")
                           else torch.load(path, map_location="cpu", weights_only=True))
            except Exception as error:  # truncated or garbage files: the library's own error types
                raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error}): the file is truncated "
                                 "or damaged; save the adapter again.") from None
            if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
                raise ValueError(f"{path} does not hold a dict of tensors.")
            return tensors
    return None


def _head(base_model: nn.Module, head: dict[str, torch.Tensor], directory: Path) -> tuple[str | None, list[str] | None, dict]:
    """(task_type, modules_to_save, tensors) for the head file's parameters, as PEFT would hold them."""
    state = base_model.state_dict()
    modules = sorted({key.rsplit(".", 1)[0] for key in head})
    absent = [key for key in head if key not in state]
    if absent:
        model_class = json.loads((directory / "head_config.json").read_text()).get("model_class") \
            if (directory / "head_config.json").is_file() else "another model class"
        raise ValueError(f"The AdapterHub directory {directory} holds a prediction head ({absent[:3]}) that "
                         f"{type(base_model).__name__} does not have; it was saved from {model_class}: load it "
                         f"into that model class.")
    for key, tensor in head.items():
        if tensor.shape != state[key].shape:
            module = key.rsplit(".", 1)[0]
            raise ValueError(f"Shape mismatch at the head {module}: the AdapterHub file has {key.rsplit('.', 1)[1]} of "
                             f"shape {tuple(tensor.shape)}, the model expects {tuple(state[key].shape)} (another "
                             f"number of labels?).")
    task_type, to_save, tensors = None, [], {}
    for module in modules:
        keys = [k for k in head if k.rsplit(".", 1)[0] == module]
        if module.rsplit(".", 1)[-1] in CLASSIFIER_HEAD_NAMES:
            task_type = "SEQ_CLS"  # AdapterHub trains the classification head next to the adapter
        elif all(torch.equal(head[k], state[k].to(head[k].dtype)) for k in keys):
            continue  # the pretrained head (e.g. lm_head), unchanged
        else:
            to_save.append(module)
        tensors.update({k: head[k] for k in keys})
    return task_type, (to_save or None), tensors


def read_adapterhub_directory(base_model: nn.Module, directory: str | Path) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """(config, tensors under our names) for the AdapterHub adapter in ``directory``, checked against ``base_model``."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: AdapterHub writes it next to its weights.")
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}); save the adapter again.") from None
    weights = _load_tensors(directory, WEIGHTS_NAMES)
    if weights is None:
        raise FileNotFoundError(f"{directory} has AdapterHub's {CONFIG_NAME} but neither of its weight files "
                                f"{WEIGHTS_NAMES}.")
    model_config = getattr(base_model, "config", None)
    model_type = getattr(model_config, "model_type", None)
    if saved.get("model_type") and model_type and saved["model_type"] != model_type:
        raise ValueError(f"The AdapterHub adapter in {directory} was saved from a {saved['model_type']!r} model "
                         f"({saved.get('model_class')}); {type(base_model).__name__} is a {model_type!r} model.")
    hidden = getattr(model_config, "hidden_size", None)
    if saved.get("hidden_size") and hidden and saved["hidden_size"] != hidden:
        raise ValueError(f"The AdapterHub adapter in {directory} was saved from a model with hidden_size="
                         f"{saved['hidden_size']}; {type(base_model).__name__} has hidden_size={hidden}.")

    head = _load_tensors(directory, HEAD_WEIGHTS_NAMES)
    task_type, to_save, tensors = _head(base_model, head, directory) if head else (None, None, {})
    config_dict = saved.get("config")
    architectures = [c.get("architecture") for c in config_dict.get("configs", [config_dict])] \
        if isinstance(config_dict, dict) else []
    if task_type is None and "prefix_tuning" in architectures:  # a prefix needs a task type
        task_type = "CAUSAL_LM" if base_model.get_output_embeddings() is not None else "FEATURE_EXTRACTION"
    config = config_from_adapterhub_dict(config_dict, task_type=task_type, modules_to_save=to_save)

    prefix = next((c for c in getattr(config, "configs", []) if isinstance(c, PrefixTuningConfig)), None)
    if prefix is not None:
        tensors[PROMPT_EMBEDDINGS_KEY] = _prefix_table(_prefix_tensors(weights, saved.get("name")),
                                                       prefix.num_virtual_tokens)
        weights = {k: v for k, v in weights.items() if not _PREFIX_KEY.fullmatch(k)}
    sites = {(s.layer, s.adapterhub_path): s for s in find_sites(base_model)}
    name = saved.get("name")
    # AdapterHub's adapter_down is nn.Sequential([LayerNorm,] Linear, activation): with ln_before its Linear is
    # adapter_down.1 and adapter_down.0 is the LayerNorm, saved a second time as adapter_norm_before.
    with_norm_before = {key.rsplit(".adapter_down.1.", 1)[0] for key in weights if ".adapter_down.1." in key}
    for key, tensor in weights.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"The AdapterHub file in {directory} has a tensor peft_edu cannot place: {key!r} "
                             "(peft_edu reads bottleneck adapters' projections adapter_down / adapter_up and LayerNorms "
                             "adapter_norm_before / adapter_norm_after).")
        if name and match["name"] != name:
            raise ValueError(f"The AdapterHub file has tensors of the adapter {match['name']!r}, its config names "
                             f"{name!r}: {key!r}.")
        site = sites.get((int(match["layer"]), match["path"]))
        if site is None:
            raise ValueError(f"The AdapterHub file has an adapter for layer {match['layer']} at "
                             f"{match['path'].removesuffix('.adapters')}, which {type(base_model).__name__} does not "
                             f"have ({key!r}).")
        proj = match["proj"]
        if proj == "adapter_down.0" and key.rsplit(".adapter_down.0.", 1)[0] in with_norm_before:
            twin = key.replace(".adapter_down.0.", ".adapter_norm_before.")
            if twin not in weights or not torch.equal(weights[twin], tensor):
                raise ValueError(f"The AdapterHub file's {key!r} should be the LayerNorm also saved as {twin!r}.")
            continue
        proj = "adapter_down" if proj.startswith("adapter_down.") else proj
        tensors[f"{site.module}.{proj}.{match['kind']}"] = tensor
    return config, tensors
