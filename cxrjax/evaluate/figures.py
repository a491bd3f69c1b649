"""Figures several systems draw: a bare matplotlib Figure (no pyplot, so a notebook's backend stays
as it is) and a grid of grey images, one row per named set (reconstructions, generations)."""
from __future__ import annotations

import textwrap

import numpy as np

TITLE_LINES = 4  # a column title longer than this many wrapped lines ends in "..."


def figure(width: float, height: float):
  """A matplotlib Figure with an Agg canvas, for savefig."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def image_rows(rows: dict, path: str, title: str, *, column_titles: list | None = None) -> str:
  """A grid of grey images: one row per entry of `rows` ({name: (n, S, S) in [0, 1]}), optional
  titles over the first row's columns (reports: wrapped to the column's width); written to `path`."""
  names = list(rows)
  n = max(len(v) for v in rows.values())
  # matplotlib's wrap=True wraps at the figure's edge, not the axes', so neighbouring titles
  # overlap: wrap them here, to what a 1.6-inch column holds at x-small.
  titles = [textwrap.fill(str(t), 30, max_lines=TITLE_LINES, placeholder=" ...")
            for t in (column_titles or [])]
  lines = max((t.count("\n") + 1 for t in titles), default=0)
  fig = figure(1.6 * n + 1.2, 1.6 * len(names) + 0.4 + 0.13 * lines)
  for i, name in enumerate(names):
    for j, image in enumerate(rows[name]):
      ax = fig.add_subplot(len(names), n, i * n + j + 1)
      ax.imshow(np.asarray(image), cmap="gray", vmin=0.0, vmax=1.0)
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(textwrap.fill(str(name), 24), fontsize="small")
      if i == 0 and j < len(titles):
        ax.set_title(titles[j], fontsize="x-small")
  fig.suptitle(title, fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path
