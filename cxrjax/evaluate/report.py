"""Human-facing renderings of classification results: markdown tables, ROC plots.

Rows are dicts as produced by :func:`cxrjax.evaluate.classification.binary_report`
plus a ``"model"`` key, e.g.::

    {"model": "ctpa_only", "auc": 0.85, "auc_ci": [0.77, 0.94],
     "accuracy": 0.8, "sensitivity": 0.82, "specificity": 0.8, ...}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence

from cxrjax.evaluate.classification import roc_auc, roc_curve_points

__all__ = ["markdown_table", "markdown_rows", "plot_roc", "COLUMN_TITLES"]

COLUMN_TITLES = {
    "model": "Model",
    "auc": "AUC",
    "auprc": "AUPRC",
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "threshold": "Threshold",
}

_MISSING = "n/a"


def _fmt_number(value, decimals: int) -> str:
  if value is None:
    return _MISSING
  value = float(value)
  if math.isnan(value):
    return _MISSING
  return f"{value:.{decimals}f}"


def _fmt_auc(row: Mapping, decimals: int) -> str:
  """``0.85 [0.77-0.94]``; the bracket is omitted when no CI is present."""
  point = _fmt_number(row.get("auc"), decimals)
  ci = row.get("auc_ci")
  if ci is None or point == _MISSING:
    return point
  lo, hi = (_fmt_number(v, decimals) for v in ci)
  return f"{point} [{lo}-{hi}]"


def _cell(row: Mapping, column: str, names: Mapping[str, str], decimals: int) -> str:
  if column == "model":
    model = str(row.get("model", ""))
    # A bare "|" would split the cell in markdown.
    return names.get(model, model).replace("|", "\\|")
  if column == "auc":
    return _fmt_auc(row, decimals)
  value = row.get(column)
  if isinstance(value, str):
    return value.replace("|", "\\|")
  return _fmt_number(value, decimals)


def markdown_table(
    rows: Sequence[Mapping],
    columns: Sequence[str] = ("model", "auc", "accuracy", "specificity", "sensitivity"),
    *,
    names: Mapping[str, str] | None = None,
    decimals: int = 2,
) -> str:
  """Render ``rows`` as a GitHub-flavoured markdown table.

  ``columns`` are row keys in display order; "auc" renders as
  ``0.85 [0.77-0.94]`` from ``auc`` and ``auc_ci``, other numbers with
  ``decimals`` places, missing/NaN values as ``n/a``. Add "auprc" or
  "threshold" (or any other key) to show those. ``names`` maps model ids to
  display names (``{"ctpa_only": "CTPA only classifier"}``); unmapped ids are
  shown as-is. Cells are left-aligned and padded to the column width; the
  returned string ends with a newline.
  """
  names = dict(names or {})
  header = [COLUMN_TITLES.get(c, c.replace("_", " ").title()) for c in columns]
  body = [[_cell(r, c, names, decimals) for c in columns] for r in rows]
  return markdown_rows(header, body, pad=True) + "\n"


def markdown_rows(header: Sequence[str], rows: Sequence[Sequence[str]], *,
                  pad: bool = False) -> str:
  """A GitHub-flavoured markdown table from ready-made cell strings; no trailing newline.

  ``header`` has one title per column and each of ``rows`` one cell per column;
  cells are written as given (escape a "|" inside one yourself). With ``pad``,
  cells are left-aligned and padded to the column width and the rule matches
  it (``|------|``), so the source lines up; without, the rule is ``|---|``
  per column and an empty cell is written ``| |``.
  """
  if pad:
    widths = [max([len(header[j])] + [len(r[j]) for r in rows]) for j in range(len(header))]
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    text = lambda cells: [c.ljust(w) for c, w in zip(cells, widths)]
  else:
    rule = "|" + "---|" * len(header)
    text = lambda cells: list(cells)

  def line(cells: Sequence[str]) -> str:
    # Unpadded, an empty cell is one space, as the hand-written tables had it ("| | |").
    return "|" + "|".join(f" {c} " if c or pad else " " for c in text(cells)) + "|"

  return "\n".join([line(header), rule, *map(line, rows)])


def plot_roc(
    curves: Mapping[str, tuple],
    path: str | os.PathLike,
    title: str = "ROC curve",
    *,
    dpi: int = 150,
):
  """Write a PNG with one ROC curve per entry of ``curves`` and return ``path``.

  ``curves`` maps a legend name to ``(y_true, scores)`` (1-D, same length).
  The legend reads ``"name (AUC 0.xx)"``; a dashed diagonal marks chance and
  the axes are square on [0, 1]. Uses an Agg canvas directly so the global
  matplotlib backend is left untouched (safe inside notebooks and servers).
  """
  # Imported lazily: matplotlib is slow to import and only plots need it.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not curves:
    raise ValueError("curves is empty; nothing to plot")
  fig = Figure(figsize=(5, 5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for name, (y_true, scores) in curves.items():
    fpr, tpr, _ = roc_curve_points(y_true, scores)
    ax.plot(fpr, tpr, lw=1.8, label=f"{name} (AUC {roc_auc(y_true, scores):.2f})")
  ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="Chance")
  ax.set_xlim(0.0, 1.0)
  ax.set_ylim(0.0, 1.0)
  ax.set_aspect("equal")
  ax.set_xlabel("1 - Specificity (false positive rate)")
  ax.set_ylabel("Sensitivity (true positive rate)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize="small")
  fig.tight_layout()

  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.savefig(path, format="png", dpi=dpi)
  return path


def evaluation_dir(workdir: str, config: Mapping, keys: Sequence[str]) -> str:
  """Where an evaluation writes its results: the workdir, unless it already holds a results.json
  made with other evaluation settings (config[k] for k in keys, e.g. sampling and eval); then
  <workdir>/evaluations/<id>/, id a hash of those settings. Re-evaluating trained stages with new
  settings is useful; overwriting the earlier result without a word is not. Says where it writes
  when that is not the workdir."""
  from cxrjax.core.writers import say  # late: report is imported where jax is not needed

  settings = json.loads(json.dumps({k: config[k] for k in keys}, sort_keys=True, default=str))
  path = os.path.join(workdir, "results.json")
  try:
    with open(path) as f:
      stored = json.load(f).get("config", {})
  except (OSError, ValueError):
    return workdir  # no earlier result (or none that can be read) to keep
  if {k: stored.get(k) for k in keys} == settings:
    return workdir
  digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
  out = os.path.join(workdir, "evaluations", digest)
  os.makedirs(out, exist_ok=True)
  say(f"[evaluation] {path} was made with other {'/'.join(keys)} settings and is kept; this "
      f"evaluation writes to {out}")
  return out


def write_results_files(workdir: str, results: Mapping, markdown: str, *, indent: int = 1) -> str:
  """Writes workdir/results.json (via a temporary file and a rename, so a crash never leaves a
  half-written one) and workdir/results.md; returns the json path. Call on process 0 only."""
  path = os.path.join(workdir, "results.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=indent, sort_keys=True)
  os.replace(tmp, path)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown + "\n")
  return path
