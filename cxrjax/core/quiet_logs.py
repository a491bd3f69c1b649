"""Dropping library warnings that describe what cxrjax does on purpose, and nothing else.

TFDS and Orbax log through absl's logger; ``drop_absl_messages(prefixes)`` adds one filter there
that drops records whose message starts with any of ``prefixes`` (each call site names its own and
says why). Idempotent per prefix tuple, so importing a module twice adds nothing. Standard library
only: the data command line imports this without jax.
"""
from __future__ import annotations

import logging


class _DropMessages(logging.Filter):
  def __init__(self, prefixes: tuple[str, ...]):
    super().__init__()
    self.prefixes = prefixes

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.prefixes)


def drop_absl_messages(prefixes: tuple[str, ...]) -> None:
  """Drops absl-logger records whose (unformatted) message starts with one of ``prefixes``."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _DropMessages) and f.prefixes == prefixes for f in logger.filters):
    logger.addFilter(_DropMessages(prefixes))
