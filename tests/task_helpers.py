"""Tiny labelled task folders for evaluation tests."""

import numpy as np
import soundfile as sf


def tone_task(root, n=24):
    """Low vs high tones, `n` clips of 0.25-0.35 s at 16 kHz in `root` (created) with labels.csv: the first 16
    train, the next 4 valid, the rest test."""
    root.mkdir()
    rows = ["filename,label,split"]
    for i in range(n):
        t = np.arange(4000 + 800 * (i % 3)) / 16000
        sf.write(root / f"c{i:02d}.wav", (0.3 * np.sin(2 * np.pi * (300 if i % 2 else 3000) * (1 + i / 50) * t))
                 .astype(np.float32), 16000)
        rows.append(f"c{i:02d}.wav,{'low' if i % 2 else 'high'},{'train' if i < 16 else 'valid' if i < 20 else 'test'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root
