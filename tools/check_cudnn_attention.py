"""cuDNN's fused attention against XLA's on the GPU, through audiojepa's own attention call (token padding to
a multiple of 64, key masks): forward outputs and input gradients in bfloat16, for the token counts of M2D
ViT-B on 80x608 (58 online, 191 target/predictor). Prints one line per case; exits 1 past the bfloat16
tolerances below. Off a GPU it says so and exits 0 (tools/gpu_bench.sh runs it first).

    python tools/check_cudnn_attention.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax
import jax.numpy as jnp
import numpy as np

from audiojepa.models.vit import GPU_PLATFORMS, dot_product_attention

# bfloat16 has 8 bits of mantissa: outputs of magnitude ~1 round to ~0.008; gradients are sums of many terms.
OUTPUT_TOLERANCE = 0.02
GRADIENT_TOLERANCE = 0.1


def main() -> int:
    if jax.default_backend() not in GPU_PLATFORMS:
        print(f"cuDNN attention check skipped: the JAX backend is {jax.default_backend()!r}, not a GPU")
        return 0
    worst = 0.0, 0.0
    for tokens in (58, 191):
        q, k, v = jax.random.normal(jax.random.key(0), (3, 8, tokens, 12, 64), jnp.bfloat16)
        lengths = jax.random.randint(jax.random.key(1), (8, 1), 1, tokens + 1)
        for valid in (None, jnp.arange(tokens)[None] < lengths):
            def out(q_, impl):
                return dot_product_attention(q_, k, v, 0.125, impl, valid).astype(jnp.float32)

            def grad(impl):
                return jax.jit(jax.grad(lambda q_: jnp.sum(out(q_, impl) ** 2)))(q).astype(jnp.float32)

            keep = np.ones((8, tokens), bool) if valid is None else np.asarray(valid)
            d_out = float(np.abs(np.asarray(out(q, "cudnn")) - np.asarray(out(q, "xla")))[keep].max())
            d_grad = float(np.abs(np.asarray(grad("cudnn")) - np.asarray(grad("xla")))[keep].max())
            worst = max(worst[0], d_out), max(worst[1], d_grad)
            print(f"{tokens} tokens, {'no mask' if valid is None else 'key mask'}: max |cudnn - xla| output "
                  f"{d_out:.4f}, input gradient {d_grad:.4f}", flush=True)
    ok = worst[0] <= OUTPUT_TOLERANCE and worst[1] <= GRADIENT_TOLERANCE
    print(f"cuDNN attention check {'passed' if ok else 'FAILED'} (tolerances {OUTPUT_TOLERANCE} output, "
          f"{GRADIENT_TOLERANCE} gradient)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
