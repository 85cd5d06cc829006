"""What a person sees while a playbook or the training job runs.

Ansible's events become one line per task; the job's JSON lines (arriving in the stdout of the
train role's log-tail retries, or straight from a local job) become a progress bar with loss,
tokens/s and the time left; the money spent so far rides along; a failure shows the log's tail.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

# Ansible's own bookkeeping tasks: not worth a line.
_QUIET_TASKS = {"Gathering Facts", "meta", ""}
_FAILED = ("runner_on_failed", "runner_on_unreachable")
_DONE = ("runner_on_ok", "runner_on_skipped", *_FAILED)
TAIL_LINES = 30


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Renders progress to ``stream`` (stderr by default); ``cost`` returns dollars spent so far."""

    def __init__(self, stream: TextIO | None = None, cost: Callable[[], float | None] | None = None,
                 quiet_tasks: bool = False):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.cost = cost
        self.quiet_tasks = quiet_tasks  # only the job's progress and failures
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)  # the job's log lines, for failures
        self.failures: list[str] = []
        self.job_events: list[dict] = []
        self.results: list[dict] = []  # (task, host, res) of every finished task, for callers
        self._task: str | None = None
        self._task_started = 0.0
        self._task_reported = False
        self._seen_lines: set[str] = set()
        self._bar_open = False
        self._last_bar_print = 0.0

    # -- output ------------------------------------------------------------------------------

    def line(self, text: str) -> None:
        self._close_bar()
        print(text, file=self.stream, flush=True)

    def _cost_suffix(self) -> str:
        spent = self.cost() if self.cost else None
        return f" · ${spent:,.2f} so far" if spent is not None else ""

    def _close_bar(self) -> None:
        if self._bar_open:
            print(file=self.stream, flush=True)
            self._bar_open = False

    # -- ansible-runner events ---------------------------------------------------------------

    def ansible_event(self, event: dict) -> None:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        if kind == "playbook_on_play_start":
            name = data.get("play") or data.get("name")
            if name and not self.quiet_tasks:
                self.line(f"== {name}")
        elif kind == "playbook_on_task_start":
            self._task = data.get("task") or data.get("name") or ""
            self._task_started = time.monotonic()
            self._task_reported = False
        elif kind in ("runner_retry", "runner_on_async_poll", "runner_on_async_ok"):
            self._job_output((data.get("res") or {}).get("stdout", ""))
        elif kind in _DONE:
            res = data.get("res") or {}
            self.results.append({"task": data.get("task"), "host": data.get("host"), "res": res})
            self._job_output(res.get("stdout", "") if isinstance(res.get("stdout"), str) else "")
            self._task_done(kind, data, res)

    def _task_done(self, kind: str, data: dict, res: dict) -> None:
        task = data.get("task") or self._task or ""
        if kind in _FAILED and not data.get("ignore_errors"):
            self._report_failure(task, data.get("host", ""), res, unreachable=kind == _FAILED[1])
            return
        if (self._task_reported or self.quiet_tasks or task in _QUIET_TASKS or kind == "runner_on_skipped"
                or task.startswith("Validating arguments against arg spec")):
            return
        self._task_reported = True
        took = format_duration(time.monotonic() - self._task_started)
        self.line(f"  ✓ {task} ({took}{self._cost_suffix()})")

    def _report_failure(self, task: str, host: str, res: dict, unreachable: bool) -> None:
        what = "unreachable" if unreachable else "failed"
        message = res.get("msg") or res.get("reason") or ""
        if res.get("censored"):
            message = message or "details hidden because the task handles secrets"
        if not any(failure.endswith(message) for failure in self.failures):
            self.failures.append(f"{task}: {message}")
        self.line(f"  ✗ {task} {what} on {host}: {message}".rstrip(": "))
        for stream_name in ("stderr", "stdout"):
            text = res.get(stream_name)
            if isinstance(text, str) and text.strip():
                self.line(f"    last lines of {stream_name}:")
                for text_line in text.strip().splitlines()[-15:]:
                    self.line(f"    | {text_line}")

    # -- the training job's lines --------------------------------------------------------------

    def _job_output(self, text: str) -> None:
        for raw in (text or "").splitlines():
            if raw in self._seen_lines:
                continue  # every tail repeats the lines the previous one showed
            self._seen_lines.add(raw)
            self.job_line(raw)

    def job_line(self, raw: str) -> dict | None:
        """One line of the job's output: a JSON event is shown, anything else kept for the tail."""
        raw = raw.rstrip("\n")
        try:
            event = json.loads(raw) if raw.startswith("{") else None
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict) or "event" not in event:
            if raw.strip():
                self.tail.append(raw)
            return None
        self.job_events.append(event)
        self._show_job_event(event)
        return event

    def _show_job_event(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            steps = event.get("max_steps")
            self.line(f"  training {event.get('base_model', '')} on {event.get('backend', '?')}"
                      + (f", {steps} steps" if steps else ""))
        elif kind == "step":
            self._bar(event)
        elif kind == "eval":
            self.line(f"  eval at step {event.get('step')}: loss {_num(event.get('eval_loss'))}")
        elif kind == "test":
            self.line(f"  test loss {_num(event.get('test_loss'))}")
        elif kind == "stage":
            self.line(f"  {event.get('stage')}…")
        elif kind == "done":
            self.line(f"  ✓ training done: {event.get('result', '')}")
        elif kind == "error":
            self.failures.append(event.get("message", "the job failed"))
            self.line(f"  ✗ training failed: {event.get('message', '')}")

    def _bar(self, event: dict) -> None:
        step, total = event.get("step") or 0, event.get("max_steps") or 0
        width = 24
        filled = int(width * step / total) if total else 0
        bar = "█" * filled + "░" * (width - filled)
        parts = [f"  step {step}/{total or '?'} {bar}"]
        if event.get("loss") is not None:
            parts.append(f"loss {_num(event['loss'])}")
        if event.get("tokens_per_s"):
            parts.append(f"{event['tokens_per_s']:,.0f} tok/s")
        if event.get("eta_s") is not None:
            parts.append(f"eta {format_duration(event['eta_s'])}")
        text = " · ".join(parts) + self._cost_suffix()
        if self.tty:
            columns = shutil.get_terminal_size().columns
            print("\r" + text[: columns - 1].ljust(min(columns - 1, len(text) + 2)), end="",
                  file=self.stream, flush=True)
            self._bar_open = True
            return
        # Not a terminal (a log, CI): a line per step would flood it; every 10 s and the last step.
        now = time.monotonic()
        if now - self._last_bar_print >= 10 or (total and step >= total) or step <= 1:
            self._last_bar_print = now
            print(text, file=self.stream, flush=True)

    # -- endings -------------------------------------------------------------------------------

    def show_tail(self, title: str = "last lines of the training log") -> None:
        if not self.tail:
            return
        self.line(f"  {title}:")
        for text_line in self.tail:
            self.line(f"  | {text_line}")

    def finish(self) -> None:
        self._close_bar()


def _num(value: Any) -> str:
    return "?" if value is None else f"{float(value):.4f}"
