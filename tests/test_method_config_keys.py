"""Every method refuses a config.model without one of its keys, naming the key, the method and where its values
are (config_utils.model_config_with_keys), and takes a plain dict as well as a ConfigDict."""

import pytest

from audiojepa.methods import encodecmae, jepa, m2d, matpac

CASES = [  # (module, class, a key it needs, default_config argument, input_shape)
    (m2d, m2d.M2D, "mask_ratio", "tiny", (80, 208)),
    (jepa, jepa.JEPA, "masking", "tiny", (80, 208)),
    (matpac, matpac.MATPAC, "center_from", "tiny", (80, 208)),
    (matpac, matpac.MATPAC, "mask_ratio", "tiny", (80, 208)),  # one of M2D's keys, checked by M2D's constructor
    (encodecmae, encodecmae.EncodecMAE, "mask_prop", "small", (24000,)),
]


@pytest.mark.parametrize("module, cls, key, size, input_shape", CASES, ids=lambda v: getattr(v, "__name__", None))
def test_a_missing_model_key_is_named_with_the_method_and_its_defaults(module, cls, key, size, input_shape):
    config = module.default_config(size).to_dict()
    assert key in config
    cls(config, input_shape=input_shape)  # a dict with every key builds
    del config[key]
    with pytest.raises(KeyError) as error:
        cls(config, input_shape=input_shape)
    message = str(error.value)
    assert f"config.model is missing ['{key}']" in message
    assert cls.__name__ in message or "M2D" in message
    assert f"{module.__name__}.default_config()" in message or "audiojepa.methods.m2d.default_config()" in message
