"""Contact sheets of prepared study datasets, and the image-free metadata reading they share with
`python -m cxrjax.data stats` (cli.py).

``read_meta`` reads a split's records with the images left encoded: decoding two JPEG/PNG views
per study is nearly all of the read time, and neither the statistics nor the choice of studies
to draw needs pixels. ``draw`` then decodes only the studies it shows.

Sheet layouts (matplotlib, Agg backend, exact size = inches x dpi, no tight cropping):
  random:   up to 4 studies per row; each its views side by side (``VIEW_IN`` inches each) over a
            text block (``TEXT_IN`` inches): positive labels ('?' for uncertain; severities for
            phantoms), study id / demographics / site, and a wrapped report excerpt.
  by label: one row per label (``pick_by_label``), the label's name on the left, the study's
            views, then its text to the right; the last row is a No Finding study.
"""
from __future__ import annotations

import textwrap

import numpy as np
import tensorflow_datasets as tfds

from cxrjax.data.features import label_names
from cxrjax.data.labels import VIEWS

VIEW_IN = 2.0          # inches per view panel
TEXT_IN = 1.8          # inches of text under a study (random layout)
TITLE_IN = 0.4         # inches of sheet title
LABEL_IN, ROW_TEXT_IN = 1.7, 4.3  # by-label layout: label column and text column widths
FONT = 7
_UNGRADED = ("No Finding", "Support Devices")  # phantom labels without a severity to show


class _Encoded(tfds.decode.Decoder):
  """Leaves an image feature as its encoded bytes (TFDS's SkipDecoding has no NumPy path)."""

  def decode_example(self, serialized_example):
    return serialized_example

  def decode_batch_example_np(self, serialized_example):
    return list(serialized_example)


def read_meta(builder, split: str, chunk: int = 512) -> dict:
  """Every record of ``split`` minus the pixels, as arrays: study_id, patient_id, race, site,
  findings, impression (N,) str; views: list of N tuples of view names; label_names (C names,
  the dataset's own); labels (N, C); age_years, sex_male (N,); severity (N, 14) for phantom
  datasets, else None."""
  source = builder.as_data_source(split, decoders={"images": _Encoded()})
  names = label_names(source)
  rows = []
  for start in range(0, len(source), chunk):  # batched reads: one file access per chunk
    rows += source.__getitems__(list(range(start, min(start + chunk, len(source)))))
  text = lambda key: np.array([r[key].decode("utf-8") for r in rows], dtype=object)  # noqa: E731
  meta = {key: text(key) for key in ("study_id", "patient_id", "race", "site", "findings", "impression")}
  meta["views"] = [tuple(VIEWS[int(v)] for v in r["views"]) for r in rows]
  meta["label_names"] = names
  meta["labels"] = np.array([r["labels"] for r in rows], np.float32).reshape(-1, len(names))
  for key in ("age_years", "sex_male"):
    meta[key] = np.array([r[key] for r in rows], np.float32)
  has_phantom = bool(rows) and "phantom" in rows[0]
  meta["severity"] = np.array([r["phantom"]["severity"] for r in rows], np.float32) if has_phantom else None
  meta["marker"] = np.array([r["phantom"]["shortcut"] for r in rows], np.float32) if has_phantom else None
  return meta


# --------------------------------------------------------------------------- #
# which studies
# --------------------------------------------------------------------------- #
def pick_random(meta: dict, n: int, seed: int) -> list[tuple[str | None, int]]:
  """``n`` distinct studies (all if fewer), in index order: [(None, index)]."""
  count = len(meta["study_id"])
  chosen = np.random.default_rng(seed).choice(count, size=min(n, count), replace=False)
  return [(None, int(i)) for i in sorted(chosen)]


def pick_by_label(meta: dict) -> list[tuple[str, int | None]]:
  """[(label, index or None)] for each of the dataset's labels but No Finding, then No Finding
  when it has one. With phantom ground truth: the clearest isolated example, the study maximising
  the sign's severity minus half the other signs' (Lung Opacity, the parent of most lung signs,
  not counted), so each row shows its own sign rather than the sickest patient; otherwise the
  first study labelled positive. None when the split has no such study."""
  labels, severity, names = meta["labels"], meta["severity"], list(meta["label_names"])
  rows = []
  parent = names.index("Lung Opacity") if "Lung Opacity" in names else -1
  no_finding = names.index("No Finding") if "No Finding" in names else None
  for k, name in enumerate(names):
    if k == no_finding:
      continue
    if severity is not None:
      present = severity[:, k] > 0
      others = severity.sum(axis=1) - severity[:, k] - (severity[:, parent] if k != parent else 0)
      score = np.where(present, severity[:, k] - 0.5 * others, -np.inf)
      index = int(np.argmax(score)) if present.any() else None
    else:
      hits = np.flatnonzero(labels[:, k] == 1)
      index = int(hits[0]) if len(hits) else None
    rows.append((name, index))
  if no_finding is None:
    return rows
  normal = labels[:, no_finding] == 1
  if severity is not None:  # a clean normal: no sign drawn and no device either
    clean = normal & (severity.sum(axis=1) == 0)
    normal = clean if clean.any() else normal
  hits = np.flatnonzero(normal)
  rows.append(("No Finding", int(hits[0]) if len(hits) else None))
  return rows


# --------------------------------------------------------------------------- #
# drawing
# --------------------------------------------------------------------------- #
def _positives(meta: dict, i: int) -> str:
  """'Cardiomegaly .62, Edema? .15' (severity for phantoms; '?' marks an uncertain label)."""
  out = []
  for k, name in enumerate(meta["label_names"]):
    value = meta["labels"][i, k]
    if value not in (1.0, -1.0):
      continue
    graded = meta["severity"] is not None and name not in _UNGRADED
    sev = meta["severity"][i, k] if graded else None
    out.append(name + ("?" if value == -1 else "") + (f" {sev:.2f}".replace("0.", ".") if sev else ""))
  return ", ".join(out) or "(no positive label)"


def _describe(meta: dict, i: int) -> str:
  """'s00000019 · 63 y M · group_a · site_2 · PA+L'."""
  age, sex = meta["age_years"][i], meta["sex_male"][i]
  parts = [meta["study_id"][i],
           f"{age:.0f} y" if not np.isnan(age) else "age ?",
           {1.0: "M", 0.0: "F"}.get(float(sex), "sex ?"),
           meta["race"][i] or "race ?", meta["site"][i] or "site ?", "+".join(meta["views"][i])]
  if meta["marker"] is not None and meta["marker"][i] >= 0.5:
    parts.append("marker")
  return " · ".join(parts)


def _report(meta: dict, i: int, width: int, max_lines: int) -> str:
  """The report's FINDINGS / IMPRESSION wrapped to ``width`` characters, cut at ``max_lines``."""
  findings, impression = meta["findings"][i].strip(), meta["impression"][i].strip()
  text = " ".join(filter(None, [findings and f"FINDINGS: {findings}",
                                impression and f"IMPRESSION: {impression}"]))
  lines = textwrap.wrap(" ".join(text.split()), width) or ["(no report)"]
  if len(lines) > max_lines:
    lines = lines[:max_lines - 1] + [lines[max_lines - 1][:width - 1] + "…"]
  return "\n".join(lines)


def _views(fig, images, x: float, y: float, num: int, fig_w: float, fig_h: float) -> None:
  """``num`` view panels from (x, y) inches (bottom-left), left to right; empty ones grey."""
  for v in range(num):
    ax = fig.add_axes([(x + v * VIEW_IN) / fig_w, y / fig_h, VIEW_IN / fig_w, VIEW_IN / fig_h])
    ax.set_xticks([]), ax.set_yticks([])
    if v < len(images):
      name, image = images[v]
      ax.imshow(image[..., 0] if image.ndim == 3 else image, cmap="gray", vmin=0, vmax=255)
      ax.text(0.02, 0.98, name, transform=ax.transAxes, va="top", fontsize=FONT + 1, color="yellow")
    else:
      ax.set_facecolor("0.85")


def _text(fig, meta, i, x, y_top, width_in, max_lines, fig_w, fig_h) -> None:
  """The study's text block, top-left at (x, y_top) inches: labels (bold), description, report."""
  chars = int(width_in * 72 / (FONT * 0.62))  # ~0.55 em per character at this size, bold wider
  line = FONT * 1.3 / 72  # inches per line
  first = textwrap.fill(_positives(meta, i), chars)
  fig.text(x / fig_w, y_top / fig_h, first, fontsize=FONT, fontweight="bold", va="top")
  y = y_top - line * (first.count("\n") + 1)
  desc = textwrap.fill(_describe(meta, i), chars)
  fig.text(x / fig_w, y / fig_h, desc, fontsize=FONT, va="top", color="0.25")
  y -= line * (desc.count("\n") + 1.3)
  fig.text(x / fig_w, y / fig_h, _report(meta, i, chars, max_lines), fontsize=FONT, va="top")


def _images(record) -> list[tuple[str, np.ndarray]]:
  return [(VIEWS[int(v)], np.asarray(im)) for v, im in zip(record["views"], record["images"])]


def draw(rows, records: dict, meta: dict, out: str, *, title: str, by_label: bool,
         dpi: int = 100) -> tuple[int, int]:
  """Writes the sheet PNG of ``rows`` ([(row label or None, index or None)]) and returns its
  (width, height) in pixels. ``records``: index -> the decoded record (for its images)."""
  import matplotlib
  matplotlib.use("Agg")  # files only; no display on a training machine
  import matplotlib.pyplot as plt

  num_views = max([len(records[i]["images"]) for _, i in rows if i is not None] + [1])
  if by_label:
    fig_w = LABEL_IN + num_views * VIEW_IN + ROW_TEXT_IN
    row_h = VIEW_IN + 0.1
    fig_h = TITLE_IN + len(rows) * row_h
  else:
    cols = min(4, len(rows))
    cell_w, cell_h = num_views * VIEW_IN + 0.2, VIEW_IN + TEXT_IN
    fig_w, fig_h = cols * cell_w, TITLE_IN + -(-len(rows) // cols) * cell_h
  fig = plt.figure(figsize=(fig_w, fig_h), facecolor="white")
  fig.text(0.5, 1 - 0.2 / fig_h, title, ha="center", va="center", fontsize=FONT + 4, fontweight="bold")
  for r, (label, i) in enumerate(rows):
    if by_label:
      y = fig_h - TITLE_IN - (r + 1) * row_h + 0.05
      fig.text(0.1 / fig_w, (y + VIEW_IN / 2) / fig_h, textwrap.fill(label, 16), fontsize=FONT + 3,
               fontweight="bold", va="center")
      if i is None:
        fig.text((LABEL_IN + 0.1) / fig_w, (y + VIEW_IN / 2) / fig_h, "no study with this label in the split",
                 fontsize=FONT + 1, color="0.4", va="center")
        continue
      _views(fig, _images(records[i]), LABEL_IN, y, num_views, fig_w, fig_h)
      _text(fig, meta, i, LABEL_IN + num_views * VIEW_IN + 0.1, y + VIEW_IN, ROW_TEXT_IN - 0.2, 12,
            fig_w, fig_h)
    else:
      x = (r % cols) * cell_w + 0.1
      y = fig_h - TITLE_IN - (r // cols + 1) * cell_h
      _views(fig, _images(records[i]), x, y + TEXT_IN, num_views, fig_w, fig_h)
      _text(fig, meta, i, x, y + TEXT_IN - 0.05, num_views * VIEW_IN, 8, fig_w, fig_h)
  fig.savefig(out, dpi=dpi, facecolor="white")
  plt.close(fig)
  return int(round(fig_w * dpi)), int(round(fig_h * dpi))
