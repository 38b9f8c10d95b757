"""audiojepa: self-supervised pretraining of general-purpose audio encoders in JAX/Flax."""

__version__ = "0.1.0"
