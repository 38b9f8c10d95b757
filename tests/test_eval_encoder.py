"""Which encoder a method exports and evaluates (config.model.eval_encoder): each paper's by default (M2D, MATPAC:
online; Audio-JEPA: the EMA target, tests/test_jepa.py), the other on request."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiojepa import methods
from audiojepa.methods import m2d, matpac

INPUT_SHAPE = (80, 48)


def _small(config):
    config.variant = "tiny"
    config.predictor_width, config.predictor_depth, config.predictor_heads = 32, 1, 2
    return config


@pytest.mark.parametrize("name", ["m2d", "matpac"])
def test_online_by_default_and_the_ema_target_stack_on_request(name):
    module, cls = {"m2d": (m2d, m2d.M2D), "matpac": (matpac, matpac.MATPAC)}[name]
    config = _small(module.default_config("tiny"))
    method = cls(config, input_shape=INPUT_SHAPE)
    params, target_params = method.init(jax.random.key(0))
    stack = method.target_stack_params(target_params)
    stack = jax.tree.map(lambda x: x + 0.5, stack)  # an EMA target that has moved away from the online stack
    target_params = ({**target_params, "encoder_stack": stack} if name == "matpac" else stack)
    online = methods.encoder_params(method, params, target_params)
    assert online["encoder"] is params["encoder"]

    config.eval_encoder = "target"
    method = cls(config, input_shape=INPUT_SHAPE)
    chosen = methods.encoder_params(method, params, target_params)["encoder"]
    assert chosen["stack"] is stack and chosen["patch_embed"] is params["encoder"]["patch_embed"]
    lms = jnp.asarray(np.random.default_rng(0).standard_normal((2, *INPUT_SHAPE)), jnp.float32)
    # The target branch as the trainer runs it: the online embedding and CLS, the EMA stack.
    expected = method.encoder.apply({"params": {**params["encoder"], "stack": stack}}, lms)
    np.testing.assert_allclose(method.encode({"encoder": chosen}, lms), expected, atol=1e-6)
    assert np.abs(np.asarray(method.encode(online, lms)) - np.asarray(expected)).max() > 1e-3
    with pytest.raises(ValueError, match="eval_encoder"):
        method.encoder_params(params)
    config.eval_encoder = "teacher"
    with pytest.raises(ValueError, match="eval_encoder"):
        cls(config, input_shape=INPUT_SHAPE)


def test_configs_evaluate_the_encoder_their_paper_evaluates():
    from configs import audio_jepa, jepa
    from configs import m2d as m2d_config
    from configs import matpac as matpac_config
    assert m2d_config.get_config().model.eval_encoder == "online"
    assert matpac_config.get_config().model.eval_encoder == "online"
    assert jepa.get_config().model.eval_encoder == "context"
    assert audio_jepa.get_config().model.eval_encoder == "target"
