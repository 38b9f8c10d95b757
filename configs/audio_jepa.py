r"""Audio-JEPA (Tuncay et al. 2025) as a configuration of the "jepa" method: the paper's recipe, the released code's,
and a CPU smoke run.

`recipe=paper` (the default) follows the paper's text, so that comparisons with the other methods use the
method as published; `recipe=code` follows LudovicTuncay/Audio-JEPA (shared/reference/jepa_family.md §3). Both:
ViT-B/16 encoders, predictor 384 wide / 6 layers / 12 heads projected back to 768 (85.4M parameters per encoder,
96.7M trainable: Table I), unstructured masking with r ~ U[0.4, 0.6] drawn once per batch (§IV.A; drawn inside
the jitted step, the index arrays padded to the range's capacity: one compile), a target encoder on the whole
spectrogram with targets taken at the masked positions (latent domain), EMA cosine 0.996 -> 1.0 (BYOL),
AdamW (0.9, 0.95), warm-up from 1e-6 over 1,000 steps then cosine to 0, batch 256, 100k steps, no gradient
clipping; evaluation on the frozen **target** encoder (§III.C; exports and `evaluate` use it):

    python -m audiojepa.main --config=configs/audio_jepa.py --workdir=/ckpt/audio_jepa \
        --config.data.shards=/data/shards/as2m_32k

  The loss (Eq. 2: the squared L2 distance per token, summed over 768 features, on targets that end in the
  encoder's LayerNorm) starts in the hundreds and falls; target_std/pred_std (collapse monitors) should stay
  well above 0; `mask/target_fraction` moves between 0.4 and 0.6 from step to step.

Paper vs released code (the config key, then the paper / code value; README "Paper vs released code"):
- Input, §IV.A: `data.frontend` "audiojepa_paper" (32 kHz, 128 mels x 256 time bins per 10 s, frame 2.5x
  the hop: 8 x 16 = 128 patches) / "audiojepa_code" (the code's Kaldi fbank: 96 mels x 512 bins, 6 x 32 = 192
  patches; the code lays time along the ViT's height, here frequency comes first); `data.crop_frames` 256 /
  512. (The older "audiojepa" preset, M2D's 10 ms hop at 32 kHz, 992 frames and 496 patches, stays available.)
- Loss, Eq. 2: `model.loss_type` "l2" / "norm_mse"; `model.target_norm` "none" / "standardize".
- Optimiser, §IV.C: `optim.lr` 3e-4 / 1e-3 (the code's scheduler overrides its optimiser config) and
  `optim.weight_decay` 0.05 / 1e-6 (the code's CosineWDScheduler). `optim.warmup_init_lr` = 1e-6 in both.
- Same in both: `model.eval_encoder="target"` (the code's evaluation imports an unreleased module, so the
  paper's word is all there is), `model.mask_ratio_range=(0.4, 0.6)` with `model.ratio_sampling="continuous"`.
- Not reproduced: the code's EMA horizon (a cosine over 50 "epochs" while training stops at 100k steps, so τ
  only reaches ≈0.9966); here τ reaches 1.0 at total_steps as the paper describes. The code peak-normalises
  waveforms and does not standardise log-mels; here the shard statistics normalise both recipes.

CPU smoke run on the embedded corpus (generated at 32 kHz because the front end asks for it; tiny ViT,
predictor 64/2/4, batch 32, 300 steps; the 3 s clips give 77 frames, cropped to 64 = 8 x 4 patches):

    python -m audiojepa.main --config=configs/audio_jepa.py:runlocal --workdir=/tmp/audio_jepa_runlocal

On 2 CPU cores (measured 2026-12-04; wall times on a loaded machine): the 32 kHz corpus is generated once
  (~30 s), then `recipe=paper` trains in 91 s: loss 214 at step 20, 111 at 40, 17.8 at 300, target fraction
  0.49-0.53 from step to step, target_std 0.79 -> 0.67. `python -m audiojepa.evaluate
  --encoder=/tmp/audio_jepa_runlocal --task=embedded --output=/tmp/audio_jepa_eval` (the target encoder):
  linear 44.7 +- 5.6, kNN 28.0 (random init 49.1 / 33.4, log-mel at 32 kHz 47.6 / 45.6): 300 steps do not
  beat the floor (issue 23). `:runlocal,recipe=code` (96 x 144 crops): loss 1.48 at step 20, 0.092 at 300
  (171 s); linear 42.8 +- 7.5, kNN 28.0.

Small run on a few hours of real audio (`:small`: runlocal's tiny ViT, predictor, batch 32, lr 1e-3, EMA from
0.99, 4000 steps; recipe paper) on the real-audio dev benchmark. At this scale it reads **M2D's front end**
(16 kHz, 80 mels, 10 ms hop; 80x208 crops = 5 x 13 patches): with the paper's (32 kHz, 128 mels, 39 ms hop;
128x64 crops = 8 x 4 patches) the small run learnt nothing its floors do not (below). Shards and statistics as in
configs/m2d.py's docstring:

    python -m audiojepa.main --config=configs/audio_jepa.py:small --workdir=/tmp/audio_jepa_small \
        --config.data.shards=/data/devbench/shards

  Loss (Eq. 2) 142 at step 50, 20.7 at 1000, 18.9 at 4000; target_std / pred_std 0.91 / 0.90 (no collapse).
  40 minutes here while two other runs shared the 2 cores (47-54 clips/s); JEPA's `:small`, the same tiny ViT and
  predictor on the same crops, takes about 12 alone. On the dev benchmark's fold twins (the target encoder;
  `python -m audiojepa.evaluate --encoder=/tmp/audio_jepa_small --task=/data/devbench/tasks/game_sfx_folds
  --task=.../gm_family_folds --task=.../unit_sound_folds --task=.../battle_sound_folds --output=...`), linear /
  kNN, measured 2026-12-05: game_sfx_folds 61.4 +- 16.9 / 53.3 (log-mel 31.0 / 25.2, random init 45.3 / 26.7),
  gm_family_folds 34.8 +- 5.7 / 32.5 (24.7 / 27.9, 28.0 / 27.4), unit_sound_folds 67.3 +- 4.6 / 59.5 (59.4 /
  58.2, 60.5 / 61.1: kNN under random init), battle_sound_folds 59.1 +- 6.2 / 54.7 (49.1 / 59.9, 54.6 / 61.7):
  both floors beaten on both probes on game_sfx and gm_family. With the paper's front end
  (`--config.data.frontend=audiojepa_paper --config.data.crop_frames=64` on shards made at
  `--sample_rate 32000`, statistics `--frontend audiojepa_paper --crop_frames 64`; loss 12.1 at 4000, ~12
  minutes) the same run gave game_sfx_folds 46.0 / 39.5 (its floors 34.7 / 38.3, 45.3 / 42.2), gm_family_folds
  24.8 / 24.2 (23.1 / 19.8, 31.1 / 22.4), unit_sound_folds 58.4 / 55.1 (56.0 / 52.6, 62.1 / 57.9): under random
  init nearly everywhere, with the context encoder or the first block's output as well (docs/dev_benchmark.md).

Speed and memory options (the param tree, hence checkpoints, is the same whatever they are set to):
`--config.model.dtype=bfloat16`: bfloat16 matmuls; params, norms, softmax and loss stay float32.
`--config.model.attention_impl=cudnn`: cuDNN's fused attention (NVIDIA GPU and bfloat16 only; default XLA).
`--config.model.remat=block|dots`: recompute block activations in the backward pass (less memory, more compute).
`--config.model.scan_layers=False`: unroll the transformer blocks instead of one lax.scan over them (default True).
`--config.model.residual_dtype=bfloat16` (with dtype bfloat16): a bfloat16 residual stream; faster on GPU, not the same numbers.

Arguments (`:arg`): `runlocal`, `small`, `variant=tiny|S|B|L`, `recipe=paper|code`.
Sizes other than the named variants: `--config.model.width=512 --config.model.depth=8` (also `num_heads`,
default width / 64, and `mlp_dim`, default 4 x width; `predictor_width/depth/heads/mlp_dim` likewise).
"""


from ml_collections import config_dict

from audiojepa.config_utils import (
    adamw_config,
    apply_runlocal,
    apply_small,
    data_config,
    parse_arg,
    run_config,
)
from audiojepa.methods import jepa
from audiojepa.ops import frontend

CLIP_SECONDS = 10.0
PATCH_FRAMES = 16
RECIPES = ("paper", "code")
# Front-end preset per recipe (audiojepa/ops/frontend.py): the paper's 128 x 256 per 10 s, the code's 96 x 512.
FRONTENDS = {"paper": "audiojepa_paper", "code": "audiojepa_code"}


def crop_frames_for(duration_s: float, frontend_preset: str = "audiojepa_paper") -> int:
    """Frames the front end gives for `duration_s` seconds, rounded down to whole 16-frame patches
    (10 s at 32 kHz: "audiojepa_paper" 256 frames, "audiojepa_code" 513 → 512, "audiojepa" 1001 → 992)."""
    params = frontend.get_preset(frontend_preset)
    frames = params.num_frames(int(round(duration_s * params.sample_rate)))
    return frames // PATCH_FRAMES * PATCH_FRAMES


def get_config(arg=None):
    arg = parse_arg(arg, variant="B", runlocal=False, small=False, recipe="paper")
    if arg.recipe not in RECIPES:
        raise ValueError(f"config arg recipe={arg.recipe!r}; valid: {RECIPES}.")
    paper = arg.recipe == "paper"
    config = run_config("jepa", batch_size=256)  # paper §V: 256 clips per batch (the code's 4 GPUs x 64)
    config.recipe = arg.recipe
    config.num_epochs = 0
    config.warmup_epochs = 0
    config.total_steps = 100_000
    config.warmup_steps = 1000
    # Unset data.shards = the embedded corpus, generated at 32 kHz with statistics for this front end.
    preset = FRONTENDS[arg.recipe]
    config.data = data_config(preset, crop_frames_for(CLIP_SECONDS, preset), stats_frontends=(preset,))

    config.model = jepa.default_config(arg.variant)  # keys: audiojepa/methods/jepa.py docstring
    config.model.masking = "unstructured"
    config.model.mask_ratio = 0.5  # the mean of the range; used only if mask_ratio_range is cleared
    config.model.mask_ratio_range = (0.4, 0.6)  # r ~ U[0.4, 0.6] once per batch (paper §IV.A, code alike)
    config.model.ratio_sampling = "continuous"  # drawn in the jitted step: one compile ("buckets": older option)
    config.model.target_domain = "latent"
    config.model.predictor_width = 384
    config.model.predictor_depth = 6
    config.model.predictor_heads = 12
    config.model.predictor_full_grid = False
    config.model.loss_type = "l2" if paper else "norm_mse"  # paper Eq. 2: ‖ĉ_j - t_j‖²₂ averaged over M
    config.model.target_norm = "none" if paper else "standardize"
    config.model.ema_schedule = "cosine"
    config.model.ema_decay_init = 0.996
    config.model.ema_decay = 1.0
    config.model.eval_encoder = "target"  # paper §III.C: "Using the frozen target encoder in the evaluation"
    # Speed/memory only (audiojepa/models/vit.py); none of them changes the param tree:
    config.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators (params stay float32)
    config.model.attention_impl = config_dict.placeholder(str)  # None = XLA; "cudnn" (NVIDIA GPU, bfloat16)
    config.model.remat = "none"  # "block" | "dots": rematerialise each transformer block to save memory
    config.model.scan_layers = True  # one lax.scan over the blocks (faster compile and, on CPU, step)
    config.model.residual_dtype = "float32"  # "bfloat16" (with dtype bfloat16): bf16 residual stream

    # Peak lr, not scaled with the batch; neither the paper nor the code clips gradients. The warm-up starts
    # at 1e-6 in both (paper §IV.C; code's WarmupCosineScheduler start_lr).
    config.optim = adamw_config(lr=3e-4 if paper else 1e-3, grad_clip_norm=None, warmup_init_lr=1e-6)
    if not paper:
        config.optim.weight_decay = 1e-6  # the code's CosineWDScheduler overrides the optimiser's 0.05

    if arg.runlocal or arg.small:
        if arg.small:
            apply_small(config)
            # On a few hours of real audio the paper's front end (32 kHz, a 39 ms hop: 8 x 4 patches per crop)
            # learnt nothing its floors do not; M2D's (16 kHz, 10 ms hop, 80 x 208 = 5 x 13 patches) did
            # (docs/dev_benchmark.md, session 17). Same shards and statistics as M2D's `:small`.
            config.data.frontend = "m2d"
            config.data.crop_frames = 208
            config.data.embedded.stats_frontends = ("m2d",)
        else:
            apply_runlocal(config)
            # The embedded clips are 3 s: 77 frames (paper front end) -> 64 = 8 x 4 patches; 154 (code) -> 144.
            config.data.crop_frames = crop_frames_for(3.0, preset)
        # 300 steps need a target that moves faster than 0.996.
        config.model.ema_decay_init = 0.99
    return config


def get_sweep(arg=None):
    """Overrides for `launch/sweep.py`: the paper's loss (Eq. 2, L2) against the public code's (2 - 2·cos on
    standardised targets), everything else as the chosen recipe."""
    del arg
    return [{"model.loss_type": "l2", "model.target_norm": "none"},
            {"model.loss_type": "norm_mse", "model.target_norm": "standardize"}]
