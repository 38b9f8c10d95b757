"""Teacher/student self-distillation over prototypes (DINO; MATPAC's classification loss), as pure functions.

Facts: shared/reference/jepa_family.md §4.2. Teacher logits t and student logits s are [..., K] (any
leading token axes). The teacher distribution is softmax((t - c) / T_t) with a centre c kept as an EMA of
batch means (of the teacher logits as in DINO, or of the teacher *probabilities* as in the MATPAC code);
the student's is softmax(s / T_s); the loss is their cross-entropy averaged over tokens. All in float32.
"""

import jax
import jax.numpy as jnp

CENTER_SOURCES = ("logits", "probabilities")


def teacher_temperature(step, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> jax.Array:
    """T_t(step): linspace(start, end, warmup_steps)[step] during warm-up, `end` afterwards.

    That is start + (end - start) · step / (warmup_steps - 1) for step < warmup_steps (the MATPAC code's
    per-update schedule); warmup_steps ≤ 1 means `end` from step 0. `step` may be traced.
    """
    step = jnp.asarray(step, jnp.float32)
    if warmup_steps <= 1:
        return jnp.asarray(end, jnp.float32) + 0.0 * step
    fraction = jnp.clip(step / (warmup_steps - 1), 0.0, 1.0)
    return jnp.asarray(start, jnp.float32) + (end - start) * fraction


def teacher_probabilities(teacher_logits: jax.Array, center: jax.Array, temperature) -> jax.Array:
    """softmax((t - c) / T_t) over the last axis: [..., K] → [..., K]."""
    return jax.nn.softmax((teacher_logits.astype(jnp.float32) - center) / temperature, axis=-1)


def student_log_probabilities(student_logits: jax.Array, temperature) -> jax.Array:
    """log_softmax(s / T_s) over the last axis: [..., K] → [..., K]."""
    return jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)


def cross_entropy(teacher_probs: jax.Array, student_log_probs: jax.Array) -> jax.Array:
    """mean over tokens of -Σ_k p_t,k · log p_s,k (nats): [..., K] × [..., K] → scalar."""
    return -jnp.mean(jnp.sum(teacher_probs * student_log_probs, axis=-1))


def batch_center(teacher_logits: jax.Array, teacher_probs: jax.Array, center_from: str) -> jax.Array:
    """The batch statistic the centre moves towards: the mean over every token of the logits or probabilities.

    [..., K] → [K]. Under jit over a data-sharded batch this is the global mean (XLA inserts the all-reduce).
    """
    if center_from == "logits":
        source = teacher_logits
    elif center_from == "probabilities":
        source = teacher_probs
    else:
        raise ValueError(f"center_from={center_from!r}; valid: {CENTER_SOURCES}")
    source = source.astype(jnp.float32)
    return source.reshape(-1, source.shape[-1]).mean(axis=0)


def update_center(center: jax.Array, batch_mean: jax.Array, momentum: float = 0.9) -> jax.Array:
    """c ← m · c + (1 - m) · batch mean, [K]."""
    return momentum * center + (1.0 - momentum) * batch_mean


def entropy(probs: jax.Array) -> jax.Array:
    """Mean over tokens of -Σ p log p (nats), [..., K] → scalar; 0·log 0 counts as 0."""
    return -jnp.mean(jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1))


def collapse_metrics(teacher_probs: jax.Array, student_log_probs: jax.Array) -> dict[str, jax.Array]:
    """Collapse monitors of one batch (no gradient), all scalars:

    teacher_entropy: mean per-token entropy of the teacher (→ 0 when sharpening wins, → log K when
        centering wins and every token is uniform).
    teacher_marginal_entropy: entropy of the batch-mean teacher distribution (→ 0 when every token picks
        the same prototype; log K when usage is even).
    kl_teacher_student: mean per-token KL(p_t ‖ p_s) = cross-entropy - teacher entropy.
    prototypes_used: number of prototypes that are the teacher's argmax for at least one token.
    """
    teacher_probs = jax.lax.stop_gradient(teacher_probs.astype(jnp.float32))
    student_log_probs = jax.lax.stop_gradient(student_log_probs)
    flat = teacher_probs.reshape(-1, teacher_probs.shape[-1])
    teacher_entropy = entropy(flat)
    marginal = entropy(flat.mean(axis=0))
    kl = cross_entropy(teacher_probs, student_log_probs) - teacher_entropy
    # A reduction rather than a scatter of argmax indices: it stays a plain all-reduce when the tokens are
    # sharded over devices. (Exact ties would count every tied prototype; they do not occur in float32.)
    is_argmax = flat == flat.max(axis=-1, keepdims=True)
    used = jnp.any(is_argmax, axis=0).sum().astype(jnp.float32)
    return {"teacher_entropy": teacher_entropy, "teacher_marginal_entropy": marginal,
            "kl_teacher_student": kl, "prototypes_used": used}
