"""The pictures of peft_edu/diagrams.py: each method highlights the parts the paper says it changes, and every
label is readable (inside the figure, inside its box, clear of the other labels), as rendered by matplotlib."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

from peft_edu import diagrams  # noqa: E402

# What each method adds or trains, from the papers (not from diagrams.py): the components the picture colours.
EXPECTED_HIGHLIGHTS = {
    "lora": {"W_q", "W_v"},  # PEFT's default targets for BERT and Llama
    "dora": {"W_q", "W_v"},
    "ia3": {"W_k", "W_v", "activation"},  # keys, values and the FFN's activation (2205.05638)
    "houlsby": {"adapter_after_attention", "adapter_after_ffn"},  # after each sublayer (1902.00751)
    "pfeiffer": {"adapter_after_ffn"},  # after the FFN only (2005.00247)
    "parallel": {"parallel_adapter"},
    "prefix": {"prefix_kv"},
    "deep_prompt": {"prefix_kv"},  # P-tuning v2 is deep prompt tuning: prefix keys and values at every layer
    "prompt": {"soft_prompt"},  # the input only (2104.08691)
    "p_tuning": {"prompt_encoder", "encoded_prompt"},  # PEFT's P_TUNING: an encoder at the input
    "mam": {"prefix_kv", "parallel_adapter"},  # prefix + parallel adapter (2110.04366)
}
ONE_PIXEL = 1.0


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _rendered(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _texts(fig):
    """Every non-empty text of the figure: titles, labels, notes, tick labels."""
    texts = list(fig.texts)
    for ax in fig.axes:
        texts += [*ax.texts, ax.title, ax._left_title, ax._right_title]
        if ax.axison:  # an axis turned off draws no ticks
            texts += [ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels()]
    texts = [t for t in texts if t.get_visible() and t.get_text().strip()]
    assert texts, "the figure has no text"
    return texts


def _inside(inner, outer, slack=ONE_PIXEL) -> bool:
    return (inner.x0 >= outer.x0 - slack and inner.y0 >= outer.y0 - slack
            and inner.x1 <= outer.x1 + slack and inner.y1 <= outer.y1 + slack)


def _assert_readable(fig):
    """Every text lies inside the figure, every box label inside its box, and no two texts overlap."""
    renderer = _rendered(fig)
    texts = _texts(fig)
    extents = {id(t): t.get_window_extent(renderer) for t in texts}
    for t in texts:
        assert _inside(extents[id(t)], fig.bbox), f"{t.get_text()!r} is cut off at the figure's edge"
    boxes = {p.get_gid(): p for p in fig.findobj(FancyBboxPatch) if p.get_gid()}
    labelled = [t for t in texts if (t.get_gid() or "").endswith(" label")]
    assert labelled, "no box labels found"
    for t in labelled:
        box = boxes[t.get_gid().removesuffix(" label")]
        assert _inside(extents[id(t)], box.get_window_extent(renderer)), \
            f"{t.get_text()!r} overflows its box {box.get_gid()!r}"
    for a, b in itertools.combinations(texts, 2):
        if extents[id(a)].overlaps(extents[id(b)]):
            raise AssertionError(f"{a.get_text()!r} and {b.get_text()!r} overlap")


def _highlighted(fig) -> set[str]:
    frozen = to_rgba(diagrams.FROZEN_FILL)
    return {p.get_gid() for p in fig.findobj(FancyBboxPatch)
            if p.get_gid() and not p.get_gid().startswith("cell") and p.get_facecolor() != frozen}


@pytest.mark.parametrize("method", diagrams.METHOD_NAMES)
def test_every_method_draws_the_whole_block_and_highlights_what_it_changes(method):
    fig = diagrams.where_it_sits(method)
    drawn = {p.get_gid() for p in fig.findobj(FancyBboxPatch) if p.get_gid()}
    assert set(diagrams.BLOCK_COMPONENTS) <= drawn, f"missing: {set(diagrams.BLOCK_COMPONENTS) - drawn}"
    assert _highlighted(fig) == EXPECTED_HIGHLIGHTS[method]


def test_every_method_of_the_module_is_checked_here():
    assert set(diagrams.METHOD_NAMES) == set(EXPECTED_HIGHLIGHTS)


@pytest.mark.parametrize("method", diagrams.METHOD_NAMES)
def test_every_label_is_inside_the_figure_inside_its_box_and_clear_of_the_others(method):
    _assert_readable(diagrams.where_it_sits(method))


def test_ia3_is_labelled_as_rescaling_keys_values_and_the_ffn_activation():
    fig = diagrams.where_it_sits("ia3")
    labels = {t.get_gid(): t.get_text() for t in _texts(fig) if t.get_gid()}
    assert "l_k" in labels["W_k label"] and "K" in labels["W_k label"]
    assert "l_v" in labels["W_v label"] and "V" in labels["W_v label"]
    assert "l_{ff}" in labels["activation label"]
    assert "insert" not in labels["W_k label"].lower()


def test_draws_into_a_given_axes():
    fig, ax = plt.subplots()
    assert diagrams.where_it_sits("lora", ax=ax) is fig
    assert {p.get_gid() for p in ax.patches if p.get_gid()} >= set(diagrams.BLOCK_COMPONENTS)


@pytest.mark.parametrize("name", ["LoRA", "qlora", "", "p-tuning"])
def test_an_unknown_method_is_an_error_that_lists_the_valid_names(name):
    with pytest.raises(ValueError) as error:
        diagrams.where_it_sits(name)
    for valid in diagrams.METHOD_NAMES:
        assert valid in str(error.value)


# --- the map of all methods ----------------------------------------------------------------------------
COUNTED = {"lora": 0.32, "dora": 0.34, "ia3": 0.071, "houlsby": 1.0, "pfeiffer": 0.5, "parallel": 3.9, "prefix": 8.5,
           "deep_prompt": 0.41, "prompt": 0.034, "mam": 21.6, "full": 100.0}


def test_the_map_has_every_method_of_the_diagrams_and_full_fine_tuning():
    assert set(diagrams.MAP_KEYS) == set(diagrams.METHOD_NAMES) | {"full"}


@pytest.mark.parametrize("counts", [None, COUNTED], ids=["without counts", "with counts"])
def test_the_map_is_readable(counts):
    _assert_readable(diagrams.method_map(counts, "all-MiniLM-L6-v2"))


def test_the_map_draws_each_given_percentage_and_no_other():
    fig = diagrams.method_map(COUNTED, "all-MiniLM-L6-v2")
    bars = [p for p in fig.axes[1].patches if isinstance(p, Rectangle) and not isinstance(p, FancyBboxPatch)]
    ends = sorted(round(b.get_x() + b.get_width(), 6) for b in bars)
    assert ends == sorted(COUNTED.values())
    assert "not built here" in [t.get_text() for t in fig.axes[1].texts]  # P-tuning has no count


@pytest.mark.parametrize("counts, message", [({"qlora": 1.0}, "unknown method keys"), ({"lora": 0.0}, "(0, 100]"),
                                             ({"lora": 140.0}, "(0, 100]")])
def test_the_map_refuses_what_it_cannot_draw(counts, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        diagrams.method_map(counts)


def test_the_colours_are_the_okabe_ito_palette_or_grey():
    """Okabe & Ito's eight colours stay distinguishable with the common colour-vision deficiencies; greys do too."""
    okabe_ito = {"#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"}
    for family, colour in diagrams.FAMILY_COLOURS.items():
        red, green, blue = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
        assert colour.upper() in okabe_ito or red == green == blue, f"{family}: {colour}"
    assert len(set(diagrams.FAMILY_COLOURS.values())) == len(diagrams.FAMILY_COLOURS)
