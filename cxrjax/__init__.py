"""cxrjax: five chest-X-ray research systems on one JAX/Flax core (see DESIGN.md)."""
from cxrjax.core import xla_cpu as _xla_cpu

# Before any jax computation starts XLA's CPU backend; see cxrjax/core/xla_cpu.py.
_xla_cpu.apply_defaults()
