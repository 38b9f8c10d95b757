"""The data stream across topologies: process rows form the single-process global batch, and
`plan_resume` restores Grain state only when it applies, otherwise restarting from the step."""

import logging

import numpy as np
import pytest

from audiojepa.data import pipeline, shards
from audiojepa.ops import frontend

SR = 16000


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shards"))
    rng = np.random.default_rng(0)
    clips = ((f"c{i}", (0.3 * np.sin(rng.uniform(50, 500) * np.linspace(0, 1, SR // 4))).astype(np.float32), {})
             for i in range(20))
    shards.write_shard_set(folder, clips, sample_rate=SR, num_shards=2)
    paths, manifest = shards.resolve_shards(folder)
    return pipeline.DataSpec(tuple(paths), frontend.get_preset("m2d"), 16, 0.0, 1.0, manifest["num_clips"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_rows_concatenate_to_the_single_process_batch(spec, process_count):
    single = pipeline.make_dataset(spec, batch_size=8, seed=0, device_frontend=True)
    parts = [pipeline.make_dataset(spec, batch_size=8 // process_count, seed=0, process_index=p,
                                   process_count=process_count, device_frontend=True) for p in range(process_count)]
    for k in range(5):  # 40 examples: crosses epoch boundaries of the 20-clip set
        for key in ("waveform", "record_index"):
            np.testing.assert_array_equal(np.concatenate([ds[k][key] for ds in parts]), single[k][key])
    # Resuming at global batch 3 without an iterator state gives the same batches.
    late = pipeline.make_dataset(spec, batch_size=8, seed=0, device_frontend=True, start_batch=3)
    np.testing.assert_array_equal(late[0]["waveform"], single[3]["waveform"])


def test_plan_resume(caplog):
    setup = dict(global_batch_size=64, process_count=2, num_workers=4)
    saved = pipeline.data_position(**setup)
    assert pipeline.plan_resume(saved, 100, **setup) == (saved, True)  # unchanged: Grain's state applies
    assert pipeline.plan_resume(None, 100, **setup) == (pipeline.data_position(**setup), True)  # old checkpoints
    with caplog.at_level(logging.WARNING):
        position, restore = pipeline.plan_resume(saved, 100, **{**setup, "process_count": 1})
    assert not restore and position["start_batch"] == 100 and position["first_step"] == 100
    assert "process_count 2 -> 1" in caplog.text and "the same examples and crops" in caplog.text
    assert "not bit-identical" in caplog.text  # host log-mels may differ at float32 rounding (issue 22)
    # A later resume of that run, at step 130 with 1 process, restores Grain state built at start_batch 100.
    assert pipeline.plan_resume(position, 130, **{**setup, "process_count": 1}) == (position, True)
    # ... and with 2 processes again, global batch 130 (100 + 30 steps).
    assert pipeline.plan_resume(position, 130, **setup)[0]["start_batch"] == 130
    # Another global batch size: restart at the first batch with no example seen before (ceil).
    position, restore = pipeline.plan_resume(saved, 100, **{**setup, "global_batch_size": 96})
    assert not restore and position["start_batch"] == -(-100 * 64 // 96) == 67
