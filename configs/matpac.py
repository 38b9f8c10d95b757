r"""MATPAC (Quelennec et al.): M2D plus a teacher/student classification of the masked tokens.

The MATPAC code's recipe (matpac.yaml): ViT-B/16 on 80x608 log-mels (6.08 s, 16 kHz, center=False),
mask ratio 0.7, batch 2048, 300 epochs with 20 warm-up, AdamW (0.9/0.95, eps 1e-6, wd 0.05, clip 3)
with a peak lr of 3e-4 (fairseq's absolute lr, not M2D's 3e-4 x batch/256 = 2.4e-3), encoder EMA
0.99995 -> 0.99999, a 2048-prototype head with teacher
temperature 0.04 -> 0.07 over 10 epochs, centre momentum 0.9 (on probabilities), head EMA 0.998 -> 1,
loss 0.5 L_cls + 0.5 L_pred:

    python tools/make_shards.py --input /data/audioset --output /data/shards/as2m --workers 16
    python tools/compute_stats.py --shards /data/shards/as2m --frontend matpac --crop_frames 608
    python -m audiojepa.main --config=configs/matpac.py --workdir=/ckpt/matpac_vitb \
        --config.data.shards=/data/shards/as2m

  About 295k steps on AudioSet-2M. Collapse shows in the metrics as prototypes_used -> 1 with
  teacher_marginal_entropy -> 0 (one prototype wins), or teacher_entropy -> log K = 7.6 (uniform).

CPU smoke run on the embedded corpus (tiny ViT, 256-prototype head, 1500 steps of batch 32 as M2D's
runlocal, 80x208 crops):

    python -m audiojepa.main --config=configs/matpac.py:runlocal --workdir=/tmp/matpac_runlocal

  On 2 CPU cores about 6 minutes (plus ~15 s to generate the corpus on first use). Measured
  2026-11-30 (6m11s): loss 3.24 at step 20 -> 2.20 at step 300 -> 1.70 at step 1500 (loss_pred
  0.18 and loss_cls 3.22 nats at the end), ~33 of the 256 prototypes in use, teacher entropy ~3.1 nats,
  marginal ~4.2 (log K = 5.5). Evaluate with
  `python -m audiojepa.evaluate --encoder=/tmp/matpac_runlocal --task=embedded --output=/tmp/matpac_eval`
  (measured: linear probe 74.8 +- 1.3, kNN 60.1; random init 58.0 / 36.1; log-mel 42.2 / 51.4).
  Before the stacked block params changed the init draws: loss 1.53 at step 1500 (loss_cls 2.88),
  ~37 prototypes, linear 76.2 +- 3.2, kNN 60.1.

Speed and memory options (the param tree, hence checkpoints, is the same whatever they are set to):
`--config.model.dtype=bfloat16`: bfloat16 matmuls; params, norms, softmax and loss stay float32.
`--config.model.attention_impl=cudnn`: cuDNN's fused attention (NVIDIA GPU and bfloat16 only; default XLA).
`--config.model.remat=block|dots`: recompute block activations in the backward pass (less memory, more compute).

Arguments (`:arg`): `runlocal`, `variant=tiny|S|B|L`, `mask_ratio=0.7`, `center_from=probabilities|logits`.
"""

import os

from audiojepa.config_utils import load_config_module, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, variant="B", runlocal=False, mask_ratio=0.7, center_from="probabilities")
    # Everything M2D's recipe sets (data, schedule, optimizer, encoder, predictor, dtype/attention_impl/remat),
    # then MATPAC's changes.
    m2d_config = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "m2d.py"))
    config = m2d_config.get_config(f"variant={arg.variant},mask_ratio={arg.mask_ratio},runlocal={arg.runlocal}")
    config.method = "matpac"
    config.data.frontend = "matpac"  # M2D's front end without centre padding, as MATPAC's preprocessing

    if not arg.runlocal:  # matpac.yaml: lr 3e-4 as is (fairseq does not scale it by the batch), eps 1e-6
        config.optim.lr = 3e-4  # runlocal keeps M2D runlocal's lr 1e-3 and eps, as measured below
        config.optim.eps = 1e-6

    model = config.model
    model.norm_target = False  # MATPAC's prediction loss is 2 - 2 cos on raw target tokens
    model.num_prototypes = 2048
    model.head_hidden_dim = 2048
    model.head_bottleneck_dim = 256
    model.head_layers = 3
    model.train_prototype_gain = True  # the MATPAC code trains the weight-norm gain; DINO freezes it
    model.student_temp = 0.1
    model.teacher_temp_init = 0.04
    model.teacher_temp = 0.07
    model.teacher_temp_warmup_epochs = 10.0
    model.center_momentum = 0.9
    model.center_from = arg.center_from  # "probabilities" (MATPAC code) or "logits" (DINO)
    model.head_ema_decay_init = 0.998
    model.head_ema_decay = 1.0
    model.pred_loss_weight = 0.5  # alpha: loss = (1 - alpha) L_cls + alpha L_pred

    if arg.runlocal:  # m2d.py:runlocal already set the tiny encoder, 1500 steps and the fast EMA
        model.num_prototypes = 256
        model.head_hidden_dim = 256
        model.head_bottleneck_dim = 64
        model.teacher_temp_warmup_epochs = 1.0
    return config


def get_sweep(arg=None):
    """Overrides for `launch/sweep.py`: the code-vs-DINO choices and the loss weight."""
    del arg
    return [{"model.center_from": c, "model.train_prototype_gain": g}
            for c in ("probabilities", "logits") for g in (True, False)]
