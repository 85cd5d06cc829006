"""Money: what an instance has cost so far, and what a planned run will cost.

Estimates are rough on purpose (they decide whether to launch, not the bill): boot, install and
publish take about half an hour on any type, and a step of the default 8B QLoRA recipe takes a few
seconds, scaled by the batch's token count and the GPU's speed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

# Boot, SSH, install, base model download, merge, export and push.
OVERHEAD_HOURS = 0.5
# Seconds per step of the default recipe (batch 2 x 4 accumulation x 2048 tokens) by GPU family.
SECONDS_PER_STEP = {"h100": 3.0, "gh200": 3.0, "a100": 5.0, "a6000": 8.0, "a10": 10.0}
DEFAULT_SECONDS_PER_STEP = 8.0
REFERENCE_TOKENS_PER_STEP = 2 * 4 * 2048


def dollars(cents_per_hour: float | None, hours: float) -> float | None:
    return None if cents_per_hour is None else cents_per_hour / 100 * hours


def hours_between(start: float | None, end: float | None = None, now: float | None = None) -> float:
    if start is None:
        return 0.0
    return max(0.0, ((end or now or time.time()) - start) / 3600)


def cost_so_far(run: dict, now: float | None = None) -> float | None:
    """Dollars billed for a run's instance: price x time from launch to termination (or now)."""
    if run.get("launched_at") is None:
        return None
    return dollars(run.get("price_cents_per_hour"), hours_between(run["launched_at"], run.get("terminated_at"), now))


def money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


@dataclass
class Estimate:
    hours: float | None  # expected wall time; None when the steps are unknown
    dollars: float | None
    cap_hours: float | None  # the budget the watchdog enforces
    cap_dollars: float | None
    basis: str  # what the estimate rests on, for the confirmation prompt

    def summary(self) -> str:
        parts = []
        if self.hours is not None:
            parts.append(f"estimate ~{self.hours:.1f} h = {money(self.dollars)} ({self.basis})")
        else:
            parts.append(f"no step count to estimate from ({self.basis})")
        if self.cap_dollars is not None:
            parts.append(f"at most {money(self.cap_dollars)} ({self.cap_hours:g} h budget)")
        return "; ".join(parts)


def planned_steps(values: dict) -> tuple[int | None, str]:
    """Optimizer steps the job will run, from max-steps or epochs over a local dataset."""
    if (values.get("max_steps") or -1) > 0:
        return values["max_steps"], f"{values['max_steps']} steps"
    rows = count_local_train_rows(values.get("dataset"))
    if rows is None:
        return None, "dataset size unknown until the job loads it"
    per_step = max(1, values["batch_size"] * values["gradient_accumulation_steps"])
    steps = math.ceil(values["num_epochs"] * math.ceil(rows / per_step))
    return steps, f"{steps} steps: {values['num_epochs']:g} epoch(s) of {rows} conversations"


def count_local_train_rows(dataset: str | None) -> int | None:
    if not dataset:
        return None
    path = Path(dataset).expanduser()
    if path.is_dir():
        path = path / "train.jsonl"
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def seconds_per_step(instance_type: str | None, values: dict) -> float:
    family = next((name for name in SECONDS_PER_STEP if instance_type and name in instance_type),
                  None)
    base = SECONDS_PER_STEP.get(family, DEFAULT_SECONDS_PER_STEP)
    tokens = values["batch_size"] * values["gradient_accumulation_steps"] * values["max_seq_length"]
    gpus = _gpu_count(instance_type)
    return base * tokens / REFERENCE_TOKENS_PER_STEP / gpus


def _gpu_count(instance_type: str | None) -> int:
    # Type names look like gpu_8x_h100_sxm5; the job runs on one GPU, but be generous to bigger hosts.
    if instance_type and instance_type.startswith("gpu_") and "x_" in instance_type:
        count = instance_type.split("_")[1].rstrip("x")
        if count.isdigit():
            return max(1, int(count))
    return 1


def estimate(values: dict, instance_type: str | None, cents_per_hour: float | None) -> Estimate:
    steps, basis = planned_steps(values)
    hours = None
    if steps is not None:
        hours = OVERHEAD_HOURS + steps * seconds_per_step(instance_type, values) / 3600
    cap_hours = budget_hours(values, cents_per_hour)
    if hours is not None and cap_hours is not None:
        hours = min(hours, cap_hours)
    return Estimate(hours, dollars(cents_per_hour, hours) if hours is not None else None, cap_hours,
                    dollars(cents_per_hour, cap_hours) if cap_hours is not None else None, basis)


def budget_hours(values: dict, cents_per_hour: float | None) -> float | None:
    """The tighter of max-hours and max-cost, in hours."""
    limits = []
    if values.get("max_hours"):
        limits.append(float(values["max_hours"]))
    if values.get("max_cost") and cents_per_hour:
        limits.append(float(values["max_cost"]) / (cents_per_hour / 100))
    return min(limits) if limits else None
