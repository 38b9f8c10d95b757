"""Test setup: simulated devices and absl flags, before JAX or Grain is imported."""

import os

# Several CPU devices so sharding code paths run as on a multi-chip host.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

from absl import flags  # noqa: E402

# Grain reads absl flags in its worker machinery; outside absl.app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()
