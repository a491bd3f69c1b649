"""The data layer's one error type.

``DataError`` marks input data the user has to fix (a missing file, a bad
label, leakage between splits). Its message alone says what and where: the
file, and the CSV line or accession where one applies. It subclasses
``ValueError`` so generic callers can catch it, and ``CxrjaxError`` so the
launcher prints it as one line instead of a traceback.
"""

from __future__ import annotations

from cxrjax.core.errors import CxrjaxError


class DataError(CxrjaxError, ValueError):
  """Input data cannot be used as given; the message names the file/row to fix."""
