r"""Builds a real-audio dev benchmark from audio that Debian packages ship: an unlabelled corpus and labelled tasks.

    python tools/make_dev_benchmark.py --output /data/devbench --download

needs these packages from the apt registry (~650 MB of .deb files), downloaded and unpacked into --cache without
root (`--download` does this, skipping what the cache already holds):

    cd CACHE/debs && apt-get download lmms-common openarena-data warzone2100-music frozen-bubble-data \
        pingus-data sound-theme-freedesktop alsa-utils megaglest-data wesnoth-1.16-data ktuberling-data \
        klettres-data freepats
    dpkg-deb -x CACHE/debs/PKG_*.deb CACHE/PKG     # for each PKG

It writes

    OUTPUT/corpus/<package>/<path>            unlabelled pretraining audio (music, speech, effects): give the folder
                                              to tools/make_shards.py --input
    OUTPUT/tasks/<task>/labels.csv            filename,label,split (train/valid/test), filename relative to the task
    OUTPUT/tasks/<task>/audio/<package>/<path>
    OUTPUT/tasks/<task>_folds/labels.csv      the same clips (filename ../<task>/audio/...), filename,label,fold:
                                              up to 5 folds of whole source groups; leave-one-fold-out scores
                                              every clip, so differences of a few points can be told from noise
    OUTPUT/benchmark.json                     packages and versions, the rules below, the split of every source
                                              group, counts and hours, the files skipped and why

Labels come from file paths through the rule tables below (`TASK_RULES`, `CORPUS_RULES`, `EXCLUDED`). Each
rule also names the clip's *source group* (a weapon, a footstep surface, a sample family such as "snare_hiphop"):
whole groups are assigned to train/valid/test, never single clips, so no recording, voice or sample family is
on both sides of a split. Assignment is a seeded shuffle of each label's sorted groups (--seed); file lists are
sorted, so the output is a deterministic function of the packages and the seed. A task file is never in the
corpus, and the corpus takes no file from a folder a task draws on. Files that do not decode
(`audiojepa.data.audio_io.load_clip`) are skipped and listed; a label with fewer than two source groups is
dropped (listed under "dropped_labels"), since it could not be tested on an unseen source.

From Debian bookworm's packages (lmms-common 1.2.2+dfsg1-6, openarena-data 0.8.5split-14, warzone2100-music
4.3.3-3, megaglest-data 3.13.0-3, wesnoth-1.16-data 1:1.16.9-1, ktuberling-data and klettres-data 4:22.12.3-1, ...)
it writes a corpus of 3973 files, 6.8 hours, in about 2 minutes: music 4.8 h (4.05 h of it the Warzone 2100
soundtrack), speech 1.34 h (spoken words, letters and syllables in ~25 languages), effects 0.7 h; and six tasks:
unit_sound (596 clips: a MegaGlest unit's spoken acknowledgement, weapon attack or death cry; split by faction, so no
voice actor is on both sides; test 78 clips), gm_family (342 clips: freepats' recorded notes by General MIDI family,
9 labels from piano to pipe; split by instrument, so test instruments are unheard; test 64), battle_sound (226
clips: Wesnoth creature cries, weapons, spells; test 45), game_sfx (142 clips, 4 labels: weapon, footstep,
ambience, voice), drum_type (53 clips, 5 labels) and instrument_family (45 clips, 5 labels). The last two are
small (11-13 test clips): their scores are noisy. (freepats 20060219-4 added in session 17; the corpus and the
other tasks are byte for byte what the five-task version wrote.)
Six files do not decode (five LMMS .ogg files that are broken WAVs, one silent file) and are listed. Give the
corpus to `tools/make_shards.py --segment_seconds 10` so that the long soundtrack files are sampled per
10-second segment, not once per file.

Sources kept aside for an independent check are never read: the FluidR3, TimGM6mb and MuseScore soundfonts,
espeak-ng, flite, festival voices (so also OpenArena's "festivoxmale" voice pack, made with Festival), asterisk
sounds, hedgewars, hydrogen drumkits and sonic-pi samples.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.data.dev_benchmark import DEFAULT_CACHE, MissingPackageError, build, download  # noqa: E402

flags.DEFINE_string("output", None, "Folder to write corpus/, tasks/ and benchmark.json into (new or empty).")
flags.DEFINE_string("cache", DEFAULT_CACHE, "Folder holding the unpacked packages, CACHE/<package>/.")
flags.DEFINE_bool("download", False, "apt-get download + dpkg-deb -x the packages missing from --cache.")
flags.DEFINE_integer("seed", 0, "Seed of the train/valid/test assignment of source groups.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not FLAGS.output:
        sys.exit("make_dev_benchmark: --output is required")
    if FLAGS.download:
        download(FLAGS.cache)
    try:
        build(FLAGS.output, FLAGS.cache, FLAGS.seed, log=print)  # the summary is the tool's output
    except (MissingPackageError, FileExistsError) as e:
        sys.exit(f"make_dev_benchmark: {e}")


if __name__ == "__main__":
    app.run(main)
