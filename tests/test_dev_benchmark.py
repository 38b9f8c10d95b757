"""tools/make_dev_benchmark.py (audiojepa.data.dev_benchmark) on a fake tree of unpacked packages (tiny WAV/OGG files, a .pk3 zip laid out as the
real packages are): determinism, task/corpus disjointness, source-disjoint splits, labels.csv, skipped files, the
missing-package error. No network, no apt."""

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import soundfile as sf

from audiojepa.data import dev_benchmark
from patch_helpers import patch_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "make_dev_benchmark.py")
SR = 8000


@pytest.fixture(scope="module")
def tool():
    """The builder's library module (the CLI's absl flags would clash with other tools' in one pytest worker)."""
    return dev_benchmark


def _wav_bytes(seed, fmt="WAV", subtype="PCM_16", silent=False):
    """0.1 s of seeded noise (or zeros) encoded as `fmt`."""
    noise = 0.3 * np.random.default_rng(seed).standard_normal(SR // 10)
    buf = io.BytesIO()
    sf.write(buf, (0 * noise if silent else noise).astype(np.float32), SR, format=fmt, subtype=subtype)
    return buf.getvalue()


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


LMMS_FILES = {
    "drums": ["kick01", "kick02", "kick_soft01", "bassdrum01", "kick_hard01", "snare01", "snare02", "snare_hiphop01",
              "snare_rim01", "snare_muffled01", "hihat_closed01", "hihat_opened01", "hihat_foot_pedal01", "tom01",
              "tom_hi01", "tom_low01", "crash01", "ride01", "clap01", "clap02"],
    "basses": ["bass01", "bass_acid01", "rave_bass01", "synth_acid01"],
    "instruments": ["piano01", "e_piano_accord01", "church_organ01", "cello01", "violin_pizzicato01",
                    "steel_guitar01", "steel_guitar_heavy_distorted01", "trumpet01", "flute01"],
    "latin": ["latin_guitar01", "latin_brass01"],
    "stringsnpads": ["strings01", "space_strings01"],
    "beats": ["break01", "jungle01"],
    "effects": ["explode01"],
}


# freepats patch -> number of notes in it (Drum_000 and Timpani are in no task).
FREEPATS = {"Tone_000/000_Acoustic_Grand_Piano": 2, "Tone_000/001_Acoustic_Brite_Piano": 1,
            "Tone_000/024_Nylon_Guitar": 2, "Tone_000/025_Steel_Guitar": 1, "Tone_000/065_Alto_Sax": 1,
            "Tone_000/071_Clarinet": 2, "Tone_000/047_Timpani": 1, "Drum_000/035_Kick_1": 1}


@pytest.fixture
def fake_cache(tmp_path, tool):
    """CACHE/<package>/ trees shaped like the real packages, small enough to build in about a second."""
    cache = tmp_path / "cache"
    seed = 0
    for folder, stems in LMMS_FILES.items():
        for stem in stems:
            seed += 1
            _write(cache / "lmms-common/usr/share/lmms/samples" / folder / f"{stem}.ogg",
                   _wav_bytes(seed, "OGG", "VORBIS"))
    # as in the real lmms-common: a file named .ogg that libsndfile refuses
    _write(cache / "lmms-common/usr/share/lmms/samples/drums/kick04.ogg", b"RIFF\x00\x00\x00\x00WAVEfmt junk")
    _write(cache / "lmms-common" / tool.VERSION_FILE, b"1.2.2+dfsg1-6\n")
    oa = cache / "openarena-data/usr/share/games/openarena"
    os.makedirs(oa / "baseoa")
    members = [f"sound/weapons/{w}/{w}_fire{i}.wav" for w in ("bfg", "rocket", "plasma", "railgun", "shotgun")
               for i in (1, 2)]
    members += [f"sound/player/footsteps/{s}{i}.wav" for s in ("boot", "clank", "flesh", "mech", "step") for i in (1, 2)]
    members += ["sound/world/ambient/x_drone.wav", "sound/world/new/moan1.wav", "sound/world/wind1.wav",
                "sound/world/demonwind01.wav", "sound/player/sarge/death1.wav", "sound/misc/menu1.wav",
                "sound/items/quaddamage.wav", "sound/misc/silence.wav"]
    with zipfile.ZipFile(oa / "baseoa/pak0.pk3", "w") as archive:
        for member in members:
            seed += 1
            archive.writestr(member, _wav_bytes(seed, silent=member.endswith("silence.wav")))
    os.makedirs(oa / "missionpack")
    with zipfile.ZipFile(oa / "missionpack/mp-pak0.pk3", "w") as archive:
        for name in ("yes", "no", "coverme"):
            seed += 1
            archive.writestr(f"sound/voices/rott/{name}.ogg", _wav_bytes(seed, "OGG", "VORBIS"))
            archive.writestr(f"sound/voices/festivoxmale/{name}.ogg", _wav_bytes(seed + 1000, "OGG", "VORBIS"))
    for name in ("menu", "track1"):
        seed += 1
        _write(cache / "warzone2100-music/usr/share/games/warzone2100/music" / f"{name}.opus",
               _wav_bytes(seed, "OGG", "VORBIS"))  # Vorbis in an .opus name: the rules look at paths only
    for name in ("introzik.ogg", "launch.ogg"):
        seed += 1
        _write(cache / "frozen-bubble-data/usr/share/games/frozen-bubble/snd" / name, _wav_bytes(seed, "OGG", "VORBIS"))
    _write(cache / "pingus-data/usr/share/games/pingus/data/sounds/plop.wav", _wav_bytes(seed + 1))
    _write(cache / "pingus-data/usr/share/games/pingus/data/music/pingus-1.it", b"IMPM not audio we read")
    _write(cache / "sound-theme-freedesktop/usr/share/sounds/freedesktop/stereo/bell.oga",
           _wav_bytes(seed + 2, "OGG", "VORBIS"))
    _write(cache / "alsa-utils/usr/share/sounds/alsa/Front_Left.wav", _wav_bytes(seed + 3))
    seed += 10
    mg = cache / "megaglest-data/usr/share/games/megaglest"
    for faction, unit in (("egypt", "spearman"), ("indian", "archer"), ("magic", "initiate"), ("norsemen", "swordman"),
                          ("persian", "swordman")):  # magic: spells as attacks, left out of unit_sound
        for kind in ("ack1", "select2", "attack1", "attack3b", "die1", "hit1"):
            seed += 1
            _write(mg / f"techs/megapack/factions/{faction}/units/{unit}/sounds/{unit}_{kind}.wav", _wav_bytes(seed))
    for rel in ("techs/megapack/commondata/sounds/wolf1.wav", "techs/megapack/commondata/sounds/archer_ack1.wav",
                "techs/megapack/factions/tech/units/guard/sounds/guard_ack1.wav",
                "techs/megapack/factions/magic/music/music_magic.ogg", "tilesets/meadow/sounds/bird1.wav"):
        seed += 1
        _write(mg / rel, _wav_bytes(seed))
    for name in ("human-die-1", "human-female-hit-2", "orc-hit-1", "wolf-growl-1", "drake-die", "sword-1", "bow-miss",
                 "axe", "throwing-knife", "mace", "magic-holy-1", "magic-missile-2-miss", "fire", "lightning", "heal",
                 "squishy-hit"):
        seed += 1
        _write(cache / "wesnoth-1.16-data/usr/share/games/wesnoth/1.16/data/core/sounds" / f"{name}.ogg",
               _wav_bytes(seed, "OGG", "VORBIS"))
    _write(cache / "ktuberling-data/usr/share/ktuberling/sounds/en/hat.ogg", _wav_bytes(seed + 1, "OGG", "VORBIS"))
    _write(cache / "ktuberling-data/usr/share/ktuberling/sounds/fr/chapeau.wav", _wav_bytes(seed + 2))
    _write(cache / "klettres-data/usr/share/klettres/de/alpha/a.ogg", _wav_bytes(seed + 3, "OGG", "VORBIS"))
    fp = cache / "freepats/usr/share/midi/freepats"
    rng = np.random.default_rng(7)
    for stem, notes in FREEPATS.items():
        _write(fp / f"{stem}.pat", patch_bytes([dict(pcm=rng.integers(-9000, 9000, 400 + 100 * i), rate=SR, bits=16,
                                                     unsigned=False, loop=(200, 400)) for i in range(notes)]))
    _write(fp / "Tone_000/000_Acoustic_Grand_Piano.txt", b"notes on the patch")
    return str(cache)


def _tree_digest(folder):
    digest = hashlib.sha256()
    for parent, subfolders, files in os.walk(folder):
        subfolders.sort()
        for name in sorted(files):
            path = os.path.join(parent, name)
            digest.update(os.path.relpath(path, folder).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _labels(task_dir):
    with open(os.path.join(task_dir, "labels.csv"), newline="") as f:
        return list(csv.reader(f))


def test_build_is_deterministic_disjoint_and_split_by_source(tool, fake_cache, tmp_path):
    out1, out2 = str(tmp_path / "b1"), str(tmp_path / "b2")
    summary = tool.build(out1, fake_cache, seed=0, log=lambda *_: None)
    tool.build(out2, fake_cache, seed=0, log=lambda *_: None)
    assert _tree_digest(out1) == _tree_digest(out2)

    assert sorted(summary["tasks"]) == ["battle_sound", "drum_type", "game_sfx", "gm_family", "instrument_family",
                                        "unit_sound"]
    assert summary["packages"]["lmms-common"] == "1.2.2+dfsg1-6"
    assert summary["packages"]["alsa-utils"] == "unknown"
    assert summary["tasks"]["drum_type"]["dropped_labels"] == ["clap"]  # one sample family only

    corpus_files = set()
    for parent, _, files in os.walk(os.path.join(out1, "corpus")):
        corpus_files.update(os.path.relpath(os.path.join(parent, f), os.path.join(out1, "corpus")) for f in files)
    assert "warzone2100-music/usr/share/games/warzone2100/music/menu.opus" in corpus_files
    assert not any("festivoxmale" in f for f in corpus_files)
    assert not any(f.endswith(".it") for f in corpus_files)
    for speech in ("ktuberling-data/usr/share/ktuberling/sounds/fr/chapeau.wav",
                   "klettres-data/usr/share/klettres/de/alpha/a.ogg",
                   "megaglest-data/usr/share/games/megaglest/techs/megapack/commondata/sounds/wolf1.wav"):
        assert speech in corpus_files
    # spoken acknowledgements of units outside the task stay out of the corpus too; the task's factions' other
    # sounds (hit) are in neither
    assert not any(f.endswith(("archer_ack1.wav", "guard_ack1.wav", "_hit1.wav")) for f in corpus_files)
    assert summary["corpus"]["files"] == len(corpus_files)

    group_rules = [(r[1], r[2]) for r in tool.TASK_RULES]
    for task in summary["tasks"]:
        rows = _labels(os.path.join(out1, "tasks", task))
        assert rows[0] == ["filename", "label", "split"]
        assert rows[1:] == sorted(rows[1:])
        assert {split for _, _, split in rows[1:]} <= {"train", "valid", "test"}
        groups_by_split = {}
        for filename, label, split in rows[1:]:
            assert os.path.isfile(os.path.join(out1, "tasks", task, filename))
            assert filename.startswith("audio/")
            source = filename[len("audio/"):]
            assert source not in corpus_files, f"{task}: {source} is also in the corpus"
            assert "festivoxmale" not in source
            package, rel = source.split("/", 1)
            group = next(re.search(rx, rel).group("group") for p, rx in group_rules
                         if p == package and re.search(rx, rel))
            groups_by_split.setdefault(split, set()).add((label, group))
        assert not groups_by_split["train"] & groups_by_split["test"], task
        if task in tool.SHARED_SPLIT_TASKS:  # a faction (its voice actors) is in one split, whatever the label
            factions = {split: {g for _, g in pairs} for split, pairs in groups_by_split.items()}
            assert not factions["train"] & factions["test"] and not factions["train"] & factions.get("valid", set())
            assert not factions["test"] & factions.get("valid", set())
        assert not groups_by_split["train"] & groups_by_split.get("valid", set()), task
        labels = {label for _, label, _ in rows[1:]}
        for split in ("train", "test"):
            assert {label for label, _ in groups_by_split[split]} == labels, (task, split)
    battle = {row[0].rsplit("/", 1)[1]: row[1] for row in _labels(os.path.join(out1, "tasks", "battle_sound"))[1:]}
    assert battle["human-female-hit-2.ogg"] == "creature" and battle["throwing-knife.ogg"] == "weapon"
    assert battle["magic-missile-2-miss.ogg"] == "magic" and "squishy-hit.ogg" not in battle
    unit = {row[0].rsplit("/", 1)[1]: row[1] for row in _labels(os.path.join(out1, "tasks", "unit_sound"))[1:]}
    assert {unit["archer_select2.wav"], unit["archer_attack3b.wav"], unit["archer_die1.wav"]} == {
        "voice", "attack", "death"}
    assert not any(name.startswith("initiate_") for name in unit)
    # every note of each freepats instrument, as a key held for NOTE_SECONDS: its data, then its loop repeated
    gm = {row[0].split("freepats/usr/share/midi/freepats/Tone_000/", 1)[1]: row[1]
          for row in _labels(os.path.join(out1, "tasks", "gm_family"))[1:]}
    assert gm == {"000_Acoustic_Grand_Piano.pat/sample00.wav": "piano", "000_Acoustic_Grand_Piano.pat/sample01.wav": "piano",
                  "001_Acoustic_Brite_Piano.pat/sample00.wav": "piano", "024_Nylon_Guitar.pat/sample00.wav": "guitar",
                  "024_Nylon_Guitar.pat/sample01.wav": "guitar", "025_Steel_Guitar.pat/sample00.wav": "guitar",
                  "065_Alto_Sax.pat/sample00.wav": "reed", "071_Clarinet.pat/sample00.wav": "reed",
                  "071_Clarinet.pat/sample01.wav": "reed"}
    note, rate = sf.read(os.path.join(out1, "tasks", "gm_family", "audio", "freepats", "usr/share/midi/freepats",
                                      "Tone_000/024_Nylon_Guitar.pat/sample01.wav"), dtype="float32")
    assert rate == SR and len(note) == round(tool.NOTE_SECONDS * SR)
    np.testing.assert_allclose(note[400:600], note[200:400], atol=1e-4)  # the loop [200, 400) held
    assert not any("freepats" in f for f in corpus_files)
    # the split record in benchmark.json agrees with the files: no group in two splits
    with open(os.path.join(out1, "benchmark.json")) as f:
        recorded = json.load(f)
    for task, t in recorded["tasks"].items():
        assert not set(t["groups"]["train"]) & set(t["groups"]["test"])


def test_fold_twins_test_every_clip_once_with_no_source_group_in_two_folds(tool, fake_cache, tmp_path):
    """tasks/<task>_folds: the same clips (read from ../<task>/audio), a fold per source group, so that
    leave-one-fold-out scores every clip once, on a source it never trained on."""
    from audiojepa.evaluation import tasks as task_lib

    out = str(tmp_path / "b")
    summary = tool.build(out, fake_cache, seed=0, log=lambda *_: None)
    group_rules = [(r[1], r[2]) for r in tool.TASK_RULES]
    for task in summary["tasks"]:
        split_rows = _labels(os.path.join(out, "tasks", task))[1:]
        fold_rows = _labels(os.path.join(out, "tasks", f"{task}_folds"))
        assert fold_rows[0] == ["filename", "label", "fold"]
        assert sorted((f, label) for f, label, _ in fold_rows[1:]) == sorted(
            (f"../{task}/{f}", label) for f, label, _ in split_rows)
        fold_of_group = {}
        for filename, label, fold in fold_rows[1:]:
            package, rel = filename[len(f"../{task}/audio/"):].split("/", 1)
            group = next(re.search(rx, rel).group("group") for p, rx in group_rules
                         if p == package and re.search(rx, rel))
            key = group if task in tool.SHARED_SPLIT_TASKS else (label, group)
            assert fold_of_group.setdefault(key, fold) == fold, (task, key)  # a group in one fold only
        folds = sorted({int(fold) for _, _, fold in fold_rows[1:]})
        recorded = summary["tasks"][task]["folds"]
        assert folds == list(range(1, recorded["count"] + 1))
        assert 2 <= recorded["count"] <= tool.FOLDS
        # every label is in at least two folds, so holding out any fold leaves it in training
        labels = {label for _, label, _ in fold_rows[1:]}
        for label in labels:
            assert len({fold for _, l, fold in fold_rows[1:] if l == label}) >= 2, (task, label)
        loaded = task_lib.load_task(os.path.join(out, "tasks", f"{task}_folds"), sample_rate=SR,
                                    verify_audio="header")
        assert loaded.is_folds and len(loaded) == len(split_rows) and not loaded.skipped


def test_skipped_files_are_listed(tool, fake_cache, tmp_path):
    summary = tool.build(str(tmp_path / "b"), fake_cache, log=lambda *_: None)
    skipped = {(s["package"], s["path"].rsplit("/", 1)[1]): s["reason"] for s in summary["skipped"]}
    assert skipped == {("lmms-common", "kick04.ogg"): "unreadable", ("openarena-data", "silence.wav"): "silent"}
    rows = _labels(str(tmp_path / "b/tasks/drum_type"))
    assert not any("kick04" in row[0] for row in rows)


def test_seed_changes_the_split_not_the_files(tool, fake_cache, tmp_path):
    a = tool.build(str(tmp_path / "a"), fake_cache, seed=0, log=lambda *_: None)
    b = tool.build(str(tmp_path / "b"), fake_cache, seed=1, log=lambda *_: None)
    assert a["corpus"] == b["corpus"]
    assert any(a["tasks"][t]["groups"] != b["tasks"][t]["groups"] for t in a["tasks"])
    for t in a["tasks"]:
        assert a["tasks"][t]["clips"] == b["tasks"][t]["clips"]


def test_missing_package_names_it_and_the_apt_command(tool, fake_cache, tmp_path):
    shutil.rmtree(os.path.join(fake_cache, "openarena-data"))
    with pytest.raises(tool.MissingPackageError, match="openarena-data") as info:
        tool.build(str(tmp_path / "b"), fake_cache, log=lambda *_: None)
    assert "apt-get download openarena-data" in str(info.value)
    assert not os.path.exists(tmp_path / "b")
    cmd = [sys.executable, TOOL, f"--cache={fake_cache}", f"--output={tmp_path / 'c'}"]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "openarena-data" in result.stderr and "apt-get download" in result.stderr
