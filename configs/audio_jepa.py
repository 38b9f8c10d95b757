r"""Audio-JEPA (Tuncay et al. 2025) as a configuration of the "jepa" method: paper recipe and a CPU smoke run.

Paper setting (shared/reference/jepa_family.md §3): ViT-B/16 on 10 s crops of 32 kHz audio, 128-mel
log-mels with a 10 ms hop (the `audiojepa` front-end preset; 10 s = 1001 frames, cut to 992 = 62
whole 16-frame patches, so 8x62 = 496 patches; the paper is quoted as 128 x 256 frames, 128 patches, and
the public code uses 96 x 512, 192 patches: this hop is M2D's, not theirs), unstructured masking with a mask ratio drawn per batch
from U[0.4, 0.6] (5 buckets, one compiled step each), target encoder on the whole spectrogram with
targets taken at the masked positions (latent domain), predictor 384 wide / 6 layers / 12 heads
projected back to 768, L2 loss, AdamW (0.9, 0.95) wd 0.05, lr 3e-4 peak after 1,000 warm-up steps then
cosine to 0, batch 256, 100k steps, EMA cosine 0.996 -> 1.0:

    python -m audiojepa.main --config=configs/audio_jepa.py --workdir=/ckpt/audio_jepa \
        --config.data.shards=/data/shards/as2m_32k

  The loss (mean squared error on targets that end in the encoder's LayerNorm) starts near 1 and falls;
  target_std/pred_std (collapse monitors) should stay well above 0.

CPU smoke run on the embedded corpus (generated at 32 kHz because the front end asks for it; tiny ViT,
predictor 64/2/4, 128x208 crops = 8x13 patches, batch 32, 300 steps):

    python -m audiojepa.main --config=configs/audio_jepa.py:runlocal --workdir=/tmp/audio_jepa_runlocal

  On 2 CPU cores (measured on embedded corpus version 2, 2026-11-30): 24 s to generate the 32 kHz
  corpus, then about 3.5 minutes at ~77 clips/s including 5 train-step compiles (one per ratio bucket);
  loss 1.13 at step 20, 0.13 at step 300. `python -m audiojepa.evaluate --encoder=/tmp/audio_jepa_runlocal
  --task=embedded --output=/tmp/audio_jepa_eval`: linear 57.1 +- 6.1, kNN 37.8 (random init 53.4 /
  33.8, log-mel at 32 kHz 44.4 / 42.6).

Speed and memory options (the param tree, hence checkpoints, is the same whatever they are set to):
`--config.model.dtype=bfloat16`: bfloat16 matmuls; params, norms, softmax and loss stay float32.
`--config.model.attention_impl=cudnn`: cuDNN's fused attention (NVIDIA GPU and bfloat16 only; default XLA).
`--config.model.remat=block|dots`: recompute block activations in the backward pass (less memory, more compute).
`--config.model.scan_layers=False`: unroll the transformer blocks instead of one lax.scan over them (default True).

Arguments (`:arg`): `runlocal`, `variant=tiny|S|B|L`, `recipe=paper|code`.

Where the paper and the public code differ (`recipe=code` switches all of these to the code):
- Loss: paper L2 on the raw targets (`loss_type="mse"`, `target_norm="none"`); code 2 - 2·cos on
  per-token standardised targets (`"norm_mse"`, `"standardize"`).
- Optimiser: the code's schedulers override the config, so its peak lr is 1e-3 and its effective weight
  decay 1e-6 (paper: 3e-4 and 0.05).
- Warm-up: the code starts at lr 1e-6, this trainer at 0 (a difference of 1e-6 over the first steps).
- EMA horizon: the code's cosine runs over 50 "epochs" while training stops at 100k steps (τ only reaches
  ≈0.9966); here it runs over total_steps, reaching 1.0 at the end, as the paper describes.
- Spectrogram: the code uses a Kaldi fbank of 96 mels x 512 frames with time as the ViT height; the paper
  and this config use 128 mels, frequency first.
"""


from ml_collections import config_dict

from audiojepa import frontend
from audiojepa.config_utils import adamw_config, apply_runlocal, data_config, parse_arg, run_config
from audiojepa.methods import jepa

CLIP_SECONDS = 10.0
PATCH_FRAMES = 16
RECIPES = ("paper", "code")


def crop_frames_for(duration_s: float, frontend_preset: str = "audiojepa") -> int:
    """Frames the front end gives for `duration_s` seconds, rounded down to whole 16-frame patches
    (10 s at 32 kHz, hop 320 → 1001 frames → 992)."""
    params = frontend.get_preset(frontend_preset)
    frames = params.num_frames(int(round(duration_s * params.sample_rate)))
    return frames // PATCH_FRAMES * PATCH_FRAMES


def get_config(arg=None):
    arg = parse_arg(arg, variant="B", runlocal=False, recipe="paper")
    if arg.recipe not in RECIPES:
        raise ValueError(f"config arg recipe={arg.recipe!r}; valid: {RECIPES}.")
    config = run_config("jepa", batch_size=256)  # the code's 4 GPUs x 64
    config.num_epochs = 0
    config.warmup_epochs = 0
    config.total_steps = 100_000
    config.warmup_steps = 1000
    # 32 kHz, 128 mels 50-16000 Hz, 25 ms window, 10 ms hop. Unset data.shards = the embedded corpus,
    # generated at 32 kHz with statistics for this front end (norm_stats="shards").
    config.data = data_config("audiojepa", crop_frames_for(CLIP_SECONDS), stats_frontends=("audiojepa",))  # 992

    config.model = jepa.default_config(arg.variant)  # keys: audiojepa/methods/jepa.py docstring
    config.model.masking = "unstructured"
    config.model.mask_ratio = 0.5  # the mean of the range; used only if mask_ratio_range is cleared
    config.model.mask_ratio_range = (0.4, 0.6)
    config.model.num_ratio_buckets = 5  # 0.4, 0.45, 0.5, 0.55, 0.6
    config.model.target_domain = "latent"
    config.model.predictor_width = 384
    config.model.predictor_depth = 6
    config.model.predictor_heads = 12
    config.model.predictor_full_grid = False
    config.model.loss_type = "mse"  # the paper's L2
    config.model.target_norm = "none"
    config.model.ema_schedule = "cosine"
    config.model.ema_decay_init = 0.996
    config.model.ema_decay = 1.0
    # Speed/memory only (audiojepa/models/vit.py); none of them changes the param tree:
    config.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators (params stay float32)
    config.model.attention_impl = config_dict.placeholder(str)  # None = XLA; "cudnn" (NVIDIA GPU, bfloat16)
    config.model.remat = "none"  # "block" | "dots": rematerialise each transformer block to save memory
    config.model.scan_layers = True  # one lax.scan over the blocks (faster compile and, on CPU, step)

    config.optim = adamw_config(lr=3e-4, grad_clip_norm=None)  # peak lr, not scaled with the batch; the code does not clip

    if arg.recipe == "code":
        config.model.loss_type = "norm_mse"
        config.model.target_norm = "standardize"
        config.optim.lr = 1e-3
        config.optim.weight_decay = 1e-6

    if arg.runlocal:
        apply_runlocal(config)
        config.data.crop_frames = 208  # 8x13 patches; the embedded clips are 3 s
        # 300 steps need a target that moves faster than 0.996.
        config.model.ema_decay_init = 0.99
    return config


def get_sweep(arg=None):
    """Overrides for `launch/sweep.py`: the paper recipe against the public code's."""
    del arg
    return [{"model.loss_type": "mse", "model.target_norm": "none"},
            {"model.loss_type": "norm_mse", "model.target_norm": "standardize"}]
