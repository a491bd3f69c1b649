"""Plots of the bias analysis (spec §B.6.3-4): joint scatter plots of PCA modes or a t-SNE map,
coloured by subgroup, with per-group marginal KDEs, as the seed's seaborn jointplots.

Figures are drawn on an Agg canvas (the global matplotlib backend is left alone); each function
returns its Figure, which a notebook displays, and writes a PNG when given ``path``.
"""
from __future__ import annotations

import os

import numpy as np
from scipy import stats

__all__ = ["plot_modes", "plot_tsne", "PALETTE"]

PALETTE = ("deepskyblue", "darkorange", "forestgreen", "darkorchid", "red")
SINGLE_THREAD_TSNE_ROWS = 5000  # t-SNE of at most this many rows runs on one OpenMP thread


def _new_figure(figsize):
  # Agg canvas directly: leaves the global backend alone (as report.plot_roc).
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  return fig


def _kde(ax, v, color, vertical=False):
  if v.size < 2 or np.ptp(v) == 0:
    return
  grid = np.linspace(v.min(), v.max(), 200)
  d = stats.gaussian_kde(v)(grid)  # each group normalised alone (common_norm=False)
  if vertical:
    ax.fill_betweenx(grid, 0, d, color=color, alpha=0.3, lw=1)
  else:
    ax.fill_between(grid, 0, d, color=color, alpha=0.3, lw=1)


def _joint(fig, cell, xy, groups, order, xlabel, ylabel, alpha=0.6):
  sub = cell.subgridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), hspace=0.05, wspace=0.05)
  ax = fig.add_subplot(sub[1, 0])
  top = fig.add_subplot(sub[0, 0], sharex=ax)
  right = fig.add_subplot(sub[1, 1], sharey=ax)
  for i, g in enumerate(order):
    m = groups == g
    color = PALETTE[i % len(PALETTE)]
    ax.scatter(xy[m, 0], xy[m, 1], s=8, alpha=alpha, color=color, label=str(g), rasterized=True)
    _kde(top, xy[m, 0], color)
    _kde(right, xy[m, 1], color, vertical=True)
  for a in (top, right):
    a.axis("off")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(loc="upper right", fontsize="small")


def _finish(fig, path, dpi):
  if path is not None:
    parent = os.path.dirname(os.fspath(path))
    if parent:
      os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
  return fig


def _order(groups, order):
  return list(order) if order is not None else sorted(np.unique(groups).tolist(), key=str)


def plot_modes(modes, groups, *, order=None, title: str = "", path=None, dpi: int = 120):
  """Joint plots of PCA modes 1+2 and 3+4 (``modes`` (N, >=4), or 1+2 only when
  fewer) coloured by ``groups`` (N,) with marginal KDEs; returns the Figure and
  writes a PNG when ``path`` is given."""
  z, g = np.asarray(modes), np.asarray(groups)
  pairs = [(0, 1), (2, 3)] if z.shape[1] >= 4 else [(0, 1)]
  fig = _new_figure((5.5 * len(pairs), 5.5))
  gs = fig.add_gridspec(1, len(pairs), wspace=0.3)
  for k, (a, b) in enumerate(pairs):
    _joint(fig, gs[0, k], z[:, [a, b]], g, _order(g, order), f"PCA Mode {a + 1}", f"PCA Mode {b + 1}")
  if title:
    fig.suptitle(title)
  return _finish(fig, path, dpi)


def plot_tsne(reduced, groups, *, order=None, n_subsample: int | None = 2000, seed: int = 42,
              title: str = "", path=None, dpi: int = 120, **tsne_kwargs):
  """t-SNE (2-D, ``init='random'``, ``learning_rate='auto'``, ``random_state=seed``;
  §B.6.3) of the PCA-reduced features ``reduced`` (N, K), on a random subsample of
  ``n_subsample`` rows for speed (None: all). Returns ``(fig, embedding (n, 2), rows)``."""
  from sklearn.manifold import TSNE
  from threadpoolctl import threadpool_limits

  x, g = np.asarray(reduced), np.asarray(groups)
  rows = np.arange(x.shape[0])
  if n_subsample is not None and n_subsample < x.shape[0]:
    rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], n_subsample, replace=False))
  kw = dict(n_components=2, init="random", learning_rate="auto", random_state=seed)
  kw["perplexity"] = min(30.0, (rows.size - 1) / 3.0)  # sklearn needs perplexity < n
  kw.update(tsne_kwargs)
  # Up to a few thousand points, a Barnes-Hut iteration is a few ms of work, and on a busy 2-core
  # machine its OpenMP threads spin rather than work: 200 points took 11 s of CPU on two threads
  # and 0.6 s on one (1000 points: 26 -> 3.7 s). Larger subsamples keep every thread.
  with threadpool_limits(limits=1 if rows.size <= SINGLE_THREAD_TSNE_ROWS else None,
                         user_api="openmp"):
    emb = TSNE(**kw).fit_transform(x[rows])
  fig = _new_figure((5.5, 5.5))
  _joint(fig, fig.add_gridspec(1, 1)[0, 0], emb, g[rows], _order(g, order),
         "t-SNE Dimension 1", "t-SNE Dimension 2")
  if title:
    fig.suptitle(title)
  return _finish(fig, path, dpi), emb, rows
