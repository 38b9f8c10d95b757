"""GUS patch (.pat) bytes written field by field from the GF1 patch layout, independently of
audiojepa.data.gus_patch's reader (which unpacks one struct per sample header)."""

import numpy as np


def _u(value, size):
    return int(value).to_bytes(size, "little", signed=False)


def patch_bytes(notes, magic=b"GF1PATCH110\x00"):
    """`notes`: dicts with "pcm" (int array), "rate", "bits" (8 or 16), "unsigned", optional "loop" (start, end) in
    samples, "reverse", "root_hz". Returns the bytes of a one-instrument, one-layer patch."""
    blobs = []
    for note in notes:
        width = note["bits"] // 8
        pcm = np.asarray(note["pcm"])
        if note.get("unsigned"):
            data = (pcm.astype(np.int64) + (1 << (note["bits"] - 1))).astype("<u2" if width == 2 else "u1").tobytes()
        else:
            data = pcm.astype("<i2" if width == 2 else "i1").tobytes()
        loop = note.get("loop")
        modes = (1 if width == 2 else 0) | (2 if note.get("unsigned") else 0) | (4 if loop else 0) | (
            16 if note.get("reverse") else 0)
        header = (note.get("name", "note").encode().ljust(7, b"\x00")[:7] + _u(0, 1) + _u(len(data), 4)
                  + _u(loop[0] * width if loop else 0, 4) + _u(loop[1] * width if loop else 0, 4)
                  + _u(note["rate"], 2) + _u(20000, 4) + _u(2000000, 4) + _u(round(note.get("root_hz", 440) * 1000), 4)
                  + (512).to_bytes(2, "little", signed=True) + _u(7, 1) + bytes(6) + bytes(6) + bytes(6)
                  + _u(modes, 1) + _u(60, 2) + _u(1024, 2) + bytes(36))
        assert len(header) == 96
        blobs.append(header + data)
    body = b"".join(blobs)
    head = (magic + b"ID#000002\x00" + b"a test patch".ljust(60, b"\x00") + _u(1, 1) + _u(14, 1) + _u(0, 1)
            + _u(len(notes), 2) + _u(127, 2) + _u(len(body), 4) + bytes(36))
    instrument = _u(0, 2) + b"test".ljust(16, b"\x00") + _u(len(body) + 47, 4) + _u(1, 1) + bytes(40)
    layer = _u(0, 1) + _u(0, 1) + _u(len(body), 4) + _u(len(notes), 1) + bytes(40)
    assert (len(head), len(instrument), len(layer)) == (129, 63, 47)
    return head + instrument + layer + body
