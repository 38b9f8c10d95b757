r"""Does JAX leave the GPU to torch when the HEAR / X-ARES adapters load it? (issue 25; a device-machine check)

    python tools/check_gpu_memory.py          # two fresh processes: plain JAX, then through audiojepa.adapters.hear

Each process runs a tiny random M2D's HEAR timestamp embeddings of 2 s of noise on the default device and prints
the GPU memory its process holds (nvidia-smi) against the device's total. Plain JAX preallocates 75% of the
GPU when its backend starts; through `audiojepa.adapters.hear` (XLA_PYTHON_CLIENT_PREALLOCATE=false, set at import) the
process should hold little more than what the computation needs. On a machine without a GPU it says so.
"""

import os
import subprocess
import sys

CHILD = r"""
import os, subprocess, sys
sys.path.insert(0, sys.argv[2])
import jax, jax.numpy as jnp, numpy as np
at_start = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")  # what the backend sees when it starts
if sys.argv[1] == "plain":  # the backend starts with JAX's defaults, before audiojepa.adapters.hear is imported
    jnp.ones(1).block_until_ready()
else:
    import audiojepa.adapters.hear
    at_start = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
from audiojepa.adapters import encoder
from audiojepa.ops import frontend
from audiojepa.methods import m2d
import audiojepa.adapters.hear as hear
config = m2d.default_config("tiny")
method = m2d.M2D(config, input_shape=(80, 208))
params = jax.jit(lambda k: method.encoder.init(k, jnp.zeros((1, 80, 208)))["params"])(jax.random.key(0))
enc = encoder.AudioEncoder("m2d", config, (80, 208), frontend.get_preset("m2d"), (-7.1, 4.2), {"encoder": params})
emb, ts = hear.HearEmbedder(enc).timestamp_embeddings(np.random.default_rng(0).uniform(-1, 1, (2, 32000)).astype(np.float32))
out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                     capture_output=True, text=True).stdout
held = sum(int(line.split(",")[1]) for line in out.splitlines() if line.split(",")[0].strip() == str(os.getpid()))
total = int(subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True).stdout.split()[0])
print(f"{sys.argv[1]:>5}: device {jax.devices()[0]}, PREALLOCATE at backend start={at_start}, "
      f"embeddings {emb.shape}, timestamps every {float(ts[0, 1] - ts[0, 0]):.0f} ms; process holds {held} MiB of "
      f"{total} MiB ({100 * held / total:.1f}%)")
"""


def main() -> int:
    try:
        subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        print("no NVIDIA GPU here (nvidia-smi): nothing to check")
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    for mode in ("plain", "hear"):
        result = subprocess.run([sys.executable, "-c", CHILD, mode, root], env=env, capture_output=True, text=True)
        print(result.stdout.strip() or result.stderr[-2000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
