"""The backend choice: made once, before heavy imports, and refusing what the machine can't do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainjob.backend import FORCE_ENV, BackendError, choose_backend

pytest.importorskip("torch")


def test_importing_the_job_pulls_in_no_ml_library():
    # Unsloth patches transformers/trl/peft at import: it must come first, so the job may not import them early.
    code = ("import sys, trainjob.train; "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_cpu_machine_trains_in_fp32_with_plain_adamw(monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    backend = choose_backend()
    assert (backend.name, backend.dtype, backend.optim) == ("cpu", "float32", "adamw_torch")
    assert (backend.bf16, backend.fp16, backend.use_cpu, backend.load_in_4bit) == (False, False, True, False)
    assert backend.fused_loss is False  # TRL's fused head needs Triton on CUDA
    assert backend.why == "no CUDA device"


def test_optimizer_from_the_config_wins(monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    assert choose_backend(optim="sgd").optim == "sgd"


def test_4bit_on_cpu_is_refused_with_the_fix(monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)
    with pytest.raises(BackendError, match="needs a CUDA GPU; set it to null or false"):
        choose_backend(load_in_4bit=True)


@pytest.mark.parametrize(("value", "message"), [
    ("unsloth", "needs a CUDA GPU"), ("transformers-cuda", "needs a CUDA GPU"), ("tpu", "is not a backend")])
def test_forced_backend_is_checked(monkeypatch, value, message):
    monkeypatch.setenv(FORCE_ENV, value)
    with pytest.raises(BackendError, match=message):
        choose_backend()
