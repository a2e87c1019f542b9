"""Which programs JAX traces or XLA compiles while a block runs (JAX's monitoring events), for
the tests that prove a loop compiles nothing it should have found compiled."""

import jax
import jax.monitoring


class Lowerings:
  """Names the programs JAX lowers (traces into XLA) while entered: every jit cache miss, whether
  XLA then compiles the program or loads it from a persistent compilation cache."""
  event = "/jax/core/compile/jaxpr_to_mlir_module_duration"

  def __init__(self):
    self.names = []

  def _listen(self, event, duration, **kwargs):
    del duration
    if event == self.event:
      self.names.append(kwargs.get("fun_name"))

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


class Compilations(Lowerings):
  """Names the programs XLA compiles (or loads from a persistent compilation cache) while entered."""
  event = "/jax/core/compile/backend_compile_duration"
