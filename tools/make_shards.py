r"""Decodes a folder or CSV/TSV of audio files into ArrayRecord shards with a manifest.

    python tools/make_shards.py --input /data/audioset/wav --output /data/shards/as2m \
        --sample_rate 16000 --format pcm16 --workers 8

Audio formats (`audiojepa.data.audio_io.AUDIO_EXTENSIONS`): wav, flac, aiff, ogg/opus, mp3 and the rest of what
libsndfile reads, and through PyAV (FFmpeg's decoders, in the `av` wheel) m4a/mp4 (AAC), webm, mkv/mka, mov, aac,
wma, ...: a video file gives its audio track. Each is downmixed to mono and resampled to --sample_rate.

Bad files (unreadable, truncated, empty, silent, NaN, too short, non-audio extension, or one whose
decoding process dies: "decoder crashed") are skipped and listed under "skipped" in
OUTPUT/manifest.json; they never abort the run, but a run that writes no clip at all fails (exit 1)
naming the input and listing the first skipped files. Symlinked folders are followed once (a loop or a
second path to a folder is listed as "repeated folder"); a folder that cannot be read is listed as
"unreadable folder"; a FIFO, socket or device is listed as "not a regular file" and never opened.
The output is a deterministic function of the input, whatever --workers: re-running with --overwrite
writes the same shards. The set is written next to
OUTPUT and swapped in when complete, so an interrupted run leaves the previous set untouched.

One run at a time writes an OUTPUT: a second one fails at once naming the output and the first one's pid
(a lock file .OUTPUT.lock beside it). Decoding processes die with the run, even when it is SIGKILLed;
SIGTERM stops it cleanly. The next run removes the staging folder a killed run leaves (.OUTPUT.tmp-*)
and says so.
"""

import json
import os
import signal
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.data import shards  # noqa: E402

flags.DEFINE_string("input", None, "Folder (searched recursively for the extensions in audio_io.AUDIO_EXTENSIONS) "
                    "or CSV/TSV whose first column is an audio path.")
flags.DEFINE_string("output", None, "Output folder for shard-*.array_record and manifest.json.")
flags.DEFINE_integer("sample_rate", 16000, "Sample rate of the stored audio, Hz (> 0).", lower_bound=1)
flags.DEFINE_enum("format", "pcm16", ["pcm16", "flac"], "Audio codec inside each record.")
flags.DEFINE_integer("num_shards", None, "Number of shards (default: one per ~1024 clips).")
flags.DEFINE_integer("workers", os.cpu_count() or 1, "Decoding processes (0 = decode in this process).")
flags.DEFINE_float("min_seconds", 0.0, "Skip clips shorter than this, in seconds.")
flags.DEFINE_float("segment_seconds", None, "Cut files longer than this into consecutive records of this many "
                   "seconds (e.g. 10, as AudioSet's clips), so a long recording is sampled per segment rather than "
                   "once per file; a last piece under --min_seconds and silent segments are dropped and counted in the "
                   "manifest (segments_dropped).")
flags.DEFINE_float("max_seconds", shards.DEFAULT_MAX_SECONDS, "Skip files longer than this, in seconds (each is "
                   "decoded whole in memory; 0: no limit).")
flags.DEFINE_bool("overwrite", False, "Replace an existing shard set in --output (and its log-mel statistics) "
                  "once the new one is complete; without it, an existing set is an error.")
flags.mark_flags_as_required(["input", "output"])
FLAGS = flags.FLAGS


def _exit_on_sigterm(signum, frame):
    """SIGTERM (e.g. from a job scheduler) ends the run as Ctrl-C does: the workers stop, the unfinished set
    is deleted, and the output is as before."""
    del frame
    raise SystemExit(128 + signum)


def main(argv):
    del argv
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        manifest = shards.make_shards(
            FLAGS.input, FLAGS.output, sample_rate=FLAGS.sample_rate, codec=FLAGS.format,
            num_shards=FLAGS.num_shards, workers=FLAGS.workers, min_seconds=FLAGS.min_seconds,
            max_seconds=FLAGS.max_seconds or None, segment_seconds=FLAGS.segment_seconds,
            overwrite=FLAGS.overwrite)
    except (shards.NoClipsError, shards.OutputLockedError, FileExistsError) as e:  # the message says it all
        sys.exit(f"make_shards: {e}")
    reasons = {}
    for item in manifest["skipped"]:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    logging.info("%d clips, %.2f hours, %d shards; skipped %s", manifest["num_clips"],
                 manifest["total_hours"], len(manifest["shards"]), json.dumps(reasons) if reasons else "none")


if __name__ == "__main__":
    app.run(main)
