"""The real-audio dev benchmark: rule tables and the builder behind tools/make_dev_benchmark.py (its docstring
has the command, the packages and what it writes).

An unlabelled corpus and labelled task folders from audio that Debian packages ship, unpacked into a cache. Labels
come from file paths through `TASK_RULES`, `CORPUS_RULES` and `EXCLUDED`; whole source groups go to train / valid /
test (`assign_splits`), so no recording, voice or sample family is on both sides of a split. Each task has a
`<task>_folds` twin over the same clips, one fold per set of source groups (`assign_folds`): leave-one-fold-out
tests every clip once, so its scores rest on all the clips, not on a test split of 11-78. `build` is a
deterministic function of the packages and the seed.

Two kinds of container are listed like folders: a .pk3 (zip) archive's audio members, and a GUS patch's recorded
notes (`<patch>.pat/sampleNN.wav`, audiojepa.data.gus_patch), each rendered as a note held for
`NOTE_SECONDS` (its data, then its loop repeated, faded out).
"""


from __future__ import annotations

import collections
import csv
import glob
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import zipfile

import soundfile as sf

from audiojepa.data import audio_io, gus_patch

PACKAGES = ("lmms-common", "openarena-data", "warzone2100-music", "frozen-bubble-data", "pingus-data",
            "sound-theme-freedesktop", "alsa-utils", "megaglest-data", "wesnoth-1.16-data", "ktuberling-data",
            "klettres-data", "freepats")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "audiojepa", "dev_benchmark")
SAMPLE_RATE = 16000  # Hz, only to check that a file decodes and to measure its duration
VERSION_FILE = ".deb-version"  # written next to an unpacked package: the .deb's Version field
ARCHIVE_EXTENSIONS = (".pk3",)  # zip archives (Quake 3 engine data) whose members are listed as files
PATCH_EXTENSIONS = (".pat",)  # GUS patches: their note samples are listed as members sampleNN.wav
NOTE_SECONDS = 1.0  # a patch's note rendered as a key held this long (every note clip the same length)
SPLIT_FRACTIONS = {"valid": 0.2, "test": 0.2}  # of each label's source groups; the rest is train
FOLDS = 5  # of a task's `_folds` twin, at most (fewer where a label, or a shared-split task, has fewer groups)

_LMMS = "usr/share/lmms/samples/"
_OA = "usr/share/games/openarena/"
_MG = "usr/share/games/megaglest/"
# The MegaGlest factions whose units have spoken acknowledgements, weapon attacks and death sounds of their own.
# The "magic" faction is left out: its units' attacks are spells, another kind of sound under the same label,
# which made a split with magic as the test faction measure the label's meaning rather than the encoder.
_MG_FACTIONS = "egypt|indian|norsemen|persian"
_MG_UNIT_SOUND = _MG + r"techs/megapack/factions/(?P<group>" + _MG_FACTIONS + r")/units/[a-z_]+/sounds/(?:[a-z_]+_)?"
_WN = "usr/share/games/wesnoth/1.16/data/core/sounds/"
_WN_WEAPONS = ("axe|bow|club|crossbow|dagger|dart|flail|hatchet|throwing-knife|knife|mace|spear|staff|sword|sling|"
               "throw|fist|claws|bite|tail|pincers|net|torch|thunderstick|dragonstick|gunshot")
_WN_MAGIC = ("magic-[a-z]+|magicmissile|melee-fire|fire|flame|lightning|heal|entangle|water-blast|ink|mud|poison|"
             "slowed|petrified")
_FP = "usr/share/midi/freepats/Tone_000/"
# General MIDI's instrument families (program // 8) as ranges of freepats' 3-digit program prefixes.
_GM_FAMILIES = (("piano", "00[0-7]"), ("chromatic_percussion", "00[89]|01[0-5]"), ("organ", "01[6-9]|02[0-3]"),
                ("guitar", "02[4-9]|03[01]"), ("bass", "03[2-9]"), ("strings", "04[0-6]"),
                ("brass", "05[6-9]|06[0-3]"), ("reed", "06[4-9]|07[01]"), ("pipe", "07[2-9]"))
# Sample family: the file stem without its trailing number ("snare_hiphop02.ogg" -> "snare_hiphop").
_FAMILY = r"(?P<group>[a-z_]+?)_?\d*\.ogg$"

# (task, package, path regex, label, why). Paths are relative to the unpacked package; a member of a .pk3
# archive reads "<archive path>/<member>". The regex's named group `group` is the clip's source group; the
# first rule of a task that matches a path wins.
TASK_RULES = (
    # --- drum_type: one-shot drum hits of LMMS's drum folder; the group is the sample family.
    ("drum_type", "lmms-common", _LMMS + r"drums/" + r"(?=kick|bassdrum)" + _FAMILY, "kick",
     "kick*, bassdrum*: bass drum hits"),
    ("drum_type", "lmms-common", _LMMS + r"drums/" + r"(?=snare)" + _FAMILY, "snare",
     "snare*, incl. snare_rim (a snare played on the rim)"),
    ("drum_type", "lmms-common", _LMMS + r"drums/" + r"(?=hihat)" + _FAMILY, "hihat",
     "hihat_closed/opened/foot_pedal"),
    ("drum_type", "lmms-common", _LMMS + r"drums/" + r"(?=tom)" + _FAMILY, "tom", "tom, tom_hi/mid/low"),
    ("drum_type", "lmms-common", _LMMS + r"drums/" + r"(?=crash|ride)" + _FAMILY, "cymbal", "crash and ride"),
    ("drum_type", "lmms-common", _LMMS + r"drums/" + r"(?=clap)" + _FAMILY, "clap",
     "hand claps (one family only: dropped unless the package grows)"),
    # --- instrument_family: LMMS's pitched instrument samples; the group is the sample family.
    ("instrument_family", "lmms-common", _LMMS + r"basses/" + _FAMILY, "bass",
     "the basses folder: synth and electric bass notes"),
    ("instrument_family", "lmms-common", _LMMS + r"instruments/(?=bassslap)" + _FAMILY, "bass", "slap bass"),
    ("instrument_family", "lmms-common",
     _LMMS + r"instruments/(?=piano|e_piano|church_organ|e_organ|harpsichord)" + _FAMILY, "keyboard",
     "piano, electric piano, organs, harpsichord"),
    ("instrument_family", "lmms-common", _LMMS + r"(?:instruments|latin)/(?=steel_guitar|latin_guitar)" + _FAMILY,
     "guitar", "steel guitar (clean and distorted), latin guitar"),
    ("instrument_family", "lmms-common",
     _LMMS + r"(?:instruments/(?=cello|violin)|stringsnpads/(?=.*string))" + _FAMILY, "strings",
     "cello, violin, string ensembles and string pads"),
    ("instrument_family", "lmms-common", _LMMS + r"(?:instruments/(?=trumpet|flute)|latin/(?=latin_brass))" + _FAMILY,
     "wind", "trumpet, flute, latin brass"),
    # --- gm_family: freepats' recorded notes by General MIDI family; the group is the instrument (one patch), so
    # test instruments are never heard in training. Timpani (program 47, in GM's strings family) is left out (a
    # drum), and the families with one or two freepats instruments (ensemble, synth lead/pad/effects, ethnic,
    # percussive, sound effects).
    *(("gm_family", "freepats", _FP + r"(?P<group>(?:" + programs + r")_[A-Za-z0-9_-]+)\.pat/sample\d+\.wav$",
       family, f"GM programs {programs}: every note sample of each instrument's patch")
      for family, programs in _GM_FAMILIES),
    # --- game_sfx: OpenArena's sound effects by kind.
    ("game_sfx", "openarena-data", _OA + r"(?:baseoa|missionpack)/[^/]+\.pk3/sound/weapons/(?P<group>[a-z]+)/",
     "weapon", "sound/weapons/<weapon>/: firing, hum, impact; the group is the weapon"),
    ("game_sfx", "openarena-data", _OA + r"baseoa/pak0\.pk3/sound/player/footsteps/(?P<group>[a-z]+)\d*\.wav$",
     "footstep", "footsteps/<surface>N.wav: the group is the surface (boot, clank, flesh, ...)"),
    ("game_sfx", "openarena-data", _OA + r"baseoa/pak0\.pk3/sound/world/(?P<group>ambient|new)/", "ambience",
     "looping world ambiences (drones, moans); the group is the folder"),
    ("game_sfx", "openarena-data", _OA + r"baseoa/pak0\.pk3/sound/world/[a-z]*(?P<group>wind)\d*\.wav$", "ambience",
     "wind loops (wind1, wind2, demonwind01): one group"),
    ("game_sfx", "openarena-data", _OA + r"baseoa/pak0\.pk3/sound/player/(?P<group>sarge)/", "voice",
     "the Sarge player model's grunts and taunts (one voice)"),
    ("game_sfx", "openarena-data", _OA + r"missionpack/mp-pak0\.pk3/sound/voices/(?P<group>rott)/", "voice",
     "the 'rott' team-chat voice (a human voice actor)"),
    # --- unit_sound: MegaGlest units' spoken acknowledgements vs their attacks vs their death cries. The group is
    # the faction, and a faction's clips all go to one split (SHARED_SPLIT_TASKS): its voice actors are never
    # on both sides.
    ("unit_sound", "megaglest-data", _MG_UNIT_SOUND + r"(?:ack|select|sel)\d*\.(?:wav|ogg)$", "voice",
     "<unit>_ack/_select: spoken acknowledgements ('yes, my lord')"),
    ("unit_sound", "megaglest-data", _MG_UNIT_SOUND + r"attack\d*[a-z]?\.(?:wav|ogg)$", "attack",
     "<unit>_attack: weapon swings, shots, war cries"),
    ("unit_sound", "megaglest-data", _MG_UNIT_SOUND + r"die\d*\.(?:wav|ogg)$", "death", "<unit>_die: death cries"),
    # --- battle_sound: Battle for Wesnoth's combat sounds; the group is the creature, weapon or spell family.
    ("battle_sound", "wesnoth-1.16-data",
     _WN + r"(?!squishy)(?P<group>[a-z]+(?:-(?:female|old|small|big))?)-(?:die|hit|growl|shriek|laugh)(?:-\d)?"
     r"\.(?:ogg|wav)$", "creature", "<creature>-die/-hit/-growl/-shriek: cries of humans, orcs, wolves, drakes ..."),
    ("battle_sound", "wesnoth-1.16-data", _WN + r"(?P<group>" + _WN_WEAPONS + r")(?:-[a-z0-9-]*)?\.(?:ogg|wav)$",
     "weapon", "blades, bows, clubs, slings, claws, bites (incl. their -miss variants)"),
    ("battle_sound", "wesnoth-1.16-data", _WN + r"(?P<group>" + _WN_MAGIC + r")(?:-[a-z0-9-]*)?\.(?:ogg|wav)$",
     "magic", "spells: magic-*, fire, lightning, healing, entangle, ink, mud ..."),
)

# Tasks whose source groups go to one split whatever their label (assign_splits over all groups at once): a
# MegaGlest faction's voice actors speak its acknowledgements and cry its deaths.
SHARED_SPLIT_TASKS = ("unit_sound",)

# (package, path regex, kind, why): what goes into the unlabelled corpus; the first match wins.
CORPUS_RULES = (
    ("warzone2100-music", r"\.(?:ogg|opus)$", "music", "the game's soundtrack (Ogg Opus)"),
    ("frozen-bubble-data", r"snd/[^/]*zik[^/]*\.ogg$", "music", "title and in-game music ('mainzik', 'introzik')"),
    ("frozen-bubble-data", r"snd/", "effects", "game sound effects"),
    ("pingus-data", r"data/sounds/.*\.wav$", "effects", "game effects and short voiced cries"),
    ("sound-theme-freedesktop", r"stereo/audio-channel-", "speech", "spoken channel names"),
    ("sound-theme-freedesktop", r"stereo/", "effects", "desktop event sounds"),
    ("alsa-utils", r"sounds/alsa/Noise\.wav$", "effects", "speaker-test noise"),
    ("alsa-utils", r"sounds/alsa/", "speech", "spoken channel names (speaker-test)"),
    ("lmms-common", _LMMS + r"(?:beats|bassloops)/", "music", "drum and bass loops"),
    ("lmms-common", _LMMS + r"(?:effects|misc)/", "effects", "effects, crowds, metronome"),
    ("openarena-data", _OA + r"[^/]+/[^/]+\.pk3/sound/(?:misc|movers|feedback|player/announcer|items)/",
     "effects", "menus, doors, pickups, hit feedback, the announcer"),
    ("ktuberling-data", r"sounds/[a-z@_]+/[^/]+\.(?:ogg|wav)$", "speech",
     "spoken object names (hat, nose, pizza ...) in 26 languages, one speaker each"),
    ("klettres-data", r"klettres/[a-z_A-Z]+/(?:alpha|syllab)/[^/]+\.ogg$", "speech",
     "spoken letters and syllables in 25 languages"),
    ("megaglest-data", _MG + r".*/music/", "music", "faction and menu music"),
    ("megaglest-data", _MG + r"(?:tilesets/[^/]+/sounds|data/core/water_sounds)/", "effects",
     "tileset ambiences: birds, wind, rain, water"),
    ("megaglest-data", _MG + r"techs/megapack/commondata/sounds/(?![^/]*(?:ack|select|sel)\d*\.)", "effects",
     "shared unit sounds (attacks, deaths, animals, spells), without spoken acknowledgements"),
)

# (package, path regex, why): never read, even when a rule above would match.
EXCLUDED = (
    ("openarena-data", r"/sound/voices/festivoxmale/", "a Festival voice: Festival voices are kept aside"),
)

# Folders a task draws on: the corpus takes nothing under them, so a task's sound banks stay unseen.
_TASK_FOLDERS = {
    "lmms-common": (_LMMS + "drums/", _LMMS + "basses/", _LMMS + "instruments/", _LMMS + "stringsnpads/",
                    _LMMS + "latin/"),
    "openarena-data": (_OA + "baseoa/pak0.pk3/sound/weapons/", _OA + "missionpack/mp-pak0.pk3/sound/weapons/",
                       _OA + "baseoa/pak0.pk3/sound/player/footsteps/", _OA + "baseoa/pak0.pk3/sound/world/",
                       _OA + "baseoa/pak0.pk3/sound/player/sarge/", _OA + "missionpack/mp-pak0.pk3/sound/voices/"),
    "megaglest-data": tuple(f"{_MG}techs/megapack/factions/{f}/units/" for f in _MG_FACTIONS.split("|")),
    "wesnoth-1.16-data": (_WN,),
    "freepats": ("usr/share/midi/freepats/",),
}


class MissingPackageError(RuntimeError):
    """A package the benchmark needs is not unpacked in the cache."""


def apt_command(cache: str, packages=PACKAGES) -> str:
    debs = os.path.join(cache, "debs")
    return (f"mkdir -p {debs} && cd {debs} && apt-get download {' '.join(packages)} && for p in "
            f"{' '.join(packages)}; do dpkg-deb -x ${{p}}_*.deb {cache}/$p; done  "
            f"(or: python tools/make_dev_benchmark.py --download --cache {cache} ...)")


def check_packages(cache: str, packages=PACKAGES) -> None:
    missing = [p for p in packages if not os.path.isdir(os.path.join(cache, p))]
    if missing:
        raise MissingPackageError(
            f"package(s) {', '.join(missing)} not found under --cache {cache} (expected {cache}/<package>/, "
            f"an unpacked .deb). Get them with:\n  {apt_command(cache, missing)}")


def download(cache: str, packages=PACKAGES) -> None:
    """`apt-get download` + `dpkg-deb -x` for each package not yet unpacked under `cache` (no root needed)."""
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    todo = [p for p in packages if not os.path.isdir(os.path.join(cache, p))]
    fetch = [p for p in todo if not glob.glob(os.path.join(debs, f"{p}_*.deb"))]
    if fetch:
        subprocess.run(["apt-get", "download", *fetch], cwd=debs, check=True)
    for package in todo:
        deb = max(glob.glob(os.path.join(debs, f"{package}_*.deb")))
        staging = os.path.join(cache, f".{package}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", deb, staging], check=True)
        version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True, capture_output=True,
                                 text=True).stdout.strip()
        with open(os.path.join(staging, VERSION_FILE), "w") as f:
            f.write(version + "\n")
        os.replace(staging, os.path.join(cache, package))


def package_version(cache: str, package: str) -> str:
    """The unpacked package's version: from CACHE/PKG/.deb-version (--download writes it), else from the name of
    CACHE/debs/PKG_VERSION_ARCH.deb, else "unknown"."""
    try:
        with open(os.path.join(cache, package, VERSION_FILE)) as f:
            return f.read().strip()
    except FileNotFoundError:
        debs = sorted(glob.glob(os.path.join(cache, "debs", f"{package}_*_*.deb")))
        return debs[-1].rsplit("/", 1)[1].split("_")[1].replace("%3a", ":") if debs else "unknown"


def _note_name(index: int) -> str:
    return f"sample{index:02d}.wav"


def list_package(cache: str, package: str) -> list[str]:
    """Sorted paths of the audio files in an unpacked package, relative to it; .pk3 members as '<pk3>/<member>',
    a GUS patch's notes as '<pat>/sampleNN.wav'. A patch that does not parse fails naming it (gus_patch.PatchError)."""
    root = os.path.join(cache, package)
    paths = []
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            lower = name.lower()
            if lower.endswith(ARCHIVE_EXTENSIONS):
                with zipfile.ZipFile(os.path.join(root, rel)) as archive:
                    paths.extend(f"{rel}/{m}" for m in archive.namelist()
                                 if m.lower().endswith(audio_io.AUDIO_EXTENSIONS))
            elif lower.endswith(PATCH_EXTENSIONS):
                count = len(gus_patch.read_patch(os.path.join(root, rel)))
                paths.extend(f"{rel}/{_note_name(i)}" for i in range(count))
            elif lower.endswith(audio_io.AUDIO_EXTENSIONS):
                paths.append(rel)
    return sorted(paths)


def _zip_member(container: str, member: str) -> bytes:
    with zipfile.ZipFile(container) as archive:
        return archive.read(member)


def _patch_note(container: str, member: str) -> bytes:
    """The WAV bytes of note `sampleNN.wav` of a GUS patch, held for NOTE_SECONDS (16-bit, the note's rate)."""
    note = gus_patch.read_patch(container)[int(re.fullmatch(r"sample(\d+)\.wav", member).group(1))]
    buffer = io.BytesIO()
    sf.write(buffer, gus_patch.render_note(note, NOTE_SECONDS), note.sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


# Container extension -> reader of one member's bytes (the container's path, the member's name in it).
_MEMBER_READERS = {**{ext: _zip_member for ext in ARCHIVE_EXTENSIONS}, **{ext: _patch_note for ext in PATCH_EXTENSIONS}}


def local_path(cache: str, package: str, rel: str) -> str:
    """A readable file for `rel`: the file itself, or a container's member (a .pk3 archive's file, a patch's note
    rendered as WAV) written once under CACHE/.members/."""
    for ext, read_member in _MEMBER_READERS.items():
        marker = ext + "/"
        if marker in rel.lower():
            cut = rel.lower().index(marker) + len(ext)
            path = os.path.join(cache, ".members", package, rel)
            if not os.path.exists(path):
                data = read_member(os.path.join(cache, package, rel[:cut]), rel[cut + 1:])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "wb") as f:
                    f.write(data)
                os.replace(path + ".tmp", path)
            return path
    return os.path.join(cache, package, rel)


def _excluded(package: str, rel: str) -> bool:
    return any(p == package and re.search(rx, rel) for p, rx, _ in EXCLUDED)


def _task_label(task: str, package: str, rel: str):
    for rule_task, rule_package, rx, label, _ in TASK_RULES:
        if rule_task == task and rule_package == package:
            match = re.search(rx, rel)
            if match:
                return label, f"{package}:{match.group('group')}"
    return None


def _corpus_kind(package: str, rel: str):
    if any(rel.startswith(folder) for folder in _TASK_FOLDERS.get(package, ())):
        return None
    for rule_package, rx, kind, _ in CORPUS_RULES:
        if rule_package == package and re.search(rx, rel):
            return kind
    return None


def assign_splits(groups_by_label: dict[str, list[str]], seed: int, task: str) -> dict[str, str]:
    """Group -> split. Each label's sorted groups are shuffled by a generator seeded with (seed, task, label);
    the first ~20% go to test, the next ~20% to valid (only with 3+ groups), the rest to train. A task of
    SHARED_SPLIT_TASKS shuffles all its groups at once (as one label "*"), so a group is in one split only."""
    if task in SHARED_SPLIT_TASKS:
        groups_by_label = {"*": sorted({g for groups in groups_by_label.values() for g in groups})}
    split_of = {}
    for label in sorted(groups_by_label):
        groups = sorted(groups_by_label[label])
        random.Random(f"{seed}/{task}/{label}").shuffle(groups)
        n_test = max(1, round(SPLIT_FRACTIONS["test"] * len(groups)))
        n_valid = max(1, round(SPLIT_FRACTIONS["valid"] * len(groups))) if len(groups) >= 3 else 0
        for i, group in enumerate(groups):
            split_of[group] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    return split_of


def assign_folds(groups_by_label: dict[str, list[str]], seed: int, task: str) -> tuple[dict[str, int], int]:
    """(group -> fold 1..k, k) for a task's `_folds` twin: k = FOLDS, or fewer when no label (a task of
    SHARED_SPLIT_TASKS: no task) has that many groups. Each label's sorted groups are shuffled (seeded with
    (seed, task, label, "folds")) and dealt round-robin, continuing from the previous label's last fold so that
    folds stay near one size; a label with two or more groups is thus in two or more folds, and in training
    whichever fold is held out."""
    if task in SHARED_SPLIT_TASKS:
        groups_by_label = {"*": sorted({g for groups in groups_by_label.values() for g in groups})}
    count = min(FOLDS, max(len(groups) for groups in groups_by_label.values()))
    fold_of, dealt = {}, 0
    for label in sorted(groups_by_label):
        groups = sorted(groups_by_label[label])
        random.Random(f"{seed}/{task}/{label}/folds").shuffle(groups)
        for group in groups:
            fold_of[group] = 1 + dealt % count
            dealt += 1
    return fold_of, count


def build(output: str, cache: str, seed: int = 0, packages=PACKAGES, log=logging.info) -> dict:
    """Writes the corpus, the task folders and benchmark.json under `output`; returns the benchmark.json dict."""
    check_packages(cache, packages)
    if os.path.exists(output) and os.listdir(output):
        raise FileExistsError(f"--output {output} exists and is not empty; pick a new folder or delete it")
    tasks = sorted({rule[0] for rule in TASK_RULES})
    skipped, excluded = [], []
    durations = {}  # (package, rel) -> seconds
    task_files = {t: [] for t in tasks}  # task -> [(package, rel, label, group)]
    corpus_files = []  # [(package, rel, kind)]

    def decodes(package, rel):
        if (package, rel) in durations:
            return durations[(package, rel)] is not None
        try:
            wave = audio_io.load_clip(local_path(cache, package, rel), sample_rate=SAMPLE_RATE)
        except audio_io.BadAudioError as e:
            skipped.append({"package": package, "path": rel, "reason": e.reason, "detail": e.detail})
            durations[(package, rel)] = None
            return False
        durations[(package, rel)] = wave.shape[0] / SAMPLE_RATE
        return True

    for package in packages:
        for rel in list_package(cache, package):
            if _excluded(package, rel):
                excluded.append(f"{package}/{rel}")
                continue
            in_task = False
            for task in tasks:
                labelled = _task_label(task, package, rel)
                if labelled and decodes(package, rel):
                    task_files[task].append((package, rel, *labelled))
                in_task = in_task or bool(labelled)
            kind = None if in_task else _corpus_kind(package, rel)
            if kind and decodes(package, rel):
                corpus_files.append((package, rel, kind))

    summary = {"seed": seed, "sample_rate_checked": SAMPLE_RATE,
               "packages": {p: package_version(cache, p) for p in packages},
               "apt": apt_command("CACHE", packages),
               "rules": {"task": [dict(zip(("task", "package", "regex", "label", "why"), r)) for r in TASK_RULES],
                         "corpus": [dict(zip(("package", "regex", "kind", "why"), r)) for r in CORPUS_RULES],
                         "excluded": [dict(zip(("package", "regex", "why"), r)) for r in EXCLUDED]},
               "corpus": {}, "tasks": {}, "skipped": skipped, "excluded_files": excluded}

    os.makedirs(output, exist_ok=True)
    hours = collections.defaultdict(float)
    counts = collections.Counter()
    for package, rel, kind in corpus_files:
        _copy(cache, package, rel, os.path.join(output, "corpus", package, rel))
        hours[f"{package} ({kind})"] += durations[(package, rel)] / 3600
        counts[f"{package} ({kind})"] += 1
    summary["corpus"] = {"folder": "corpus", "files": len(corpus_files),
                         "hours": round(sum(hours.values()), 4),
                         "by_source": {k: {"files": counts[k], "hours": round(hours[k], 4)} for k in sorted(hours)}}

    for task in tasks:
        groups_by_label = collections.defaultdict(set)
        for _, _, label, group in task_files[task]:
            groups_by_label[label].add(group)
        dropped = sorted(label for label, groups in groups_by_label.items() if len(groups) < 2)
        kept = {label: sorted(groups) for label, groups in groups_by_label.items() if label not in dropped}
        if len(kept) < 2:
            raise ValueError(f"task {task}: fewer than two labels with two or more source groups "
                             f"({ {k: sorted(v) for k, v in groups_by_label.items()} }); check TASK_RULES")
        split_of = assign_splits(kept, seed, task)
        task_dir = os.path.join(output, "tasks", task)
        rows = []
        for package, rel, label, group in task_files[task]:
            if label in kept:
                filename = f"audio/{package}/{rel}"
                _copy(cache, package, rel, os.path.join(task_dir, filename))
                rows.append((filename, label, split_of[group], group))
        rows.sort()
        _write_labels(task_dir, "split", [row[:3] for row in rows])
        fold_of, fold_count = assign_folds(kept, seed, task)
        _write_labels(os.path.join(output, "tasks", f"{task}_folds"), "fold",
                      sorted((f"../{task}/{filename}", label, fold_of[group]) for filename, label, _, group in rows))
        clips = collections.Counter((split, label) for _, label, split, _ in rows)
        summary["tasks"][task] = {
            "clips": len(rows), "dropped_labels": dropped,
            "counts": {s: {label: clips[(s, label)] for label in sorted(kept)} for s in ("train", "valid", "test")},
            "groups": {s: sorted(g for g, gs in split_of.items() if gs == s) for s in ("train", "valid", "test")},
            "folds": {"folder": f"{task}_folds", "count": fold_count,
                      "groups": {str(k): sorted(g for g, fk in fold_of.items() if fk == k)
                                 for k in range(1, fold_count + 1)}}}

    with open(os.path.join(output, "benchmark.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
        f.write("\n")
    _print_summary(summary, log)
    return summary


def _write_labels(task_dir: str, split_column: str, rows) -> None:
    """task_dir/labels.csv: filename,label,<split_column> and `rows` (the folder is made if missing)."""
    os.makedirs(task_dir, exist_ok=True)
    with open(os.path.join(task_dir, "labels.csv"), "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("filename", "label", split_column))
        writer.writerows(rows)


def _copy(cache, package, rel, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(local_path(cache, package, rel), dst)


def _print_summary(summary, log):
    corpus = summary["corpus"]
    log(f"corpus: {corpus['files']} files, {corpus['hours']:.2f} hours")
    for source, c in corpus["by_source"].items():
        log(f"  {source:45s} {c['files']:5d} files {c['hours']:7.3f} h")
    for task, t in summary["tasks"].items():
        log(f"task {task}: {t['clips']} clips" + (f" (dropped labels: {', '.join(t['dropped_labels'])})"
                                                  if t["dropped_labels"] else ""))
        for split, by_label in t["counts"].items():
            log(f"  {split:5s} " + "  ".join(f"{label}={n}" for label, n in by_label.items()))
        log(f"  and {t['folds']['folder']}: the same clips in {t['folds']['count']} folds of source groups")
    log(f"skipped {len(summary['skipped'])} files that do not decode" + "".join(
        f"\n  {s['package']}/{s['path']}: {s['reason']} {s['detail']}" for s in summary["skipped"]))
    log(f"excluded {len(summary['excluded_files'])} files kept aside (EXCLUDED)")
