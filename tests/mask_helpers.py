"""Jitted mask samplers that count their traces, for the masking tests (one compile per configuration)."""

import collections

import jax

TRACES = collections.Counter()


def counted(name, sampler, **static):
    """A jitted sampler that counts its traces in TRACES[name, static...]; rng is the only traced input."""
    key = (name, *sorted(static.items()))

    def sample(rng, batch_size):
        TRACES[key] += 1
        return sampler(rng, batch_size, **static)

    jitted = jax.jit(sample, static_argnums=1)
    jitted.trace_key = key
    return jitted
