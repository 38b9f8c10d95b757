"""Embedding clips of any lengths compiles a few fixed shapes (AudioEncoder.time_buckets x padded row counts),
and the padding changes no embedding: each clip's frame features and clip embedding equal, within 1e-5
(float32), those of the unpadded per-length path (every chunk encoded alone at its own width), an independent
NumPy/JAX reference written here. Tiny random encoders (configs/*.py:runlocal: 80 x 208 chunks, 16 x 16 patches,
13 steps per chunk), M2D (a CLS token) and JEPA (none)."""

import logging

import jax
import numpy as np
import pytest
import soundfile as sf

from audiojepa import config_utils, methods
from audiojepa.adapters import encoder, hear
from audiojepa.data import resolve
from audiojepa.evaluation import embedders, tasks

TOL = 1e-5
# Clip lengths in log-mel frames: shorter than a patch, one patch, one chunk (208), around it, several chunks.
LENGTHS = (1, 5, 16, 17, 100, 207, 208, 209, 300, 416 + 33)


@pytest.fixture(scope="module", params=["m2d", "jepa"])
def random_encoder(request):
    """The config's encoder at random init (as embedders.random_encoder, initialising the encoder alone: faster)."""
    config = config_utils.load_config(f"configs/{request.param}.py:runlocal")
    spec = resolve.resolve_data_spec(config.data)
    input_shape = methods.input_shape(methods.get_method(config.method), spec.frontend, spec.crop_frames)
    method = methods.get_method(config.method)(config.model, input_shape=input_shape)
    params = jax.jit(method.encoder.init)(jax.random.key(0), np.zeros((1, *input_shape), np.float32))["params"]
    return encoder.AudioEncoder(config.method, config.model, input_shape, spec.frontend,
                                (spec.norm_mean, spec.norm_std), {"encoder": params})


def _unpadded_reference(enc, encode, lms: np.ndarray) -> np.ndarray:
    """The per-length path, as before the buckets: lms [n_mels, frames] -> [T', F x D]. Chunks of chunk_frames,
    the shorter last one zero-padded only to whole patches, each chunk encoded alone without a mask."""
    (patch_f, patch_t), prefix = enc.patch_size, enc.method.num_prefix_tokens
    features = []
    for start in range(0, lms.shape[1], enc.chunk_frames):
        chunk = lms[:, start:start + enc.chunk_frames]
        if chunk.shape[1] < enc.chunk_frames:
            chunk = np.pad(chunk, ((0, 0), (0, -chunk.shape[1] % patch_t)))
        tokens = np.asarray(encode(enc.params, chunk[None]))[0, prefix:]  # [F·T', D], frequency-major
        grid_f, grid_t = chunk.shape[0] // patch_f, chunk.shape[1] // patch_t
        features.append(tokens.reshape(grid_f, grid_t, -1).transpose(1, 0, 2).reshape(grid_t, -1))
    return np.concatenate(features)


def _steps(enc, frames: int) -> int:
    """Frame features of a clip of `frames` log-mel frames: whole chunks' steps + the last chunk's, rounded up."""
    full, last = divmod(frames, enc.chunk_frames)
    return full * (enc.chunk_frames // enc.patch_size[1]) + -(-last // enc.patch_size[1])


def test_any_length_matches_the_unpadded_per_length_path_from_a_few_shapes(random_encoder):
    enc = random_encoder.with_layer(None)
    encode = jax.jit(enc.method.encode)
    rng = np.random.default_rng(0)
    before = enc.compile_count
    for frames in LENGTHS:
        lms = rng.standard_normal((80, frames)).astype(np.float32)
        features = enc.frame_features(lms[None])[0]
        assert features.shape == (_steps(enc, frames), enc.feature_dim)
        np.testing.assert_allclose(features, _unpadded_reference(enc, encode, lms), rtol=TOL, atol=TOL)
    # Every call encoded rows of one of the bucket widths; 1 row per bucket (2 full chunks of the longest clip):
    # at most 2 shapes per bucket for these 10 lengths, where the per-length path compiles one per length.
    widths = {b * enc.patch_size[1] for b in enc.time_buckets}
    traced = enc.traced_shapes[before:]
    assert {shape[-1] for shape in traced} <= widths and {shape[0] for shape in traced} <= {1, 2}
    assert len(traced) == enc.compile_count - before <= len(enc.time_buckets) + 1 < len(LENGTHS)
    assert enc.time_buckets == (1, 2, 4, 8, 13)  # powers of two up to the chunk's 13 steps


def test_every_layer_and_a_batch_of_one_length_are_unchanged_by_the_padding(random_encoder):
    enc = random_encoder.with_layer("all")
    lms = np.random.default_rng(1).standard_normal((3, 80, 300)).astype(np.float32)
    every = enc.frame_features(lms)
    assert every.shape == (enc.num_layers, 3, _steps(enc, 300), enc.feature_dim)
    encode_layers = jax.jit(enc.method.encode_layers)
    for layer in range(enc.num_layers):
        reference = _unpadded_reference(enc, lambda p, x, layer=layer: encode_layers(p, x)[layer], lms[2])
        np.testing.assert_allclose(every[layer, 2], reference, rtol=TOL, atol=TOL)
    # A clip alone or in a batch of three (other rows, padded row counts): the same features.
    alone = enc.with_layer(None).frame_features(lms[1:2])
    np.testing.assert_allclose(enc.with_layer(None).frame_features(lms)[1:2], alone, rtol=TOL, atol=TOL)


def _task_of_distinct_lengths(root, seconds):
    """A task folder with one clip per length (white noise at 16 kHz) and a last clip that fails to load."""
    root.mkdir()
    rows = ["filename,label,split"]
    rng = np.random.default_rng(2)
    for i, s in enumerate(seconds):
        sf.write(root / f"c{i:02d}.wav", (0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32), 16000)
        rows.append(f"c{i:02d}.wav,{'ab'[i % 2]},{'train' if i % 3 else 'test'}")
    sf.write(root / "bad.wav", np.full(800, np.nan, np.float32), 16000, subtype="FLOAT")
    rows.append("bad.wav,a,train")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return tasks.load_task(str(root), sample_rate=16000, verify_audio="header")


def test_embed_task_batches_mixed_lengths_with_a_bounded_number_of_compiles(random_encoder, tmp_path, caplog):
    """12 clips of 12 lengths (0.05-5 s: 1 to 3 chunks) in batches of 4 chunk rows: each bucket compiles its
    full batch and at most one padded last batch, and every clip's embedding equals its own alone."""
    seconds = (0.05, 0.2, 0.31, 0.6, 0.95, 1.3, 1.7, 2.07, 2.1, 2.9, 3.6, 5.0)
    task = _task_of_distinct_lengths(tmp_path / "mixed", seconds)
    # A fresh AudioEncoder (its own compiled functions): the module's encoder has traced shapes for other tests.
    enc = encoder.AudioEncoder(random_encoder.method_name, random_encoder.model_config, random_encoder.input_shape,
                               random_encoder.frontend, random_encoder.norm_stats, random_encoder.params)
    embedder = embedders.EncoderEmbedder(enc, name="random")
    before = enc.compile_count
    with caplog.at_level(logging.INFO):
        emb, kept = embedders.embed_task(embedder, task, batch_size=4)
    compiles = enc.compile_count - before
    assert compiles <= 2 * len(enc.time_buckets) < len(seconds)
    assert 4 in {shape[0] for shape in enc.traced_shapes[before:]} <= {1, 2, 4}  # chunks of several clips share calls
    assert f"{compiles} encoder compiles" in caplog.text
    assert kept.tolist() == list(range(len(seconds))) and emb.shape == (len(seconds), enc.feature_dim)
    assert task.skipped == [{"path": "bad.wav", "reason": "non-finite"}]
    for i in kept:  # each clip alone: the per-length reference of its log-mel, time mean
        waveform = task.load_audio(int(i), 16000)
        np.testing.assert_allclose(emb[i], embedder.embed_batch(waveform[None])[0], rtol=TOL, atol=TOL)
    encode = jax.jit(enc.method.encode)
    reference = _unpadded_reference(enc, encode, enc.normalized_logmel(task.load_audio(11, 16000))[0]).mean(axis=0)
    np.testing.assert_allclose(emb[11], reference, rtol=TOL, atol=TOL)


def test_hear_timestamp_embeddings_keep_their_frames_and_values(random_encoder):
    """HEAR (and X-ARES, the same call): frame features of a sound of any length are the per-length path's,
    with its number of frames; the timestamps follow."""
    # The encoder's own steps (timestamp_hop_ms="native"; these lengths leave no step centred past the end).
    model = hear.HearEmbedder(random_encoder.with_layer(None), timestamp_hop_ms="native")
    encode = jax.jit(model.encoder.method.encode)
    for seconds in (0.1, 2.5):
        audio = np.random.default_rng(3).uniform(-1, 1, (2, int(seconds * 16000))).astype(np.float32)
        embeddings, timestamps = model.timestamp_embeddings(audio)
        reference = _unpadded_reference(model.encoder, encode, model.encoder.normalized_logmel(audio[1:])[0])
        assert embeddings.shape[:2] == timestamps.shape == (2, len(reference))
        np.testing.assert_allclose(embeddings[1], reference, rtol=TOL, atol=TOL)


def test_the_chunk_batcher_bounds_the_waiting_rows_and_pads_partial_batches_to_powers_of_two():
    """_ChunkBatcher alone (a fake encoder: each row's features are its clip's number): clips whose rows all
    have their own bucket never fill a batch, so the fullest bucket goes early once more than max_waiting rows
    wait; every clip comes out once, with the mean of its chunks' features."""
    calls = []

    def encode_rows(rows, steps, num_rows):
        calls.append((len(rows), num_rows))
        return [np.full((n, 3), row[0], np.float32) for row, n in zip(rows, steps)]

    batcher = encoder._ChunkBatcher(encode_rows, batch_size=4, pool=True, max_waiting=6)
    out, peak = {}, 0
    for clip in range(20):  # rows (bucket, row, steps): 2 chunks, buckets shared by clips with the same clip % 7
        out.update(batcher.add(clip, [(clip % 7, np.array([clip]), 3), (7 + clip % 5, np.array([clip]), 1)]))
        peak = max(peak, batcher.num_waiting)
    out.update(batcher.flush())
    assert peak <= 6 and batcher.num_waiting == 0 and not batcher.parts
    assert sorted(out) == list(range(20))
    for clip, embedding in out.items():
        np.testing.assert_array_equal(embedding, np.full(3, clip, np.float32))
    assert all(num_rows == encoder.padded_rows(n, 4) and num_rows in (1, 2, 4) for n, num_rows in calls)
    assert [encoder.padded_rows(n, 6) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 4, 6, 6]
    assert encoder.time_buckets(608, 16) == (1, 2, 4, 8, 16, 32, 38)
    assert encoder.time_buckets(1001, 16) == (1, 2, 4, 8, 16, 32, 62, 63)


def test_a_waveform_model_compiles_a_few_shapes_and_keeps_the_per_length_frames():
    """EncodecMAE (0.4 s chunks: 30 frames of 320 samples at 24 kHz): a last chunk of any length is padded to a
    frame bucket with EnCodec told its length and the padding masked, and gives the frames of that chunk encoded
    alone at its own length (whole frames), as the reference encodes it (TOL); 9 lengths compile at most two
    shapes per bucket."""
    from audiojepa.methods import encodecmae
    from audiojepa.ops import frontend as frontend_lib

    config = encodecmae.default_config("tiny")
    method = encodecmae.EncodecMAE(config, input_shape=(9600,))
    enc = encoder.AudioEncoder("encodecmae", config, (9600,), frontend_lib.get_preset("encodec"), (0.0, 1.0),
                               methods.random_encoder_params(method, jax.random.key(0)))
    assert enc.time_buckets == (1, 2, 4, 8, 16, 30)
    encode = jax.jit(enc.method.encode)
    rng = np.random.default_rng(5)
    lengths = (100, 320, 700, 2500, 6000, 9600, 9601, 15000, 23000)  # samples: < 1 frame ... > 2 chunks
    for samples in lengths:
        waveform = (0.1 * rng.standard_normal(samples)).astype(np.float32)
        frames, _ = enc.embed_waveform(waveform[None])
        reference = []
        for start in range(0, samples, 9600):  # each chunk alone, zero-padded to whole frames only
            piece = waveform[start:start + 9600]
            whole = np.zeros(-(-len(piece) // 320) * 320, np.float32)
            whole[:len(piece)] = piece
            reference.append(np.asarray(encode(enc.params, whole[None]))[0])
        reference = np.concatenate(reference)
        assert frames.shape[1] == len(reference) == sum(-(-min(9600, samples - s) // 320)
                                                        for s in range(0, samples, 9600))
        np.testing.assert_allclose(frames[0], reference, rtol=TOL, atol=TOL)
    # 20 distinct frame counts (the per-length path: 20 compiles) in a fresh encoder: one shape per bucket used.
    fresh = encoder.AudioEncoder("encodecmae", config, (9600,), enc.frontend, enc.norm_stats, enc.params)
    for frames in range(1, 21):
        fresh.embed_waveform((0.1 * rng.standard_normal((1, frames * 320 - 7))).astype(np.float32))
    assert fresh.compile_count == len({next(b for b in fresh.time_buckets if b >= f) for f in range(1, 21)}) == 6
