"""Which keys each NSA branch lets a query see, at token resolution, from a real module.

`branch_masks` runs a SparseAttention's own stages on an input and returns one
(n, n) boolean mask per branch (compressed coverage, selected blocks, block-causal
diagonal, sliding window) and their union; `draw_masks` colours them in one picture;
`MaskExplorer` puts sliders on every size and redraws the same picture in place.
"""

from __future__ import annotations

import io
import warnings

import torch
from torch import Tensor

# Course dependencies: `import nsa_tutorial` never imports this module.
try:
    import ipywidgets as widgets
    import matplotlib
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
except ImportError as error:
    raise ImportError(
        f"nsa_tutorial.viz needs the course's packages ({error.name} is missing): "
        "`make lab` installs them, or pip install 'nsa-tutorial[course]'"
    ) from error

from nsa_tutorial.attention import SparseAttention
from nsa_tutorial.compress import compressed_causal_mask
from nsa_tutorial.fine_attention import fine_mask
from nsa_tutorial.selection import SELECTED_THRESHOLD
from nsa_tutorial.sliding import sliding_window_mask

BRANCHES = ("compressed", "selected", "diagonal", "sliding")
COLOURS = {
    "compressed": "#8fb8de",
    "selected": "#e58e73",
    "diagonal": "#c9a0dc",
    "sliding": "#7cc08b",
}


@torch.no_grad()
def branch_masks(model: SparseAttention, x: Tensor, head: int = 0) -> dict[str, Tensor]:
    """(n, n) masks for query head `head` of a causal `model` on x (1, n, dim): may
    query i see key j through each branch? Also "union", and "compressed_tokens",
    (n,): how many compressed tokens (memory included) each query attends."""
    n = x.shape[1]
    block, stride = model.compress_block_size, model.compress_block_sliding_stride
    q, k, v = model.project_heads(model.norm(x))
    _, (values, indices) = model.compressed_branch(q, *model.compressed_tokens(k, v))
    visible = compressed_causal_mask(n, n // stride, stride, model.num_mem_compress_kv)
    blocks = visible[:, model.num_mem_compress_kv :].float()  # (i, w)
    starts = torch.arange(n // stride) * stride + stride - block
    cover = (torch.arange(n)[None, :] >= starts[:, None]) & (
        torch.arange(n)[None, :] < starts[:, None] + block
    )  # (w, j)
    compressed = (blocks @ cover.float()) > 0
    group = model.num_grouped_queries if model.query_heads_share_selected_kv else None
    selection_head = head // model.num_grouped_queries if group else head
    size = model.selection_block_size
    own_block = torch.arange(n) // size
    if indices.shape[-1]:
        picked = values > SELECTED_THRESHOLD
        mask = fine_mask(indices, picked, seq_len=n, block_size=size, causal=False)
        selected = mask[0, selection_head]
        selected &= own_block[None, :] < own_block[:, None]
    else:
        selected = torch.zeros(n, n, dtype=torch.bool)
    positions = torch.arange(n)
    diagonal = (own_block[:, None] == own_block[None, :]) & (positions[:, None] >= positions)
    sliding = sliding_window_mask(n, model.sliding_window_size, causal=True)
    masks = {
        "compressed": compressed,
        "selected": selected,
        "diagonal": diagonal,
        "sliding": sliding,
    }
    masks["union"] = compressed | selected | diagonal | sliding
    masks["compressed_tokens"] = visible.sum(-1)
    return masks


def attended_counts(masks: dict[str, Tensor], query: int, branches=BRANCHES) -> dict[str, int]:
    """Keys (compressed tokens for the compressed branch) that `query` attends per branch."""
    counts = {}
    for branch in branches:
        if branch == "compressed":
            counts[branch] = int(masks["compressed_tokens"][query])
        else:
            counts[branch] = int(masks[branch][query].sum())
    counts["total"] = sum(counts.values())
    counts["full attention"] = query + 1
    return counts


def draw_masks(
    masks: dict[str, Tensor],
    branches=BRANCHES,
    query: int | None = None,
    figure: Figure | None = None,
) -> Figure:
    """Colour each key by the first of `branches` (in the order sliding, diagonal,
    selected, compressed) that shows it to the query; mark one query row."""
    figure = figure or Figure(figsize=(6, 5))
    figure.clear()
    ax = figure.add_subplot()
    n = masks["union"].shape[0]
    picture = torch.zeros(n, n)
    for index, branch in enumerate(BRANCHES, start=1):
        if branch in branches:
            picture = torch.where(masks[branch], float(index), picture)
    colours = ["#f4f4f4"] + [COLOURS[b] for b in BRANCHES]
    ax.imshow(
        picture.numpy(),
        cmap=ListedColormap(colours),
        vmin=0,
        vmax=len(BRANCHES),
        interpolation="nearest",
    )
    if query is not None:
        ax.axhline(query, color="black", lw=0.8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    handles = [
        matplotlib.patches.Patch(color=COLOURS[b], label=b) for b in BRANCHES if b in branches
    ]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    figure.tight_layout()
    return figure


def figure_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


class MaskExplorer:
    """Sliders for every size; one picture, redrawn in place, and the counts per branch."""

    def __init__(self, branches=BRANCHES, seed: int = 0, **start: int) -> None:
        self.branches = tuple(branches)
        self.seed = seed
        settings = {
            "seq_len": 96,
            "compress_block": 8,
            "stride": 4,
            "selection_block": 8,
            "top_n": 2,
            "window": 8,
            "query": 95,
            "head": 0,
        } | start
        slider = widgets.IntSlider
        self.controls = {
            "seq_len": slider(settings["seq_len"], min=8, max=256, description="seq len"),
            "compress_block": slider(
                settings["compress_block"], min=2, max=32, description="cmp block"
            ),
            "stride": slider(settings["stride"], min=1, max=32, description="cmp stride"),
            "selection_block": slider(
                settings["selection_block"], min=2, max=32, description="sel block"
            ),
            "top_n": slider(settings["top_n"], min=0, max=8, description="top-n"),
            "window": slider(settings["window"], min=1, max=64, description="window"),
            "query": slider(
                settings["query"], min=0, max=settings["seq_len"] - 1, description="query"
            ),
            "head": widgets.Dropdown(
                options=[0, 1, 2, 3], value=settings["head"], description="head"
            ),
        }
        self.image = widgets.Image(format="png")
        self.counts = widgets.HTML()
        self.figure = Figure(figsize=(5.5, 4.5))
        for control in self.controls.values():
            control.observe(self._update, names="value")
        controls = widgets.HBox(
            [widgets.VBox(list(self.controls.values())), widgets.VBox([self.counts])]
        )
        self.widget = _ExplorerBox(self.branches, [controls, self.image])
        self._update()

    def settings(self) -> dict[str, int]:
        return {name: control.value for name, control in self.controls.items()}

    def model(self) -> SparseAttention:
        s = self.settings()
        stride = min(s["stride"], s["compress_block"])
        torch.manual_seed(self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # top-n 0 warns
            return SparseAttention(
                dim=32,
                dim_head=8,
                heads=4,
                kv_heads=2,
                sliding_window_size=s["window"],
                compress_block_size=s["compress_block"],
                compress_block_sliding_stride=stride,
                selection_block_size=s["selection_block"],
                num_selected_blocks=s["top_n"],
                causal=True,
                interpolated_importance_score=s["selection_block"] % stride != 0,
            )

    def _update(self, change=None) -> None:
        s = self.settings()
        self.controls["query"].max = s["seq_len"] - 1
        self.controls["stride"].max = s["compress_block"]
        s = self.settings()
        torch.manual_seed(self.seed + 1)
        x = torch.randn(1, s["seq_len"], 32)
        self.masks = branch_masks(self.model(), x, s["head"])
        self.current_counts = attended_counts(self.masks, s["query"], self.branches)
        draw_masks(self.masks, self.branches, s["query"], self.figure)
        self.image.value = figure_png(self.figure)
        full = self.current_counts["full attention"]
        rows = "".join(
            f"<tr><td>{name}</td><td>{count}</td><td>{count / full:.0%}</td></tr>"
            for name, count in self.current_counts.items()
        )
        self.counts.value = (
            f"<b>query {s['query']}</b><table><tr><th>branch</th><th>keys</th>"
            f"<th>of full</th></tr>{rows}</table>"
        )

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


class _ExplorerBox(widgets.VBox):
    """The explorer's widgets, with a short, stable text form (for notebook outputs)."""

    def __init__(self, branches: tuple[str, ...], children: list) -> None:
        super().__init__(children)
        self._branches = branches

    def __repr__(self) -> str:
        return f"MaskExplorer(branches={', '.join(self._branches)})"
