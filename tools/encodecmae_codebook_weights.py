r"""EncodecMAE's per-codebook loss weights γ_q from the quantization errors of precomputed EnCodec targets.

    python tools/encodecmae_codebook_weights.py --targets=/data/targets/as_24k [--rule=residual] \
        [--num_codebooks=8] [--output=gamma.json]

Reads `quantization_error` (e_0 .. e_{n_q}: mean squared RVQ residual after 0 .. n_q codebooks) from the
manifest tools/precompute_encodec_targets.py wrote, computes γ_q with
encodecmae_loss.codebook_weights_from_errors (rules: "residual", γ_q ∝ e_{q−1}; "error_reduction",
γ_q ∝ e_{q−1} − e_q), and prints them next to the reference's hard-coded values with the override line
for the config. The reference computes nothing (shared/reference/encodecmae.md §1.9): its γ_q are
constants; this is for another codec, data set or n_q.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.data import shards, target_records  # noqa: E402
from audiojepa.methods import encodecmae_loss  # noqa: E402

flags.DEFINE_string("targets", None, "Folder of precomputed EnCodec targets (its manifest.json is read).")
flags.DEFINE_enum("rule", "residual", list(encodecmae_loss.WEIGHT_RULES), "How γ_q follow from the errors.")
flags.DEFINE_integer("num_codebooks", None, "Use the first n_q codebooks (default: all stored).")
flags.DEFINE_string("output", "", "Also write the result as JSON to this file.")
flags.mark_flags_as_required(["targets"])
FLAGS = flags.FLAGS


def codebook_weights(manifest: dict, where: str, *, rule: str, num_codebooks: int | None) -> dict:
    """{"quantization_error", "codebook_weights", "override", ...} for a targets manifest (at `where`)."""
    if manifest.get("kind") != target_records.KIND:
        raise ValueError(f"{where} is not an {target_records.KIND} manifest (kind={manifest.get('kind')!r}); "
                         "write one with tools/precompute_encodec_targets.py")
    errors = manifest.get("quantization_error")
    if not errors:
        raise ValueError(f"{where} has no quantization_error (no clip could be encoded); see its 'skipped' list")
    stored = len(errors) - 1
    n_q = stored if num_codebooks is None else num_codebooks
    if not 1 <= n_q <= stored:
        raise ValueError(f"--num_codebooks={n_q}; {where} has errors for 1..{stored} codebooks")
    weights = encodecmae_loss.codebook_weights_from_errors(errors[:n_q + 1], rule)
    values = ",".join(f"{w:.8g}" for w in weights)
    override = f"--config.model.num_codebooks={n_q} --config.model.codebook_weights='({values},)'"
    return {"targets": os.path.dirname(os.path.abspath(where)), "rule": rule, "num_codebooks": n_q,
            "quantization_error": list(errors[:n_q + 1]), "codebook_weights": weights.tolist(), "override": override}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    where = os.path.join(FLAGS.targets, shards.MANIFEST)
    result = codebook_weights(shards.read_manifest(FLAGS.targets), where, rule=FLAGS.rule,
                              num_codebooks=FLAGS.num_codebooks)
    reference = encodecmae_loss.REFERENCE_CODEBOOK_WEIGHTS
    print(f"γ_q from {where} (rule {FLAGS.rule!r}); e_0 = {result['quantization_error'][0]:.6g}")
    print("| q | e_q (residual after q codebooks) | γ_q | reference γ_q |")
    print("|---:|---:|---:|---:|")
    for q, weight in enumerate(result["codebook_weights"], start=1):
        ref = f"{reference[q - 1]:.6f}" if q <= len(reference) else "-"
        print(f"| {q} | {result['quantization_error'][q]:.6g} | {weight:.6f} | {ref} |")
    print(result["override"])
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
