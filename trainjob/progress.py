"""Machine-readable progress: one JSON object per line on stdout, every one with an "event".

    {"event": "start", "run_id": ..., "backend": ..., "base_model": ..., "max_steps": ...}
    {"event": "step", "step": 3, "max_steps": 20, "epoch": 0.6, "loss": 2.1, "lr": 0.0002,
     "tokens_per_s": 1830.5, "eta_s": 41.0}
    {"event": "eval", "step": 4, "eval_loss": 2.0}
    {"event": "test", "step": 20, "test_loss": 1.9}
    {"event": "checkpoint", "step": 4, "path": ".../checkpoint-4", "pushed": true}
    {"event": "stage", "stage": "merge"}
    {"event": "done", "result": "<output_dir>/result.json"}
    {"event": "error", "message": "..."}

Libraries print to stdout too (Trainer's log printer, progress bars, C extensions), so the job
claims the real stdout for these events and points file descriptor 1 at stderr for everything else.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

_lock = threading.Lock()
_events: IO[str] | None = None


def claim_stdout() -> None:
    """Keep stdout for events only: anything else written to fd 1 from now on lands on stderr."""
    global _events
    if _events is not None:
        return
    sys.stdout.flush()
    events_fd = os.dup(1)
    os.dup2(2, 1)
    _events = os.fdopen(events_fd, "w", buffering=1, encoding="utf-8")
    sys.stdout = sys.stderr


def emit(event: str, **fields: Any) -> dict[str, Any]:
    record = {"event": event, **{key: _json_safe(value) for key, value in fields.items()}}
    line = json.dumps(record, ensure_ascii=False)
    with _lock:
        out = _events or sys.stdout
        out.write(line + "\n")
        out.flush()
    return record


def _json_safe(value: Any) -> Any:
    # NaN and inf are not JSON; a diverged loss still has to reach the wrapper as a line it can parse.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def _make_callback_class():
    # transformers is imported only once training is set up, after the backend is chosen.
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Turns Trainer logs into step/eval events with throughput and time left."""

        def __init__(self, start_fields: dict[str, Any],
                     on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
            self.start_fields = start_fields
            self.on_step = on_step
            self._t0 = 0.0
            self._first_step = 0
            self._last_time = 0.0
            self._last_tokens = 0
            self._train_seconds = 0.0
            self._eval_started = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            now = time.monotonic()
            self._t0 = self._last_time = now
            # After a resume the clock starts at the checkpoint, not at step 0.
            self._first_step = state.global_step
            self._last_tokens = state.num_input_tokens_seen
            emit("start", **self.start_fields, max_steps=state.max_steps, first_step=state.global_step + 1)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            # Evaluation and saving are not training: keep their time out of tokens/s.
            self._last_time = time.monotonic()

        def on_save(self, args, state, control, **kwargs):
            self._last_time = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "eval_loss" in logs:
                emit("eval", step=state.global_step, eval_loss=_round(logs["eval_loss"]))
            if "test_loss" in logs:
                emit("test", step=state.global_step, test_loss=_round(logs["test_loss"]))
            if "loss" not in logs:
                return
            now = time.monotonic()
            tokens = state.num_input_tokens_seen
            elapsed = max(now - self._last_time, 1e-9)
            tokens_per_s = (tokens - self._last_tokens) / elapsed
            self._last_time, self._last_tokens = now, tokens
            done = state.global_step - self._first_step
            per_step = (now - self._t0) / done if done > 0 else None
            eta_s = None if per_step is None else per_step * max(state.max_steps - state.global_step, 0)
            record = emit(
                "step",
                step=state.global_step,
                max_steps=state.max_steps,
                epoch=_round(state.epoch, 4),
                loss=_round(logs["loss"]),
                lr=logs.get("learning_rate"),
                tokens_per_s=round(tokens_per_s, 1),
                eta_s=None if eta_s is None else round(eta_s, 1),
            )
            if self.on_step is not None:
                self.on_step(record)

    return ProgressCallback


def progress_callback(start_fields: dict[str, Any], on_step: Callable[[dict[str, Any]], None] | None = None):
    """A TrainerCallback that prints the start, step and eval events; on_step sees every step event."""
    return _make_callback_class()(start_fields, on_step)
