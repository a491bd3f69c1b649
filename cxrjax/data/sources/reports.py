"""FINDINGS / IMPRESSION extraction from free-text radiology reports (MIMIC-CXR style).

A MIMIC-CXR report (``files/pXX/pSUBJECT/sSTUDY.txt``) is a sequence of sections, each opened by
an upper-case header and a colon at the start of a line::

                                   FINAL REPORT
   EXAMINATION:  CHEST (PA AND LAT)
   INDICATION:  ...
   FINDINGS:
   PA and lateral views of the chest ...
   IMPRESSION:
   No acute cardiopulmonary process.

``split_report`` returns (findings, impression) with whitespace collapsed; a missing section is
''. When IMPRESSION appears more than once (addenda), the LAST one wins, as in the MIMIC-CXR
section-extraction script. 'FINDINGS AND IMPRESSION:' fills both.
"""
from __future__ import annotations

import re

# A header: start of line, upper-case words (with / & ( ) - and spaces), a colon.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&()\-]*[A-Z)])[ \t]*:", re.MULTILINE)
_FINDINGS = ("FINDING", "FINDINGS")
_IMPRESSION = ("IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS")
_BOTH = ("FINDINGS AND IMPRESSION", "FINDINGS/IMPRESSION", "IMPRESSION AND FINDINGS")


def _clean(text: str) -> str:
  return " ".join(text.split())


def sections(text: str) -> list[tuple[str, str]]:
  """[(HEADER, body)] in report order; text before the first header is dropped."""
  matches = list(_HEADER.finditer(text))
  out = []
  for m, nxt in zip(matches, matches[1:] + [None]):
    end = nxt.start() if nxt is not None else len(text)
    out.append((" ".join(m.group(1).split()), _clean(text[m.end():end])))
  return out


def split_report(text: str) -> tuple[str, str]:
  """A report's text -> (findings, impression), '' for a section it lacks."""
  findings, impression = "", ""
  for header, body in sections(text or ""):
    if header in _BOTH:
      findings = findings or body
      impression = body
    elif header in _FINDINGS:
      findings = body if not findings else f"{findings} {body}"
    elif header in _IMPRESSION:
      impression = body  # the last impression (final addendum) wins
  return findings, impression
