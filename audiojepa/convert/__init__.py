"""Converters from reference PyTorch checkpoints (as numpy state dicts) to audiojepa param trees."""

from audiojepa.convert.m2d_torch import state_dict_to_params as m2d_state_dict_to_params
from audiojepa.models.encodec_torch import convert as encodec_state_dict_to_params

__all__ = ["encodec_state_dict_to_params", "m2d_state_dict_to_params"]
