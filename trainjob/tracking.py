"""Weights & Biases: one run per job, named after the run id, finished on every exit path.

Online when WANDB_API_KEY is in the environment, offline otherwise (`wandb sync` uploads later);
an explicit WANDB_MODE wins. transformers' WandbCallback logs the losses into the run started here
(it reuses `wandb.run`) but never finishes it: `finish()` does.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    """A started W&B run, or nothing at all when W&B is off."""

    def __init__(self, run=None, mode: str = "off") -> None:
        self.run = run
        self.mode = mode

    @property
    def enabled(self) -> bool:
        return self.run is not None

    @property
    def report_to(self) -> str:
        """What the Trainer's `report_to` must say."""
        return "wandb" if self.enabled else "none"

    @property
    def url(self) -> str | None:
        return None if self.run is None or self.mode == "offline" else self.run.url

    @property
    def directory(self) -> str | None:
        return None if self.run is None else self.run.dir

    def log_step(self, event: dict[str, Any]) -> None:
        """Throughput per logged step, on the same x-axis as the Trainer's own train/* charts."""
        if self.run is None:
            return
        self.run.log({
            "train/global_step": event["step"],
            "train/tokens_per_s": event["tokens_per_s"],
            **({"train/eta_s": event["eta_s"]} if event.get("eta_s") is not None else {}),
        })

    def summarize(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        for key, value in values.items():
            if value is not None:
                self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:  # a tracker that fails to flush must not turn success into failure
            log.warning("W&B run did not finish cleanly: %s", exc)


def start_tracking(project: str | None, run_name: str, run_id: str, config: dict[str, Any]) -> Tracker:
    if project is None:
        log.info("W&B: off (wandb_project is null)")
        return Tracker()
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "disabled":
        log.info("W&B: off (WANDB_MODE=disabled)")
        return Tracker()
    import wandb

    init = dict(
        project=project,
        name=run_name,
        # The run id doubles as the W&B id, so a resumed (or re-run) job appends to the same run.
        id=_wandb_id(run_id),
        resume="allow",
        config=config,
        job_type="fine-tune",
        reinit="finish_previous",
    )
    try:
        run = wandb.init(mode=mode, **init)
    except Exception as exc:
        if mode != "online":
            raise
        # W&B being unreachable is no reason to lose a GPU run: record offline, sync later.
        log.warning("W&B online init failed (%s); recording offline instead", exc)
        mode = "offline"
        run = wandb.init(mode=mode, **init)
    # transformers' callback would otherwise read these and upload the whole model to W&B.
    os.environ.setdefault("WANDB_LOG_MODEL", "false")
    os.environ.setdefault("WANDB_WATCH", "false")
    run.define_metric("train/global_step")
    run.define_metric("train/*", step_metric="train/global_step", step_sync=True)
    log.info("W&B: %s run %r in project %r%s", mode, run_name, project,
             f" ({run.url})" if mode == "online" else f" in {run.dir}")
    return Tracker(run, mode)


def _wandb_id(run_id: str) -> str:
    # W&B ids allow letters, digits, '-' and '_' only.
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_id)[:64]
