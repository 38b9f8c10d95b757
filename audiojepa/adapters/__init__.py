"""A trained run as an audio encoder (`encoder.AudioEncoder`) and that encoder behind the benchmark APIs:
HEAR (`audiojepa.adapters.hear`) and X-ARES (`audiojepa.adapters.xares`)."""
