"""tools/bench_frontend.py: a tiny run prints and appends the table, every log-mel row agrees with librosa."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_appends_a_table_whose_rows_agree_with_librosa(tmp_path):
    out = tmp_path / "bench.md"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_frontend.py"), "--num_clips=4", "--seconds=0.5",
           "--batch=2", "--repeats=1", f"--append_to={out}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "- Command: `python" in text and "- Machine:" in text
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| implementation")}
    assert set(rows) == {"librosa (per clip)", "host NumPy (per clip)", "host NumPy (batched)",
                         "device JAX, fft (jit, batched)", "device JAX, matmul (jit, batched)",
                         "floor: device rfft + power only (frames cut beforehand)"}, rows
    for name, cells in rows.items():
        assert float(cells[2]) > 0, name  # clips/s
        if name.startswith("floor"):
            assert cells[-1] == "n/a"
        else:  # log-mel (natural log) within 1e-4 of librosa's on the first clip
            assert float(cells[-1]) < 1e-4, (name, cells[-1])
