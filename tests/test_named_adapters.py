"""Named adapters and mixed-adapter batches, against PEFT 0.21.2: add_adapter / set_adapter / delete_adapter, the
files of several adapters (PEFT's layout: "default" at the top, the others in a folder each), and
``model(x, adapter_names=[...])`` / ``generate(..., adapter_names=[...])``; then the errors."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import peft_edu
from peft_edu.assets import load_causal_lm
from peft_edu.mixed_batch import MixedBatchLora
from parity import (assert_close, assert_same_report, assert_same_run, build_batch, build_tiny, forward,
                    has_adapter_parts, tiny_llama_for_4bit, trainable)

pytestmark = [pytest.mark.usefixtures("one_thread_for_tiny_models"),
              # PEFT warns that SECOND's lora_bias cannot be merged into Llama's bias-free layers (none is merged)
              pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")]

# Two adapters that differ in rank, targets, scaling and B's bias; init_lora_weights=False draws A and B at random
# (the same in both libraries from the same seed), so that every adapter changes the output.
FIRST = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
SECOND = dict(r=2, lora_alpha=3, target_modules=["k_proj", "v_proj", "down_proj"], init_lora_weights=False,
              lora_bias=True, use_rslora=True)
ROWS = ["default", "second", "__base__"]


def two_adapters(base, first=FIRST, second=SECOND, method="LoraConfig"):
    """(peft_edu model, PEFT model) in eval mode, each with adapter "default" (``first``) and "second" next to it."""
    models = []
    for library, wrap in ((peft_edu, peft_edu.get_peft_model), (peft, peft.get_peft_model)):
        torch.manual_seed(1)
        model = wrap(copy.deepcopy(base), getattr(library, method)(**first))
        torch.manual_seed(2)
        config = getattr(library, method)(**second)
        peft_edu.add_adapter(model, "second", config) if library is peft_edu else model.add_adapter("second", config)
        models.append(model.eval())
    return tuple(models)


def peft_names(adapter):
    """PEFT's trainable tensors of ``adapter`` under peft_edu's names."""
    def named(model):
        return {n.removeprefix("base_model.model.").replace(f".{adapter}.", ".").removesuffix(f".{adapter}"): p
                for n, p in trainable(model).items()}
    return named


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


# --- named adapters ---------------------------------------------------------------------------------------------
def test_switching_adapters_matches_peft(capsys):
    base, batch = build_tiny("llama"), build_batch("llama")
    ours, theirs = two_adapters(base)
    assert peft_edu.list_adapters(ours) == ["default", "second"] and peft_edu.active_adapter(ours) == "default"
    assert_same_report(ours, theirs, capsys)  # "all params" counts the parked adapter too, as PEFT's
    assert_close(forward(ours, batch), forward(theirs, batch))
    for adapter in ("second", "default", "second"):
        peft_edu.set_adapter(ours, adapter)
        theirs.set_adapter(adapter)
        assert peft_edu.active_adapter(ours) == theirs.active_adapter == adapter
        assert_same_report(ours, theirs, capsys)
        ours.train(), theirs.train()
        assert_same_run(ours, theirs, batch, base=base, named_theirs=peft_names(adapter))  # output, loss, gradients
    with peft_edu.disable_adapter(ours), theirs.disable_adapter():
        assert torch.equal(forward(ours, batch), forward(base, batch))
        assert_close(forward(theirs, batch), forward(base, batch))


def test_dora_and_ia3_adapters_switch_too():
    base, batch = build_tiny("llama"), build_batch("llama")
    ours, theirs = two_adapters(base, second={**SECOND, "lora_bias": False, "use_dora": True})
    for adapter in ("second", "default"):
        peft_edu.set_adapter(ours, adapter), theirs.set_adapter(adapter)
        assert_close(forward(ours, batch), forward(theirs, batch))
    # init_ia3_weights=False: random vectors, drawn alike by both libraries
    ia3 = dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    ours, theirs = two_adapters(base, first=ia3, second={**ia3, "target_modules": ["v_proj", "down_proj"]},
                                method="IA3Config")
    for adapter in ("second", "default"):
        peft_edu.set_adapter(ours, adapter), theirs.set_adapter(adapter)
        assert_close(forward(ours, batch), forward(theirs, batch))


def test_each_adapter_trains_its_own_copy_of_the_head(capsys):
    base, batch = build_tiny("llama_cls"), build_batch("llama_cls")
    cls = dict(task_type="SEQ_CLS")
    ours, theirs = two_adapters(base, first={**FIRST, **cls}, second={**SECOND, **cls})
    assert_same_report(ours, theirs, capsys)
    for adapter in ("second", "default"):
        peft_edu.set_adapter(ours, adapter), theirs.set_adapter(adapter)
        ours.train(), theirs.train()
        assert_same_run(ours, theirs, batch, base=base, named_theirs=peft_names(adapter))  # the head's gradients too
    with pytest.raises(ValueError, match=r"score is a TrainedCopy.*set_adapter"):  # PEFT batches heads; not here
        ours.eval()(**inputs(batch), adapter_names=ROWS)

def test_delete_adapter_and_unload():
    base, batch = build_tiny("llama"), build_batch("llama")
    ours, theirs = two_adapters(base)
    peft_edu.delete_adapter(ours, "second")
    theirs.delete_adapter("second")
    assert peft_edu.list_adapters(ours) == ["default"] == list(theirs.peft_config)
    assert_close(forward(ours, batch), forward(theirs, batch))
    peft_edu.add_adapter(ours, "second", peft_edu.LoraConfig(**SECOND))  # the name is free again
    model = peft_edu.unload(ours)
    assert not has_adapter_parts(model) and "generate" not in vars(model) and not model._forward_pre_hooks
    assert torch.equal(forward(model, batch), forward(base, batch))



def test_a_parked_adapter_follows_the_model_to_its_device():
    ours, _ = two_adapters(build_tiny("llama"))
    ours.to("meta")  # moves the modules in the model: the active adapter only
    peft_edu.set_adapter(ours, "second")
    assert {p.device.type for p in ours.parameters()} == {"meta"}


def test_a_parked_adapter_follows_the_model_to_its_dtype_in_switching_and_in_a_mixed_batch():
    base, batch = build_tiny("llama"), build_batch("llama", batch=3)
    ours, theirs = two_adapters(base)
    ours.to(torch.float64)
    theirs.to(torch.float64)  # PEFT's ModuleDicts hold every adapter in the model: all of them are cast
    with torch.no_grad():  # the parked "second" is still float32 here: the mixed batch must cast it first
        mixed = ours(**inputs(batch), adapter_names=ROWS).logits
        assert mixed.dtype == torch.float64
        assert_close(mixed, theirs(**inputs(batch), adapter_names=ROWS).logits)
    peft_edu.set_adapter(ours, "second")
    assert {p.dtype for p in ours.parameters()} == {torch.float64}
    assert {p.dtype for _, module in ours.peft_edu_parked["default"].parts for p in module.parameters()} == {
        torch.float64}

@pytest.mark.parametrize("active", ["default", "second"])
def test_files_of_several_adapters_both_ways(tmp_path, active):
    base, batch = build_tiny("llama"), build_batch("llama")
    ours, theirs = two_adapters(base)
    peft_edu.set_adapter(ours, active), theirs.set_adapter(active)
    peft_edu.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    for folder in ("ours", "theirs"):  # the same layout: "default" at the top, "second" in its own folder
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == [
            "README.md", "adapter_config.json", "adapter_model.safetensors", "second"][folder == "ours":]
    peft_loads_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    peft_loads_ours.load_adapter(tmp_path / "ours" / "second", adapter_name="second")
    ours_loads_peft = peft_edu.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    peft_edu.load_adapter(ours_loads_peft, tmp_path / "theirs" / "second", adapter_name="second")
    assert peft_edu.active_adapter(ours_loads_peft) == "default"  # loading does not switch, as in PEFT
    assert not any(p.requires_grad for p in ours_loads_peft.parameters())  # loaded for inference
    for adapter in ("default", "second"):
        for model in (ours, theirs, peft_loads_ours):
            model.set_adapter(adapter) if isinstance(model, peft.PeftModel) else peft_edu.set_adapter(model, adapter)
        peft_edu.set_adapter(ours_loads_peft, adapter, inference_mode=True)
        expected = forward(theirs, batch)
        for model in (ours, peft_loads_ours, ours_loads_peft):
            assert_close(forward(model, batch), expected)


# --- mixed-adapter batches ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [8, 1])  # 1: the one token per row of a generation step
def test_mixed_batch_forward_matches_peft(tokens):
    base, batch = build_tiny("llama"), build_batch("llama", batch=5)
    batch = {key: value[:, :tokens] for key, value in batch.items()}
    ours, theirs = two_adapters(base)
    rows = ["second", "__base__", "default", "second", "default"]
    with torch.no_grad():
        mixed = ours(**inputs(batch), adapter_names=rows).logits
        assert_close(mixed, theirs(**inputs(batch), adapter_names=rows).logits)
        with peft_edu.disable_adapter(ours):  # the same batch through the base model: the same kernels, row for row
            whole_batch_of_the_base = ours(**inputs(batch)).logits
        for i, adapter in enumerate(rows):  # each row as if its adapter were the model's only one
            alone = {k: v[i:i + 1] for k, v in inputs(batch).items()}
            if adapter == "__base__":  # zero factors add exactly nothing
                assert torch.equal(mixed[i], whole_batch_of_the_base[i])
                assert_close(mixed[i:i + 1], base(**alone).logits)  # alone: a one-row product may round otherwise
            else:
                peft_edu.set_adapter(ours, adapter)
                assert_close(mixed[i:i + 1], ours(**alone).logits)
    assert not any(isinstance(m, MixedBatchLora) for m in ours.modules())  # swapped out again after the call


def test_mixed_batch_uses_one_batched_product_per_factor(monkeypatch):
    base, batch = build_tiny("llama"), build_batch("llama", batch=4)
    ours, _ = two_adapters(base)
    calls = []
    bmm, baddbmm_ = torch.bmm, torch.Tensor.baddbmm_
    monkeypatch.setattr(torch, "bmm", lambda *args: calls.append("A") or bmm(*args))
    monkeypatch.setattr(torch.Tensor, "baddbmm_", lambda *args: calls.append("B") or baddbmm_(*args))
    with torch.no_grad():
        ours(**inputs(batch), adapter_names=["second", "default", "second", "__base__"])
    adapted_layers = 2 * len({"q_proj", "v_proj", "k_proj", "down_proj"})  # 2 decoder layers
    assert calls == ["A", "B"] * adapted_layers  # A, then B added into W₀x, for all rows at once, whatever the adapters


def test_mixed_batch_gradients_match_peft():
    """The update is added into W₀x in place; autograd still gives the trainable (active) adapter PEFT's gradients."""
    base, batch = build_tiny("llama"), build_batch("llama", batch=5)
    ours, theirs = two_adapters(base)
    rows = ["second", "__base__", "default", "second", "default"]
    ours(**inputs(batch), adapter_names=rows).logits.square().mean().backward()
    theirs(**inputs(batch), adapter_names=rows).logits.square().mean().backward()
    grads = {name: param.grad for name, param in trainable(ours).items()}
    expected = {name: param.grad for name, param in peft_names("default")(theirs).items()}
    assert grads.keys() == expected.keys() and all(grad is not None for grad in grads.values())
    for name, grad in grads.items():
        assert_close(grad, expected[name])


def test_mixed_batch_on_a_4bit_base_equals_each_adapter_alone():
    """On peft_edu's NF4 layers (QLoRA) too, every row gets its own adapter's output, and backward runs."""
    model = peft_edu.get_peft_model(peft_edu.quantize_model(tiny_llama_for_4bit()), peft_edu.LoraConfig(**FIRST))
    peft_edu.add_adapter(model, "second", peft_edu.LoraConfig(**SECOND))
    batch = inputs(build_batch("llama", batch=3))
    mixed = model.eval()(**batch, adapter_names=ROWS).logits
    mixed.square().mean().backward()
    assert all(param.grad is not None for param in trainable(model).values())
    with torch.no_grad():
        for i, adapter in enumerate(ROWS):
            alone = {k: v[i:i + 1] for k, v in batch.items()}
            if adapter == "__base__":
                with peft_edu.disable_adapter(model):
                    assert_close(mixed[i:i + 1], model(**alone).logits)
            else:
                peft_edu.set_adapter(model, adapter)
                assert_close(mixed[i:i + 1], model(**alone).logits)


def test_mixed_batch_under_autocast_matches_peft():
    """Under bfloat16 autocast W₀x is bfloat16 and the stacked factors float32: the update is cast, as PEFT casts it."""
    base, batch = build_tiny("llama"), build_batch("llama", batch=5)
    ours, theirs = two_adapters(base)
    rows = ["second", "__base__", "default", "second", "default"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ours(**inputs(batch), adapter_names=rows).logits
        expected = theirs(**inputs(batch), adapter_names=rows).logits
        without = theirs(**inputs(batch)).logits  # every row on "default": the adapters' effect is far above bf16's
    assert mixed.dtype == expected.dtype == torch.bfloat16
    error, effect = (mixed - expected).abs().max(), (without - expected).abs().max()
    assert error < 0.05 * effect, (error, effect)


def test_mixed_batch_generate_matches_peft():
    base = build_tiny("llama")
    ours, theirs = two_adapters(base)
    prompt = build_batch("llama", batch=3)["input_ids"][:, :4]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours_tokens = ours.generate(prompt, adapter_names=ROWS, **settings)
    assert torch.equal(ours_tokens, theirs.generate(input_ids=prompt, adapter_names=ROWS, **settings))
    assert torch.equal(copy.deepcopy(ours).generate(prompt, adapter_names=ROWS, **settings), ours_tokens)
    beams = dict(settings, num_beams=2)
    assert torch.equal(ours.generate(prompt, adapter_names=ROWS, **beams),
                       theirs.generate(input_ids=prompt, adapter_names=ROWS, **beams))
    assert torch.equal(ours.generate(prompt, **settings), theirs.generate(input_ids=prompt, **settings))


@pytest.mark.slow
def test_mixed_batch_on_smollm2_matches_peft():
    tokenizer, base = load_causal_lm()
    ours, theirs = two_adapters(base.eval(), second=dict(SECOND, target_modules=["k_proj", "o_proj"]))
    for adapter in ("second", "default"):  # smaller factors: a visible change, not noise (a parked adapter is not
        peft_edu.set_adapter(ours, adapter)  # in ours.parameters(): each one is made active in turn)
        theirs.set_adapter(adapter)
        with torch.no_grad():
            for param in [*trainable(ours).values(), *trainable(theirs).values()]:
                param.mul_(0.05)
    tokenizer.padding_side = "left"
    encoded = tokenizer(["The capital of France is", "Once upon a time", "2 + 2 ="], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert_close(ours(**encoded, adapter_names=ROWS).logits, theirs(**encoded, adapter_names=ROWS).logits, rel=1e-5)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(ours.generate(**encoded, adapter_names=ROWS, **settings),
                       theirs.generate(**encoded, adapter_names=ROWS, **settings))


# --- bad input -------------------------------------------------------------------------------------------------
def assert_model_as_it_was(model, reference, batch, active="default"):
    """A failed call left the model as it was: same adapters, same active one, same output, nothing swapped in."""
    assert peft_edu.list_adapters(model)[0] == active
    assert not any(isinstance(m, MixedBatchLora) for m in model.modules())
    assert torch.equal(forward(model, batch), reference)


def test_unknown_adapter_in_a_mixed_batch_names_the_valid_ones():
    base, batch = build_tiny("llama"), build_batch("llama")
    ours, _ = two_adapters(base)
    before = forward(ours, batch)
    with pytest.raises(ValueError, match=r"\['secnd'\].*adapters are \['default', 'second'\].*'__base__'"):
        ours(**inputs(batch), adapter_names=["default", "secnd", "__base__"])
    with pytest.raises(ValueError, match=r"\['secnd'\].*adapters are"):
        ours.generate(batch["input_ids"], adapter_names=["default", "secnd", "__base__"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"names 2 rows, but the batch has 3"):
        ours(**inputs(batch), adapter_names=["default", "second"])
    with pytest.raises(TypeError, match=r"one adapter name per row"):
        ours(**inputs(batch), adapter_names="second")
    assert_model_as_it_was(ours, before, batch)


def test_mixed_batch_refuses_training_merged_and_unbatched_adapters():
    base, batch = build_tiny("llama"), build_batch("llama")
    ours, _ = two_adapters(base)
    before = forward(ours, batch)
    ours.train()
    with pytest.raises(ValueError, match=r"for inference.*model.eval\(\)"):
        ours(**inputs(batch), adapter_names=ROWS)
    ours.eval()
    peft_edu.merge(ours)
    with pytest.raises(RuntimeError, match=r"merged.*peft_edu.unmerge\(model\)"):
        ours(**inputs(batch), adapter_names=ROWS)
    peft_edu.unmerge(ours)
    peft_edu.add_adapter(ours, "dora", peft_edu.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"'dora' cannot run in a mixed batch.*DoraLinear.*set_adapter"):
        ours(**inputs(batch), adapter_names=["dora", "default", "second"])
    peft_edu.add_adapter(ours, "pissa", peft_edu.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match=r"'pissa' cannot run in a mixed batch.*PiSSA/OLoRA.*changed W₀"):
        ours(**inputs(batch), adapter_names=["pissa", "default", "second"])
    assert_close(forward(ours, batch), before)  # unmerge (and parking PiSSA) rounds W₀ + ΔW − ΔW
    assert not any(isinstance(m, MixedBatchLora) for m in ours.modules())


def test_adding_deleting_and_switching_errors_leave_the_model_unchanged(tmp_path):
    base, batch = build_tiny("llama"), build_batch("llama")
    ours, _ = two_adapters(base)
    before = forward(ours, batch)
    with pytest.raises(ValueError, match=r"already has an adapter named 'second'.*delete_adapter"):
        peft_edu.add_adapter(ours, "second", peft_edu.LoraConfig(**FIRST))
    with pytest.raises(ValueError, match=r"matches no module"):  # a config that does not fit: nothing is added
        peft_edu.add_adapter(ours, "third", peft_edu.LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match=r"'default' is the active adapter.*set_adapter\(model, 'second'\)"):
        peft_edu.delete_adapter(ours, "default")
    with pytest.raises(ValueError, match=r"no adapter named 'third'.*\['default', 'second'\]"):
        peft_edu.set_adapter(ours, "third")
    with pytest.raises(ValueError, match=r"'__base__'"):
        peft_edu.add_adapter(ours, "__base__", peft_edu.LoraConfig(**FIRST))
    assert peft_edu.list_adapters(ours) == ["default", "second"]
    assert_model_as_it_was(ours, before, batch)
    peft_edu.merge(ours)
    with pytest.raises(RuntimeError, match=r"merged.*unmerge\(model\) before you switch"):
        peft_edu.set_adapter(ours, "second")
    peft_edu.unmerge(ours)
    before = forward(ours, batch)  # unmerge rounds W₀ + ΔW − ΔW
    peft_edu.save_adapter(ours, tmp_path)
    with pytest.raises(ValueError, match=r"adapters already \(\['default', 'second'\]\); pass adapter_name="):
        peft_edu.load_adapter(ours, tmp_path)
    wider = peft_edu.get_peft_model(build_tiny("llama", hidden_size=48), peft_edu.LoraConfig(**FIRST))
    peft_edu.save_adapter(wider, tmp_path / "wider")
    with pytest.raises(ValueError, match=r"Shape mismatch"):  # another base model's file: the new adapter is deleted
        peft_edu.load_adapter(ours, tmp_path / "wider", adapter_name="wider")
    assert peft_edu.list_adapters(ours) == ["default", "second"]
    assert_model_as_it_was(ours, before, batch)
    peft_edu.delete_adapter(ours, "second")
    with pytest.raises(ValueError, match=r"only adapter: peft_edu.unload"):
        peft_edu.delete_adapter(ours, "default")


def test_a_prompt_learning_model_refuses_adapter_names_instead_of_ignoring_them():
    model = peft_edu.get_peft_model(build_tiny("llama"), peft_edu.PromptTuningConfig(num_virtual_tokens=3,
                                                                                    task_type="CAUSAL_LM")).eval()
    input_ids = torch.randint(0, 50, (2, 5))
    with pytest.raises(ValueError, match=r"cannot run in a mixed batch: .* PromptEmbedding"):
        model(input_ids=input_ids, adapter_names=["default", "__base__"])
    assert model(input_ids=input_ids).logits.shape[1] == 5 + 3   # the model still works as before
