r"""EncodecMAE (Pepino et al.): a masked autoencoder over EnCodec frames predicting EnCodec's RVQ codes.

The reference recipe (shared/reference/encodecmae.md §1.10-1.11): base model (10 encoder layers,
768 wide, 12 heads, 2-layer decoder), random 4 s crops of 24 kHz mono audio (300 EnCodec frames),
50% of frames masked in spans of 15, 8 codebooks (6 kbps) as targets with the reference γ_q and
δ = 0.9, AdamW lr 1e-4 constant (no warm-up, no decay), betas (0.9, 0.95), wd 0.05 on every
parameter, batch 128, 500k steps; then 150k steps of self-training on k-means targets.

EnCodec's weights are not downloaded: get the 24 kHz checkpoint of `encodec` 0.1.1 yourself
(`encodec_24khz-d7cc33bc.th`, the file `EncodecModel.encodec_model_24khz(pretrained=True)` fetches
into torch's hub cache), convert it once and point the config at it:

    python tools/convert_encodec.py --input encodec_24khz-d7cc33bc.th --output /ckpt/encodec24k
    python tools/make_shards.py --input /data/audioset --output /data/shards/as_24k --sample_rate 24000
    python -m audiojepa.main --config=configs/encodecmae.py --workdir=/ckpt/encodecmae_base \
        --config.data.shards=/data/shards/as_24k --config.model.encodec_checkpoint=/ckpt/encodec24k

Self-training (k-means of the stage-1 encoder's last-layer features on 10,000 frames drawn from
10,000 random crops, then `config.self_training_steps` = 150k steps with the k-means stream added as a
target), one command:

    python -m audiojepa.selftrain --config=configs/encodecmae.py --stage1_workdir=/ckpt/encodecmae_base \
        --workdir=/ckpt/encodecmae_base_st --config.data.shards=/data/shards/as_24k \
        --config.model.encodec_checkpoint=/ckpt/encodec24k

The large model's k-means teacher is the base self-trained model (paper §2.3 "as in HuBERT, for the large
model we train the k-means model using activations from the base model after self-training"; v1
scripts/run_pretraining.sh:57-65 does the same): `--teacher_workdir` takes the teacher from another run of
any size (its config is read from its checkpoint; the student still starts from its own stage 1):

    python -m audiojepa.selftrain --config=configs/encodecmae.py:size=large --stage1_workdir=/ckpt/encodecmae_large \
        --teacher_workdir=/ckpt/encodecmae_base_st --workdir=/ckpt/encodecmae_large_st \
        --config.data.shards=/data/shards/as_24k --config.model.encodec_checkpoint=/ckpt/encodec24k

  The centroids are then 1024 x 768 (the base width) and the frozen teacher in target_params is the base
  encoder; `selftrain.json` in the workdir records the teacher run, its step and architecture.

Precomputed targets: EnCodec runs once over the shards instead of in every step (the step then trains
the MAE only; tools/bench_encodecmae_targets.py measures the saving). Point data.shards at the output,
with the EnCodec that made it (a mismatch, or num_codebooks beyond the stored ones, is an error):

    python tools/precompute_encodec_targets.py --input=/data/shards/as_24k --output=/data/targets/as_24k \
        --encodec_checkpoint=/ckpt/encodec24k
    python -m audiojepa.main --config=configs/encodecmae.py --workdir=/ckpt/encodecmae_base \
        --config.data.shards=/data/targets/as_24k --config.model.encodec_checkpoint=/ckpt/encodec24k

  Crops are whole 75 Hz frames of clips encoded whole (up to 30 s chunks): one starting at a clip's first
  sample has exactly the on-device targets, a later one also sees the audio before it
  (audiojepa/data/encodec_targets.py). `python tools/encodecmae_codebook_weights.py
  --targets=/data/targets/as_24k` prints γ_q from the targets' quantization errors as a config override.

CPU smoke run on the embedded corpus (tiny model, 1 s crops, batch 16, 300 steps) with seeded RANDOM
EnCodec weights: it proves the pipeline runs end to end, but the representations are meaningless
without the real EnCodec checkpoint:

    python -m audiojepa.main --config=configs/encodecmae.py:runlocal --workdir=/tmp/encodecmae_runlocal
    python -m audiojepa.selftrain --config=configs/encodecmae.py:runlocal \
        --stage1_workdir=/tmp/encodecmae_runlocal --workdir=/tmp/encodecmae_selftrain

  Measured on 2 CPU cores (embedded corpus version 1): stage 1 took 4m24s (~20 clips/s; the 24 kHz corpus is generated once,
  ~20 s), loss 6.84 at step 20 -> 6.53 at step 300 (ln 1024 = 6.93), masked code accuracy 0.9% ->
  2.5%; self-training (100 steps, `config.self_training_steps` in runlocal) took 2m03s with the k-means
  (64 clusters, 10,000 frames) in seconds: loss_kmeans 3.82 -> 2.54, masked k-means accuracy 9% -> 28%.
  (Measured when the k-means frames came from the first batch of crops; they are now drawn from all
  frames of --num_clips=10,000 crops, capped at the corpus's 1,000 clips.)
  `python -m audiojepa.evaluate --encoder=/tmp/encodecmae_selftrain --task=embedded:num_clips=600,duration_s=2
  --output=/tmp/encodecmae_eval` reports it: linear 12.5 +- 4.4, kNN 16.1 (random init 13.7 / 8.9,
  log-mel 32.7 / 26.8): chance level, as expected from random EnCodec weights.

Speed and memory options (the param tree, hence checkpoints, is the same whatever they are set to):
`--config.model.dtype=bfloat16`: bfloat16 matmuls; params, norms, softmax and loss stay float32.
`--config.model.attention_impl=cudnn`: cuDNN's fused attention (NVIDIA GPU and bfloat16 only; default XLA).
`--config.model.remat=block|dots`: recompute block activations in the backward pass (less memory, more compute).
`--config.model.scan_layers=False`: unroll the transformer blocks instead of one lax.scan over them (default True).
`--config.model.residual_dtype=bfloat16` (with dtype bfloat16): a bfloat16 residual stream (EncodecMAE: with `stack_type='pre_ln'` only); faster on GPU, not the same numbers.

Arguments (`:arg`): `runlocal`, `size=tiny|small|base|large`, `targets=codes|codes+kmeans|kmeans`,
`recipe=paper|code`.

Paper (Pepino et al. 2024) vs released code (habla-liaa/encodecmae v1 tag, shared/reference/encodecmae.md);
`recipe=code` is the default: the released checkpoints and the v1 code (tagged as the paper's setup) share
one FFN per stack and have no mask token, so a run of this default is comparable with them (and with every
run made before the recipe argument existed). `recipe=paper` builds the model the paper's text describes
(`--config=configs/encodecmae.py:recipe=paper`, or `:runlocal,recipe=paper` for the CPU smoke run):
- `config.model.share_ffn` (paper False / code True): one FFN per transformer layer. The paper never
  mentions sharing; its Table 1 counts (51M / 94M / 269M) need per-layer FFNs. The code builds one FFN and
  hands it to every layer (transformers/__init__.py:156-171, §1.7).
- `config.model.learned_mask_token` (paper True / code False): paper §2.2 "The mask token is a shared
  embedding learned during training" (init N(0, 0.02²)); the code re-inserts zeros (v1 masking.py:41-44,
  §1.5), so a masked frame's decoder input is its position code alone.
Everything else is one value (both agree, or the paper is silent and the code decides: the ResiDual stack,
heads, FFN width, span sampling, γ_q, δ, the optimiser).

Parameter counts (`audiojepa.methods.encodecmae.inference_param_count`; tests/test_encodecmae_recipes.py
checks them against a closed form). Table 1 does not say what #Par counts; its "EC" row (7.4M = EnCodec's
encoder alone) and the random base model (ECMAE-R, 94M, used only as a feature extractor) point to the
feature extractor a downstream task runs: the frozen EnCodec encoder plus the MAE encoder (input
projection, position scale, layers, final LayerNorm), without the decoder, mask token and heads. Per
ResiDual layer of width D (12 heads of ⌊D/12⌋ channels, bias-free Q/K/V/out): attention 4·D·12⌊D/12⌋,
two LayerNorms 4·D, FFN 2·D·4096 + 4096 + D: 8,658,688 at D = 768 (2,359,296 + 3,072 + 6,296,320) and
12,575,744 at D = 1024 (4,177,920 + 4,096 + 8,393,728). Encoder extras 128·D + D + 1 + 2·D (100,609 /
134,145); EnCodec's encoder 7,423,472 (weight norm resolved; torch stores g and v: 7,425,792).
  recipe=paper (per-layer FFN):  small 5·8,658,688 + 100,609 + 7,423,472 = 50.8M (Table 1: 51M, -0.4%);
    base 10·8,658,688 + 100,609 + 7,423,472 = 94.1M (94M, +0.1%); large 20·12,575,744 + 134,145 +
    7,423,472 = 259.1M (269M, -3.7%).
  recipe=code (one FFN per stack, counted once): 25.6M / 37.4M / 99.6M.
  Ambiguous: no reading gives the large model's 269M while keeping 51M and 94M (adding the heads gives
  267.5M for large but 100.4M for base, +6.8%; adding the per-layer-FFN decoder, 285.3M for large); the 10M
  gap is unexplained. torch's state_dict repeats the shared FFN under every layer (§1.7), so counting a
  state_dict of the released model gives the per-layer numbers: the paper's counts may come from that
  (inferred, not verified), which is one more reason the default is the code.
"""

import ml_collections
from ml_collections import config_dict

from audiojepa.config_utils import adamw_config, data_config, parse_arg, run_config
from audiojepa.methods import encodecmae

RECIPES = ("paper", "code")


def get_config(arg=None):
    arg = parse_arg(arg, size="base", runlocal=False, targets="codes", recipe="code")
    if arg.recipe not in RECIPES:
        raise ValueError(f"config arg recipe={arg.recipe!r}; valid: {RECIPES}.")
    config = run_config("encodecmae", batch_size=128, seed=42)
    config.recipe = arg.recipe
    config.total_steps = 500_000
    config.self_training_steps = 150_000  # stage 2 (python -m audiojepa.selftrain), from step 0 in its own workdir
    config.warmup_steps = 0
    config.checkpoint_every_steps = 10_000
    config.keep_every_steps = 50_000  # the reference checkpoints every 50k steps
    # EnCodec's 75 Hz frame grid at 24 kHz (the model takes raw waveforms, so no normalisation);
    # 300 frames = 4 s = 96,000 samples.
    config.data = data_config("encodec", 300, norm_stats="0,1")

    config.model = encodecmae.default_config(arg.size)
    config.model.targets = arg.targets
    config.model.stage1_params = ""  # set by audiojepa.selftrain: the stage-1 params the student starts from
    # config.model.teacher_params / teacher_size / teacher_stack_type / teacher_share_ffn (default_config): set
    # by audiojepa.selftrain --teacher_workdir; unset, the k-means teacher is the run's own stage 1.
    if arg.recipe == "paper":
        config.model.share_ffn = False  # one FFN per layer: Table 1's parameter counts
        config.model.learned_mask_token = True  # paper §2.2: "a shared embedding learned during training"
    # Speed/memory only (audiojepa/models/vit.py); none of them changes the param tree:
    config.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators (params stay float32)
    config.model.attention_impl = config_dict.placeholder(str)  # None = XLA; "cudnn" (NVIDIA GPU, bfloat16)
    config.model.remat = "none"  # "block" | "dots": rematerialise each transformer block to save memory
    config.model.scan_layers = True  # one lax.scan over the blocks (faster compile and, on CPU, step)
    config.model.residual_dtype = "float32"  # "bfloat16" (with dtype bfloat16): bf16 residual stream

    # Constant lr 1e-4 (the reference has no scheduler): no warm-up and min_lr = lr.
    config.optim = adamw_config(lr=1e-4, min_lr=1e-4, weight_decay=0.05)
    config.optim.grad_clip_norm = None

    if arg.runlocal:  # the shared CPU smoke schedule (config_utils.apply_runlocal) minus its ViT sizes
        config.batch_size = 16
        config.total_steps = 300
        config.self_training_steps = 100
        config.log_every_steps = 20
        config.checkpoint_every_steps = 100
        config.keep_every_steps = 0
        config.data.num_workers = 0
        config.data.crop_frames = 75  # 1 s
        config.data.embedded = ml_collections.ConfigDict({"num_clips": 1000, "duration_s": 2.0, "seed": 0})
        config.model.size = "tiny"
        config.model.num_clusters = 64  # k of the self-training stage
        config.optim.lr = config.optim.min_lr = 1e-3
    return config


def get_sweep(arg=None):
    """Overrides for `launch/sweep.py`: the masked-loss weight δ."""
    del arg
    return [{"model.masked_loss_weight": d} for d in (0.8, 0.9, 1.0)]
