"""Errors a user can act on. The launcher prints them as one line and exits non-zero."""


class CxrjaxError(Exception):
  """Base class: an error whose message alone tells the user what to fix."""


class ConfigError(CxrjaxError, ValueError):
  """A config field has a value the code cannot use."""


class CheckpointError(CxrjaxError):
  """A checkpoint directory cannot be read or does not belong to this run."""


class NonFiniteError(CxrjaxError, FloatingPointError):
  """A loss term or the gradient became NaN/inf; training stopped before saving it."""
