r"""Pictures of where each method of the course acts, drawn by code (matplotlib only).

* ``where_it_sits(method)`` draws one transformer block (embeddings, multi-head attention with W_q, W_k,
  W_v, W_o, add & norm, the feed-forward network W_up → activation → W_down, add & norm) and colours
  what the method adds or trains, with numbered notes saying what each coloured part computes.
* ``method_map(trainable_percent)`` puts every method of the course on one picture: where in the
  model it acts (the input, the attention, the feed-forward network) and, if the caller passes the
  numbers it counted, what fraction of the model it trains.

The block is BERT's (post-norm: "add & norm" after each sublayer), the layout of the course's encoder;
a Llama block (SmolLM2) normalises before each sublayer instead, and every method acts at the same
places. Colours are the Okabe–Ito palette, distinguishable with the common colour-vision deficiencies;
coloured parts are also drawn with a thick outline, so the picture does not rely on colour alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyBboxPatch

__all__ = ["METHOD_NAMES", "method_map", "where_it_sits"]

# --- colours (Okabe & Ito, "Color Universal Design") ----------------------------------------------
FROZEN_FILL = "#EEEEEE"
FROZEN_EDGE = "#6E6E6E"
INK = "#222222"
FAMILY_COLOURS = {
    "low-rank update": "#56B4E9",  # sky blue
    "rescaling": "#009E73",        # bluish green
    "bottleneck adapter": "#E69F00",  # orange
    "virtual tokens": "#CC79A7",   # reddish purple
    "combination": "#F0E442",      # yellow
    "baseline": "#BBBBBB",
}
FONT = 8.5


# --- the methods ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Note:
    """A numbered note: ``text`` explains the components ``targets`` (each gets the note's number)."""

    text: str
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Method:
    """What ``where_it_sits`` draws for one method.

    trained: frozen components of the block whose computation the method changes with trained numbers.
    added: components the method inserts (see ADDED_COMPONENTS). relabel: component → new box text.
    notes: numbered notes, at most one per component; remark: an unnumbered paragraph after them.
    """

    name: str
    arxiv: str
    family: str
    trained: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    relabel: dict = field(default_factory=dict)
    notes: tuple[Note, ...] = ()
    remark: str = ""


PREFIX_ATTENTION = r"softmax$(Q\,[P_K;K]^\top/\sqrt{d_h})\,[P_V;V]$"
PREFIX_NOTE = Note("$P_K$, $P_V$: $n$ trained keys and values\nin every layer, in front of the real ones:\n"
                   "$K = [P_K; XW_K]$, $V = [P_V; XW_V]$.\nThe queries come from the real tokens\n"
                   "only: the virtual tokens are attended\nto, never computed.", ("prefix_kv",))
PARALLEL_NOTE = Note("Parallel adapter: reads the FFN's\ninput $x$; its output, scaled by $s$, is\n"
                     "added beside the FFN's:\n$\\mathrm{LN}(x + \\mathrm{FFN}(x) + s\\,A(x))$.",
                     ("parallel_adapter",))

METHODS: dict[str, Method] = {
    "lora": Method(
        "LoRA", "2106.09685", "low-rank update", trained=("W_q", "W_v"),
        relabel={"W_q": "$W_q + BA$", "W_v": "$W_v + BA$"},
        notes=(Note("$h = W_0x + \\frac{\\alpha}{r}BAx$: trained $B$ ($d_{out}\\times r$)\nand $A$ ($r\\times d_{in}$) "
                    "beside the frozen $W_0$.\nShown on $W_q$ and $W_v$, PEFT's default\nfor BERT; any linear layer "
                    "can be\na target. Merges: $W_0 + \\frac{\\alpha}{r}BA$.", ("W_q", "W_v")),)),
    "dora": Method(
        "DoRA", "2402.09353", "low-rank update", trained=("W_q", "W_v"),
        relabel={"W_q": "$m$ dir$(W_q{+}sBA)$", "W_v": "$m$ dir$(W_v{+}sBA)$"},
        notes=(Note("$W' = m \\odot (W_0 + sBA)\\,/\\,\\|W_0 + sBA\\|$:\nthe direction comes from LoRA's "
                    "$W_0 + sBA$,\nthe magnitude $m$ is its own trained\nvector, one number per output "
                    "feature.\nOn the same layers as LoRA; merges.", ("W_q", "W_v")),)),
    "ia3": Method(
        "IA³", "2205.05638", "rescaling", trained=("W_k", "W_v", "activation"),
        relabel={"W_k": "$l_k \\odot K$", "W_v": "$l_v \\odot V$", "activation": "$l_{ff} \\odot \\gamma(W_1x)$"},
        notes=(Note("$l_k$, $l_v$: trained vectors that rescale\nthe keys and the values, element-wise.",
                    ("W_k", "W_v")),
               Note("$l_{ff}$: rescales the FFN's activation,\nthe input of $W_2$: $W_2(l_{ff} \\odot "
                    "\\gamma(W_1x))$.\nAll start at 1; nothing is inserted,\nand all three merge into $W_k$, "
                    "$W_v$, $W_2$.", ("activation",)))),
    "houlsby": Method(
        "the Houlsby adapter", "1902.00751", "bottleneck adapter",
        added=("adapter_after_attention", "adapter_after_ffn"),
        notes=(Note("Two adapters per layer, one after each\nsublayer, before its add & norm:\n"
                    "$h \\leftarrow h + W_{up}\\,f(W_{down}h)$, a bottleneck\nof $m \\ll d$ units. "
                    "Cannot be merged.", ("adapter_after_attention", "adapter_after_ffn")),)),
    "pfeiffer": Method(
        "the Pfeiffer adapter", "2005.00247", "bottleneck adapter", added=("adapter_after_ffn",),
        notes=(Note("One adapter per layer, after the FFN\nonly: $h + W_{up}\\,f(W_{down}\\cdot)$. In "
                    "AdapterHub's\nSeqBnConfig it reads the normalised\n$\\mathrm{LN}(h + x)$, and the same "
                    "LayerNorm\nis applied again after it.", ("adapter_after_ffn",)),)),
    "parallel": Method(
        "the parallel adapter", "2110.04366", "bottleneck adapter", added=("parallel_adapter",),
        notes=(PARALLEL_NOTE,)),
    "prefix": Method(
        "prefix tuning", "2101.00190", "virtual tokens", added=("prefix_kv",),
        relabel={"attention": PREFIX_ATTENTION},
        notes=(PREFIX_NOTE,), remark="Li & Liang train $P$ through an MLP\n(a re-parameterisation) and keep only $P$."),
    "deep_prompt": Method(
        "P-tuning v2 (deep prompt tuning)", "2110.07602", "virtual tokens", added=("prefix_kv",),
        relabel={"attention": PREFIX_ATTENTION},
        notes=(PREFIX_NOTE,),
        remark="P-tuning v2 is prefix tuning (\"deep\nprompt tuning\": prompts at every layer,\nnot only at the "
               "input) for an encoder\nwith a classification head; in PEFT,\nPrefixTuningConfig. Not PEFT's\n"
               "P_TUNING, which works at the input."),
    "prompt": Method(
        "prompt tuning", "2104.08691", "virtual tokens", added=("soft_prompt",),
        notes=(Note("A soft prompt: $n$ trained vectors in\nfront of the token embeddings, $[P; E(x)]$,\n"
                    "at the input only. Deeper layers see\nthem only through attention.", ("soft_prompt",)),)),
    "p_tuning": Method(
        "P-tuning (PEFT's P_TUNING)", "2103.10385", "virtual tokens",
        added=("prompt_encoder", "encoded_prompt"),
        notes=(Note("A trained prompt encoder (an MLP, or\nan LSTM and an MLP) maps $n$ trained\nembeddings "
                    "to the virtual tokens.", ("prompt_encoder",)),
               Note("PEFT puts them in front of the token\nembeddings, at the input only (the paper\nalso "
                    "places them between the words\nof a template). Not P-tuning v2.", ("encoded_prompt",)))),
    "mam": Method(
        "the mix-and-match adapter", "2110.04366", "combination", added=("prefix_kv", "parallel_adapter"),
        relabel={"attention": PREFIX_ATTENTION},
        notes=(Note("Prefix tuning at every attention:\n$n$ trained keys and values per layer\n"
                    "(AdapterHub's default: 30).", ("prefix_kv",)), PARALLEL_NOTE)),
}
METHOD_NAMES = tuple(METHODS)


# --- the block's layout (data units; the figure keeps them square) --------------------------------
@dataclass(frozen=True)
class Box:
    label: str
    x: float
    y: float
    w: float
    h: float

    @property
    def cx(self):
        return self.x + self.w / 2

    @property
    def top(self):
        return self.y + self.h


ROW = 0.65  # height of a box
CX = 3.95  # the centre line of the block: the data flows up along it
BLOCK_COMPONENTS = {
    "embeddings": Box("token embeddings $E(x)$", 3.1, 0.3, 3.7, ROW),
    "W_q": Box("$W_q$", 0.95, 1.75, 1.9, ROW),
    "W_k": Box("$W_k$", 3.0, 1.75, 1.9, ROW),
    "W_v": Box("$W_v$", 5.05, 1.75, 1.9, ROW),
    "attention": Box("softmax$(QK^\\top/\\sqrt{d_h})\\,V$, per head", 0.95, 2.9, 6.0, ROW),
    "W_o": Box("$W_o$", CX - 0.875, 4.0, 1.75, ROW),
    "add_norm_1": Box("add & norm", 0.95, 6.2, 6.0, 0.5),
    "W_up": Box("$W_1$ (up)", CX - 1.25, 7.1, 2.5, ROW),
    "activation": Box("activation $\\gamma$", CX - 1.25, 8.2, 2.5, ROW),
    "W_down": Box("$W_2$ (down)", CX - 1.25, 9.3, 2.5, ROW),
    "add_norm_2": Box("add & norm", 0.95, 11.5, 6.0, 0.5),
}
ADDED_COMPONENTS = {
    "adapter_after_attention": Box("adapter $h + W_{up}f(W_{down}h)$", CX - 2.1, 5.1, 4.2, ROW),
    "adapter_after_ffn": Box("adapter $h + W_{up}f(W_{down}h)$", CX - 2.1, 10.4, 4.2, ROW),
    "parallel_adapter": Box("adapter\n$W_{up}f(W_{down}x)$", 5.6, 7.55, 2.5, 1.3),
    "prefix_kv": Box("$P_K$, $P_V$", 7.1, 1.75, 1.25, ROW),
    "soft_prompt": Box("soft prompt $P$", 0.25, 0.3, 2.55, ROW),
    "encoded_prompt": Box("virtual tokens", 0.25, 0.3, 2.55, ROW),
    "prompt_encoder": Box("prompt encoder\n(MLP / LSTM)", 0.25, -1.15, 2.55, 0.95),
}
FRAME = Box("", 0.25, 1.3, 8.3, 11.0)  # one transformer block, repeated L times
RESIDUAL_X = 0.6
X_LIMITS, Y_LIMITS = (0.0, 15.3), (-1.4, 13.0)
NOTES_X = 8.95


def _box(ax, name: str, box: Box, fill: str, highlighted: bool, label: str | None = None):
    patch = FancyBboxPatch((box.x, box.y), box.w, box.h, boxstyle="round,pad=0,rounding_size=0.12",
                           facecolor=fill, edgecolor=INK if highlighted else FROZEN_EDGE,
                           linewidth=2.0 if highlighted else 0.9, zorder=2, gid=name)
    ax.add_patch(patch)
    ax.text(box.cx, box.y + box.h / 2, box.label if label is None else label, ha="center", va="center",
            fontsize=FONT, color=INK, zorder=3, linespacing=1.3, gid=f"{name} label")


def _arrow(ax, start, end):
    ax.annotate("", xy=end, xytext=start, zorder=1,
                arrowprops=dict(arrowstyle="-|>", color=FROZEN_EDGE, lw=1.0, shrinkA=0, shrinkB=0, mutation_scale=9))


def _line(ax, *points):
    xs, ys = zip(*points)
    ax.plot(xs, ys, color=FROZEN_EDGE, lw=1.0, zorder=1, solid_capstyle="butt")


def _data_flow(ax, added: set[str]):
    """The arrows of one block: the residual stream on the left, the sublayers in the middle."""
    c = BLOCK_COMPONENTS
    bus = FRAME.y + 0.2  # where the block's input splits into W_q, W_k, W_v and the residual
    sources = [c["embeddings"]] + [ADDED_COMPONENTS[n] for n in ("soft_prompt", "encoded_prompt") if n in added]
    for source in sources:
        _line(ax, (source.cx, source.top), (source.cx, bus))
    _line(ax, (RESIDUAL_X, bus), (max(c["W_v"].cx, *(s.cx for s in sources)), bus))
    for name in ("W_q", "W_k", "W_v"):
        _arrow(ax, (c[name].cx, bus), (c[name].cx, c[name].y))
        _arrow(ax, (c[name].cx, c[name].top), (c[name].cx, c["attention"].y))
    if "prompt_encoder" in added:
        encoder, tokens = ADDED_COMPONENTS["prompt_encoder"], ADDED_COMPONENTS["encoded_prompt"]
        _arrow(ax, (encoder.cx, encoder.top), (tokens.cx, tokens.y))
    if "prefix_kv" in added:  # the prefix joins the keys and values inside the attention
        prefix, attention = ADDED_COMPONENTS["prefix_kv"], c["attention"]
        _line(ax, (prefix.cx, prefix.top), (prefix.cx, attention.y + ROW / 2))
        _arrow(ax, (prefix.cx, attention.y + ROW / 2), (attention.x + attention.w, attention.y + ROW / 2))
    centre = c["W_o"].cx
    _arrow(ax, (centre, c["attention"].top), (centre, c["W_o"].y))
    # After each sublayer, an adapter may sit in the slot before the add & norm (Houlsby, Pfeiffer).
    for sublayer, slot, norm in (("W_o", "adapter_after_attention", "add_norm_1"),
                                 ("W_down", "adapter_after_ffn", "add_norm_2")):
        if slot in added:
            _arrow(ax, (centre, c[sublayer].top), (centre, ADDED_COMPONENTS[slot].y))
            _arrow(ax, (centre, ADDED_COMPONENTS[slot].top), (centre, c[norm].y))
        else:
            _arrow(ax, (centre, c[sublayer].top), (centre, c[norm].y))
    ffn_input = c["add_norm_1"].top + 0.18
    _line(ax, (centre, c["add_norm_1"].top), (centre, ffn_input))
    _arrow(ax, (centre, ffn_input), (centre, c["W_up"].y))
    _arrow(ax, (centre, c["W_up"].top), (centre, c["activation"].y))
    _arrow(ax, (centre, c["activation"].top), (centre, c["W_down"].y))
    # The residual connections: the sublayer's input is added back at its add & norm.
    for start, norm in ((bus, "add_norm_1"), (ffn_input, "add_norm_2")):
        _line(ax, (RESIDUAL_X, start), (RESIDUAL_X, c[norm].y + c[norm].h / 2))
        _arrow(ax, (RESIDUAL_X, c[norm].y + c[norm].h / 2), (c[norm].x, c[norm].y + c[norm].h / 2))
    _line(ax, (RESIDUAL_X, ffn_input), (centre, ffn_input))
    if "parallel_adapter" in added:  # reads the FFN's input, adds beside the FFN's output
        adapter, norm = ADDED_COMPONENTS["parallel_adapter"], c["add_norm_2"]
        _line(ax, (centre, ffn_input), (adapter.cx, ffn_input))
        _arrow(ax, (adapter.cx, ffn_input), (adapter.cx, adapter.y))
        _arrow(ax, (adapter.cx, adapter.top), (adapter.cx, norm.y))
        ax.text(adapter.cx + 0.12, (adapter.top + norm.y) / 2, r"$\times\, s$", fontsize=FONT, va="center", color=INK)
    _arrow(ax, (centre, c["add_norm_2"].top), (centre, FRAME.top + 0.55))
    ax.text(centre + 0.15, FRAME.top + 0.35, "to the next layer", fontsize=FONT, va="center", color=INK)


def _badge(ax, x: float, y: float, number: int, colour: str):
    """A numbered circle: the same number marks a component and the note that explains it."""
    ax.add_patch(Circle((x, y), 0.21, facecolor="white", edgecolor=colour, linewidth=1.6, zorder=4))
    ax.text(x, y, str(number), ha="center", va="center", fontsize=7.5, fontweight="bold", color=INK, zorder=5)


def _notes(ax, method: Method, colour: str):
    """The numbered notes down the right-hand column, then the key (what the colours mean)."""
    ax.text(NOTES_X, FRAME.top + 0.35, f"arXiv {method.arxiv}", fontsize=FONT, color=INK, style="italic")
    y = FRAME.top
    for number, note in enumerate(method.notes, start=1):
        _badge(ax, NOTES_X + 0.2, y - 0.2, number, colour)
        ax.text(NOTES_X + 0.6, y, note.text, ha="left", va="top", fontsize=FONT, color=INK, linespacing=1.45,
                gid=f"note {number}")
        y -= 0.5 * (note.text.count("\n") + 1) + 0.45
    if method.remark:
        ax.text(NOTES_X + 0.6, y, method.remark, ha="left", va="top", fontsize=FONT, color=INK, linespacing=1.45,
                gid="remark")
    for offset, (fill, edge, words) in enumerate(((colour, INK, "added or trained by the method"),
                                                  (FROZEN_FILL, FROZEN_EDGE, "frozen, pretrained"))):
        key_y = Y_LIMITS[0] + 0.9 - 0.6 * offset
        ax.add_patch(FancyBboxPatch((NOTES_X, key_y - 0.17), 0.5, 0.34, boxstyle="round,pad=0,rounding_size=0.06",
                                    facecolor=fill, edgecolor=edge, linewidth=1.2))
        ax.text(NOTES_X + 0.7, key_y, words, va="center", fontsize=FONT, color=INK)


def where_it_sits(method: str, ax=None):
    """Draw one transformer block and where ``method`` acts in it; return the matplotlib Figure.

    method: one of ``METHOD_NAMES`` ("lora", "dora", "ia3", "houlsby", "pfeiffer", "parallel", "prefix",
    "deep_prompt", "prompt", "p_tuning", "mam"). ax: an Axes to draw into (default: a new 7.4-inch square
    figure, the size the layout and its font sizes are made for).
    Every box is a patch whose ``gid`` is its component's name (its text's gid is "<name> label"); the
    coloured ones are what the method adds or trains.
    """
    if method not in METHODS:
        raise ValueError(f"where_it_sits({method!r}): unknown method; valid names are {', '.join(METHOD_NAMES)}.")
    spec = METHODS[method]
    colour = FAMILY_COLOURS[spec.family]
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.4, 7.4))
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95)
    ax.set(xlim=X_LIMITS, ylim=Y_LIMITS, aspect="equal")
    ax.axis("off")
    ax.add_patch(FancyBboxPatch((FRAME.x, FRAME.y), FRAME.w, FRAME.h, boxstyle="round,pad=0,rounding_size=0.25",
                                facecolor="none", edgecolor=FROZEN_EDGE, linestyle=(0, (4, 3)), linewidth=0.9))
    ax.text(FRAME.x, FRAME.top + 0.35, "one block, × L layers", va="center", fontsize=FONT, color=INK)
    _data_flow(ax, set(spec.added))
    for name, box in BLOCK_COMPONENTS.items():
        trained = name in spec.trained
        _box(ax, name, box, colour if trained else FROZEN_FILL, trained, spec.relabel.get(name))
    for name in spec.added:
        _box(ax, name, ADDED_COMPONENTS[name], colour, True)
    for number, note in enumerate(spec.notes, start=1):
        for target in note.targets:
            box = BLOCK_COMPONENTS.get(target) or ADDED_COMPONENTS[target]
            _badge(ax, box.x + box.w - 0.2, box.top + 0.1, number, colour)
    _notes(ax, spec, colour)
    ax.set_title(f"Where {spec.name} acts in a transformer block", fontsize=10.5, color=INK)
    return ax.figure


# --- all methods on one picture -------------------------------------------------------------------
@dataclass(frozen=True)
class MapRow:
    """One method of the map: ``cells`` maps a place (or a tuple of adjacent places) to what is there."""

    key: str
    name: str
    family: str
    cells: dict


PLACES = ("input", "attention", "ffn")
PLACE_TITLES = {"input": "input\n(first layer only)", "attention": "attention\n(every layer)",
                "ffn": "feed-forward\n(every layer)"}
AFTER = "adapter after\nthe sublayer"
MAP_ROWS = (
    MapRow("lora", "LoRA", "low-rank update",
           {("attention", "ffn"): "$W + BA$ on any linear layer\n(the course: $W_q$, $W_v$)"}),
    MapRow("dora", "DoRA", "low-rank update",
           {("attention", "ffn"): "magnitude × direction of $W + BA$,\non any linear layer"}),
    MapRow("ia3", "IA³", "rescaling",
           {"attention": "$l_k$, $l_v$ rescale\nkeys, values", "ffn": "$l_{ff}$ rescales\nthe activation"}),
    MapRow("houlsby", "Houlsby adapter", "bottleneck adapter", {"attention": AFTER, "ffn": AFTER}),
    MapRow("pfeiffer", "Pfeiffer adapter", "bottleneck adapter", {"ffn": AFTER}),
    MapRow("parallel", "parallel adapter", "bottleneck adapter", {"ffn": "adapter beside,\nscaled by $s$"}),
    MapRow("prefix", "prefix tuning", "virtual tokens", {"attention": "$n$ trained keys\nand values"}),
    MapRow("deep_prompt", "P-tuning v2", "virtual tokens", {"attention": "deep prompts:\nprefix keys, values"}),
    MapRow("prompt", "prompt tuning", "virtual tokens", {"input": "$n$ trained\nvectors"}),
    MapRow("p_tuning", "P-tuning (PEFT)", "virtual tokens", {"input": "vectors from a\nprompt encoder"}),
    MapRow("mam", "mix-and-match", "combination", {"attention": "prefix", "ffn": "parallel adapter,\nscaled by $s$"}),
    MapRow("full", "full fine-tuning", "baseline", {PLACES: "every weight of the model"}),
)
MAP_KEYS = tuple(row.key for row in MAP_ROWS)
MAP_TOP, LABEL_LEFT = -1.1, -1.05  # data units: rows are 1 apart from y = 0 down; places are 1 wide from x = 0


def _cell(ax, row: MapRow, row_y: float, places, text: str):
    places = (places,) if isinstance(places, str) else places
    first, last = PLACES.index(places[0]), PLACES.index(places[-1])
    gid = f"cell {row.key} {'+'.join(places)}"
    ax.add_patch(FancyBboxPatch((first + 0.04, row_y - 0.4), last - first + 0.92, 0.8, gid=gid,
                                boxstyle="round,pad=0,rounding_size=0.08", facecolor=FAMILY_COLOURS[row.family],
                                edgecolor=INK, linewidth=0.8))
    ax.text((first + last + 1) / 2, row_y, text, ha="center", va="center", fontsize=7.5, color=INK, linespacing=1.25,
            gid=f"{gid} label")


def _family_key(ax, y: float):
    """The families' colours, named, in two rows under the map (drawn, not a legend: it covers nothing)."""
    families = list(dict.fromkeys(row.family for row in MAP_ROWS))
    per_row = (len(families) + 1) // 2
    for i, family in enumerate(families):
        x, row_y = LABEL_LEFT + 0.05 + 1.35 * (i % per_row), y + 0.5 * (i // per_row)
        ax.add_patch(FancyBboxPatch((x, row_y - 0.15), 0.22, 0.3, boxstyle="round,pad=0,rounding_size=0.04",
                                    facecolor=FAMILY_COLOURS[family], edgecolor=INK, linewidth=0.6))
        ax.text(x + 0.3, row_y, family, va="center", fontsize=8, color=INK)


def method_map(trainable_percent: dict | None = None, model_name: str = "the model"):
    """All methods of the course on one picture: where each acts, and (optionally) how much it trains.

    trainable_percent: method key (``MAP_KEYS``: the names of ``where_it_sits`` plus "full") → the percentage
    of the model's parameters it trains, *as counted by the caller* on ``model_name``; methods left out get
    no bar. Without it the picture has no parameter panel (this module types no number in).
    """
    unknown = sorted(set(trainable_percent or {}) - set(MAP_KEYS))
    if unknown:
        raise ValueError(f"method_map: unknown method keys {unknown}; valid keys are {', '.join(MAP_KEYS)}.")
    with_counts = bool(trainable_percent)
    n = len(MAP_ROWS)
    y_limits = (n + 1.0, MAP_TOP)  # rows go down the page; the family key sits below the last one
    fig = plt.figure(figsize=(7.4, 6.4))
    grid = fig.add_gridspec(1, 2 if with_counts else 1, width_ratios=[3.2, 1.3] if with_counts else [1], wspace=0.03)
    ax = fig.add_subplot(grid[0])
    ax.set(xlim=(LABEL_LEFT - 0.05, len(PLACES)), ylim=y_limits)
    ax.axis("off")
    for column, place in enumerate(PLACES):
        ax.text(column + 0.5, -0.68, PLACE_TITLES[place], ha="center", va="center", fontsize=8.5, fontweight="bold",
                color=INK, linespacing=1.25)
        ax.add_patch(FancyBboxPatch((column + 0.02, -0.45), 0.96, n - 0.1, boxstyle="square,pad=0",
                                    facecolor="#F5F5F5", edgecolor="none", zorder=0))
    families = []  # [family, first row, last row]: a bar in the family's colour beside its rows
    for y, row in enumerate(MAP_ROWS):
        ax.text(-0.06, y, row.name, ha="right", va="center", fontsize=8.5, color=INK)
        for places, text in row.cells.items():
            _cell(ax, row, y, places, text)
        if families and families[-1][0] == row.family:
            families[-1][2] = y
        else:
            families.append([row.family, y, y])
    for family, first, last in families:
        ax.plot([LABEL_LEFT, LABEL_LEFT], [first - 0.35, last + 0.35], color=FAMILY_COLOURS[family], lw=4,
                solid_capstyle="butt")
    _family_key(ax, n + 0.05)
    if with_counts:
        _trainable_panel(fig.add_subplot(grid[1]), trainable_percent, model_name, y_limits)
    fig.subplots_adjust(left=0.01, right=0.985, top=0.985, bottom=0.01)
    return fig


def _trainable_panel(ax, trainable_percent: dict, model_name: str, y_limits):
    values = [trainable_percent.get(row.key) for row in MAP_ROWS]
    shown = [v for v in values if v is not None]
    if any(not 0 < v <= 100 for v in shown):
        raise ValueError(f"method_map: trainable percentages must be in (0, 100], got {trainable_percent}.")
    low = 10.0 ** (math.ceil(math.log10(min(shown))) - 1)  # a decade below the smallest bar, so every bar shows
    ax.set(xscale="log", xlim=(low, 100 * 30), ylim=y_limits)
    for y, (row, value) in enumerate(zip(MAP_ROWS, values)):
        if value is None:
            ax.text(low * 1.3, y, "not built here", va="center", fontsize=7.5, color=FROZEN_EDGE, style="italic")
            continue
        ax.barh(y, value - low, left=low, height=0.55, color=FAMILY_COLOURS[row.family], edgecolor=INK, linewidth=0.6)
        ax.text(value * 1.25, y, f"{value:.2g} %" if value < 10 else f"{value:.0f} %", va="center", fontsize=7.5,
                color=INK)
    ax.text(low * 1.1, -0.68, f"trainable parameters,\n% of {model_name}", ha="left", va="center", fontsize=8.5,
            fontweight="bold", color=INK, linespacing=1.25)
    ticks = [t for t in (0.001, 0.01, 0.1, 1, 10, 100) if t >= low]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7.5)
    ax.tick_params(axis="x", pad=2)
    ax.set_yticks([])
    ax.spines["bottom"].set_bounds(low, 100)
    ax.spines["bottom"].set_position(("data", len(MAP_ROWS) - 0.45))
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
