"""Bad input and misuse get a clear error that says what was wrong and what to do, and leave the model and every
file as they were (issue 11's list of silent or unclear behaviours, one test each)."""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file

import peft_edu
from parity import assert_unchanged, forward, randomize_trainable

pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")

LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"])


# --- config values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: peft_edu.LoraConfig(**{**LORA, "lora_alpha": math.nan}), "lora_alpha=nan: must be a positive number"),
    (lambda: peft_edu.LoraConfig(**{**LORA, "lora_alpha": math.inf}), "lora_alpha=inf: .*finite"),
    (lambda: peft_edu.LoraConfig(**LORA, use_dora="False"), "use_dora='False': must be True or False .*string"),
    (lambda: peft_edu.LoraConfig(**LORA, use_rslora=1), "use_rslora=1: must be True or False"),
    (lambda: peft_edu.LoraConfig(**LORA, modules_to_save="classifier"), r"\['classifier'\].*letter by letter"),
    (lambda: peft_edu.LoraConfig(r=4, target_modules="("), "not a valid one"),
    (lambda: peft_edu.SeqBnConfig(scaling=math.nan), "scaling=nan: must be a finite number"),
    (lambda: peft_edu.SeqBnConfig(reduction_factor=math.inf), "reduction_factor=inf"),
    (lambda: peft_edu.LoraConfig(**LORA, inference_mode="yes"), "inference_mode='yes'"),
    (lambda: peft_edu.LoraConfig(**LORA, lora_dropout=False), "lora_dropout=False: must be a probability"),
    (lambda: peft_edu.LoraConfig(**LORA, base_model_name_or_path=3), "base_model_name_or_path=3"),
    (lambda: peft_edu.IA3Config(target_modules=["key"], feedforward_modules="("), "feedforward_modules='\\('.*not a valid"),
], ids=["alpha-nan", "alpha-inf", "dora-string", "rslora-int", "modules_to_save-string", "bad-regex",
        "bn-scaling-nan", "bn-reduction-inf", "inference-mode-string", "dropout-bool", "name-int", "ia3-bad-regex"])
def test_bad_config_values_are_refused_with_the_field_and_a_valid_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_public_functions_say_what_they_were_given():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module.*not str"):
        peft_edu.get_peft_model("bert-base-uncased", peft_edu.LoraConfig(**LORA))
    with pytest.raises(ValueError, match="has no parameters"):
        peft_edu.print_trainable_parameters(torch.nn.Module())


def test_a_config_edited_after_creation_is_checked_again(tiny_model, tiny_batch):
    base, batch = tiny_model("bert"), tiny_batch("bert")
    config = peft_edu.LoraConfig(**LORA)
    config.r = -1
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="r=-1"):
        peft_edu.get_peft_model(model, config)
    assert_unchanged(model, base, batch)


# --- adapter_config.json options that change what the weights mean --------------------------------------
def test_peft_adapters_whose_init_cannot_be_redone_are_refused(tiny_model, tiny_batch, tmp_path):
    """PiSSA with a randomized SVD (pissa_niter_K) subtracts A·B's start from W₀, and that start cannot be computed
    again from W₀ (PiSSA and OLoRA can: tests/test_lora_layers.py): its A, B on an unchanged W₀ would compute
    something else, so loading it is refused with PEFT's advice."""
    init = "pissa_niter_4"
    base, batch = tiny_model("bert"), tiny_batch("bert")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA, init_lora_weights=init))
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' cannot be loaded exactly.*"
                                         "path_initial_model_for_weight_conversion"):
        peft_edu.load_adapter(model, tmp_path)
    assert_unchanged(model, base, batch)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_peft_inits_that_only_draw_fresh_weights_load(tiny_model, tiny_batch, tmp_path, init):
    base, batch = tiny_model("bert"), tiny_batch("bert")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA, init_lora_weights=init))
    randomize_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    ours = peft_edu.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(forward(ours, batch), forward(theirs, batch))


# --- damaged files ----------------------------------------------------------------------------------
@pytest.fixture
def saved(tiny_model, tmp_path):
    """A LoRA adapter saved by peft_edu into tmp_path / "adapter", and the base it fits."""
    base = tiny_model("bert")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(**LORA))
    randomize_trainable(model)
    peft_edu.save_adapter(model, tmp_path / "adapter")
    return base, model, tmp_path / "adapter"


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:100]),
     "adapter_model.safetensors cannot be read as safetensors.*truncated or damaged"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 50),
     "adapter_model.safetensors cannot be read as safetensors"),
    (lambda d: (d / "adapter_config.json").write_text((d / "adapter_config.json").read_text()[:40]),
     "adapter_config.json is not valid JSON"),
    (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), "adapter_config.json holds a JSON list"),
    (lambda d: (d / "adapter_config.json").write_bytes(b"\xff\xfe\x00"), "adapter_config.json is not valid JSON"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "neither adapter_model.safetensors nor adapter_model.bin"),
], ids=["truncated-weights", "garbage-weights", "truncated-json", "json-list", "not-utf8", "no-weights"])
def test_a_damaged_adapter_directory_names_the_file_and_leaves_the_model_alone(saved, tiny_batch, damage, message):
    base, _, directory = saved
    damage(directory)
    model = copy.deepcopy(base)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        peft_edu.load_adapter(model, directory)
    assert_unchanged(model, base, tiny_batch("bert"))


def test_nan_weights_are_refused(saved, tiny_batch):
    base, model, directory = saved
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = math.nan
    peft_edu.save_adapter(model, directory, overwrite=True)
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match="NaN or infinite values in 1 tensors.*lora_B"):
        peft_edu.load_adapter(fresh, directory)
    assert_unchanged(fresh, base, tiny_batch("bert"))


def test_a_bin_only_peft_adapter_loads_as_peft_loads_it(tiny_model, tiny_batch, tmp_path):
    base, batch = tiny_model("bert"), tiny_batch("bert")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA))
    randomize_trainable(theirs)
    theirs.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    ours = peft_edu.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(forward(ours, batch), forward(theirs, batch))


def test_a_failure_while_saving_leaves_the_old_pair(saved, tiny_batch, monkeypatch):
    """New weights must never sit beside the old config (which would load silently with the old alpha)."""
    base, model, directory = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(2)

    def broken_save(self, where):
        raise OSError("disk full")

    monkeypatch.setattr(peft_edu.PeftConfig, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        peft_edu.save_adapter(model, directory, overwrite=True)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # nothing new, no staging folder left


def test_saving_writes_the_two_files_and_nothing_else(saved):
    _, _, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_saving_over_another_adapter_needs_overwrite(saved, tiny_model):
    base, model, directory = saved
    other = peft_edu.get_peft_model(tiny_model("bert"), peft_edu.IA3Config(target_modules=["key"], feedforward_modules=[]))
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(FileExistsError, match="already holds an adapter.*overwrite=True"):
        peft_edu.save_adapter(other, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    peft_edu.save_adapter(other, directory, overwrite=True)
    assert isinstance(peft_edu.load_adapter(copy.deepcopy(base), directory).peft_edu_config, peft_edu.IA3Config)


# --- merging ---------------------------------------------------------------------------------------
def test_a_merge_that_fails_half_way_merges_nothing(tiny_model, tiny_batch):
    base, batch = tiny_model("bert"), tiny_batch("bert")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(**LORA, use_dora=True))
    randomize_trainable(model)
    layers = [m for m in model.modules() if isinstance(m, peft_edu.DoraLinear)]
    with torch.no_grad():
        layers[2].lora_magnitude_vector[0] = 0.0  # layer 3 of 4 cannot be merged (its row would be lost)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    expected = forward(model, batch)
    with pytest.raises(ValueError, match="nothing was merged.*2 layers merged before it were unmerged again.*zero"):
        peft_edu.merge(model)
    assert not any(layer.merged for layer in layers)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, weights[name], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(forward(model, batch), expected)
    with pytest.raises(RuntimeError, match="not merged"):
        peft_edu.unmerge(model)


@pytest.mark.parametrize("config", [peft_edu.LoraConfig(**LORA), peft_edu.LoraConfig(**LORA, use_dora=True),
                                    peft_edu.IA3Config(target_modules=["key", "value", "output.dense"],
                                                       feedforward_modules=["output.dense"])],
                         ids=["lora", "dora", "ia3"])
def test_changing_the_adapter_while_merged_cannot_corrupt_the_base_weights(tiny_model, config):
    """An optimizer step taken while merged (stale gradients) used to leave W₀ off by 0.22 after unmerge."""
    base = tiny_model("bert")
    model = peft_edu.get_peft_model(copy.deepcopy(base), config)
    randomize_trainable(model, std=0.1)
    peft_edu.merge(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3)
    peft_edu.unload(model)
    for (name, ours), theirs in zip(model.state_dict().items(), base.state_dict().values()):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4, msg=name)


def test_merging_into_a_tied_output_layer_is_refused(tiny_model, tiny_batch):
    base = tiny_model("llama", tie_word_embeddings=True)
    assert base.lm_head.weight is base.get_input_embeddings().weight
    batch = tiny_batch("llama")
    model = peft_edu.get_peft_model(copy.deepcopy(base), peft_edu.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    randomize_trainable(model)
    embeddings = model.get_input_embeddings().weight.clone()
    expected = forward(model, batch)
    with pytest.raises(RuntimeError, match="lm_head: its weight is shared with .*embed_tokens.*untie"):
        peft_edu.merge(model)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert not any(getattr(m, "merged", False) for m in model.modules())
    torch.testing.assert_close(forward(model, batch), expected)


# --- models in unusual states ---------------------------------------------------------------------
def test_loading_into_a_model_on_the_meta_device_is_refused(saved):
    _, _, directory = saved
    with torch.device("meta"):
        meta_model = type(saved[0])(saved[0].config)
    with pytest.raises(ValueError, match="meta device"):
        peft_edu.load_adapter(meta_model, directory)
    assert not hasattr(meta_model, "peft_edu_config")


def test_a_compiled_model_saves_the_base_models_names(saved, tmp_path, tiny_batch):
    base, model, directory = saved
    peft_edu.save_adapter(torch.compile(model), tmp_path / "compiled")  # compiles lazily: nothing runs here
    keys = set(load_file(tmp_path / "compiled" / "adapter_model.safetensors"))
    assert keys == set(load_file(directory / "adapter_model.safetensors"))
    assert not any("_orig_mod" in k for k in keys)
    again = peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "compiled")
    batch = tiny_batch("bert")
    torch.testing.assert_close(forward(again, batch), forward(model, batch))
    assert json.loads((tmp_path / "compiled" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("config", [peft_edu.LoraConfig(**LORA), peft_edu.LoraConfig(**LORA, use_dora=True),
                                    peft_edu.IA3Config(target_modules=["key", "value"], feedforward_modules=[])],
                         ids=["lora", "dora", "ia3"])
def test_training_a_merged_model_is_an_error_that_says_unmerge(tiny_model, tiny_batch, config):
    """Merged, gradients would reach only the head; an optimizer step then silently trains nothing of the adapter."""
    base, batch = tiny_model("bert"), tiny_batch("bert")
    model = peft_edu.get_peft_model(copy.deepcopy(base), config)
    peft_edu.merge(model)
    model.train()
    with pytest.raises(RuntimeError, match="is merged .*peft_edu.unmerge\\(model\\) before training"):
        model(**batch)
    with torch.no_grad():
        model(**batch)  # inference on the merged model is what merging is for
    model.eval()
    model(**batch)  # eval mode, gradients enabled: no training step can follow without model.train()
    peft_edu.unmerge(model)
    model.train()
    model(**batch).last_hidden_state.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_a_loaded_adapter_is_frozen_unless_is_trainable(saved, is_trainable, tiny_batch):
    """The file says inference_mode: true; as PEFT's from_pretrained, loading is for inference unless asked."""
    base, model, directory = saved
    assert json.loads((directory / "adapter_config.json").read_text())["inference_mode"] is True
    loaded = peft_edu.load_adapter(copy.deepcopy(base), directory, is_trainable=is_trainable)
    adapter = [p for n, p in loaded.named_parameters() if "lora_" in n]
    assert adapter and all(p.requires_grad is is_trainable for p in adapter)
    assert peft_edu.count_parameters(loaded)[0] == (sum(p.numel() for p in adapter) if is_trainable else 0)
    assert loaded.peft_edu_config.inference_mode is not is_trainable
    unloaded = peft_edu.unload(loaded)
    assert all(p.requires_grad for p in unloaded.parameters())  # the base model's own flags come back
    with pytest.raises(TypeError, match="is_trainable"):
        peft_edu.load_adapter(copy.deepcopy(base), directory, is_trainable="yes")
