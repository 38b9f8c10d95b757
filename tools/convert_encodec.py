r"""Converts an EnCodec 24 kHz PyTorch state dict into audiojepa params for the frozen encoder and RVQ.

    python tools/convert_encodec.py --input encodec_24khz-d7cc33bc.th --output /ckpt/encodec_24khz
    python tools/convert_encodec.py --input ../shared/fixtures/encodec/encodec24k_random_state.npz --output /tmp/ec

Reads a `.npz` of name -> array (no torch needed) or, with the optional torch extra installed
(`pip install -e ".[torch]"`), a `.th`/`.pt` state dict (loaded with `weights_only=True`). Weight norm
is resolved; the decoder and the codebooks' training buffers are dropped. Writes `params.msgpack` and
`encodec.json` into OUTPUT; `audiojepa.models.encodec_torch.load_params(OUTPUT)` reads them back as
{"encoder": ..., "codebooks": [32, 1024, 128]} for `audiojepa.models.encodec.encode`.
"""

from absl import app, flags, logging

from audiojepa.models import encodec_torch

flags.DEFINE_string("input", None, "EnCodec 24 kHz state dict: .th/.pt (needs torch) or .npz.")
flags.DEFINE_string("output", None, "Output folder for params.msgpack and encodec.json.")
flags.mark_flags_as_required(["input", "output"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        state_dict = encodec_torch.load_state_dict(FLAGS.input)
    except (ImportError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    params = encodec_torch.convert(state_dict)
    encodec_torch.save_params(params, FLAGS.output, source=FLAGS.input)
    logging.info("EnCodec 24 kHz encoder + %d codebooks from %s -> %s", params["codebooks"].shape[0], FLAGS.input,
                 FLAGS.output)


if __name__ == "__main__":
    app.run(main)
