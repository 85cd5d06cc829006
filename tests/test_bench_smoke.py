"""The training-speed benchmark runs end to end on the tiny shape (a smoke run: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("trl")

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_benchmark_measures_baseline_and_our_path_with_equal_losses(tmp_path):
    out = tmp_path / "tiny.json"
    done = subprocess.run(
        [sys.executable, "bench/train_speed.py", "--shape", "tiny", "--steps", "2", "--warmup", "1",
         "--json", str(out), "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["baseline", "ours"]
    for row in rows.values():
        assert row["error"] is None
        assert row["tokens_per_s"] > 0 and row["steps_timed"] == 2
        assert row["peak_memory_gib"] > 0 and row["mfu"] > 0
    # The same weights and adapters score the same fixed batch, padded there and packed here.
    assert rows["ours"]["loss_parity"] < 1e-4
    # Packing fills each micro-step with real tokens; the baseline's batches are padded.
    capacity = report["data"]["ours_rows_per_step"] * report["data"]["max_seq_length"]
    assert rows["ours"]["real_tokens"] / rows["ours"]["steps_timed"] > 0.8 * capacity
    assert rows["baseline"]["real_tokens"] < rows["baseline"]["computed_tokens"]
    assert rows["ours"]["plan"]["packing"] is True
    assert report["versions"]["torch"] and report["flops_per_token"] > 0
    # The table is printed for people.
    assert "| baseline |" in done.stdout and "| ours |" in done.stdout
