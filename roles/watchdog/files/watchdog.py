#!/usr/bin/env python3
"""llama-trainer's watchdog: ends its own Lambda Cloud instance when nothing good can come of it running.

Started on the instance by the `watchdog` role (`configure`); it outlives the SSH session and the
controller. Every poll it re-reads its config and terminates the instance (found in the API by its
name) when any of these holds:

  budget   the time (max_hours) or money (max_cost, at the instance's price) budget is spent; a job
           still running first gets SIGTERM and a grace period to save and push a checkpoint;
  finished the job has ended and its outputs are safe: result.json says the Hub push was confirmed,
           or the controller fetched them (an `outputs-fetched` marker in the run's folder);
  idle     no job has run and nothing in the trainer folder has changed for idle_minutes (never
           while a trained model exists only on this instance: then only the budget ends it).

Standard library only: it runs on the image's system Python before any venv exists. The API key is
read from a 0600 env file and sent only as a bearer token. Log: <state_dir>/watchdog.log.

    python3 watchdog.py --config ~/llama-trainer/watchdog/config.json [--daemon] [--once]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import stat
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

log = logging.getLogger("watchdog")

LIVE_STATUSES = ("booting", "active", "unhealthy")
FETCHED_MARKER = "outputs-fetched"
DEFAULTS = {
    "api_url": "https://cloud.lambda.ai/api/v1",
    "max_hours": None,
    "max_cost": None,
    "idle_minutes": 30,
    "poll_seconds": 30,
    "grace_seconds": 300,  # a budget-stopped job's time to save and push a checkpoint
    "finished_grace_seconds": 120,  # lets a live controller fetch and tear down itself first
    "started_at": None,  # epoch seconds the budget counts from (default: the first start)
}


class ApiError(Exception):
    pass


class LambdaApi:
    """The two calls the watchdog needs, with a few retries; the key never reaches a log."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 20, retries: int = 4):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout = timeout
        self.retries = retries

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.base_url + path, data=data, method=method, headers={
                "Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json",
                "Accept": "application/json", "User-Agent": "llama-trainer-watchdog/0.1"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read() or b"{}").get("data")
            except urllib.error.HTTPError as error:
                code = _error_code(error)
                if error.code != 429 and error.code < 500:
                    raise ApiError(f"{method} {path}: HTTP {error.code} {code}") from None
                failure = f"HTTP {error.code} {code}"
            except (urllib.error.URLError, TimeoutError, OSError) as error:
                failure = type(error).__name__
            if attempt < self.retries:
                time.sleep(min(60, 2 ** attempt))
        raise ApiError(f"{method} {path}: {failure} after {self.retries + 1} attempts")

    def instances_named(self, name: str) -> list[dict]:
        return [i for i in self._call("GET", "/instances") or []
                if i.get("name") == name and i.get("status") in LIVE_STATUSES]

    def terminate(self, ids: list[str]) -> None:
        self._call("POST", "/instance-operations/terminate", {"instance_ids": ids})


def _error_code(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read() or b"{}").get("error", {}).get("code", "")
    except (ValueError, AttributeError, OSError):
        return ""


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines (values may be single-quoted, as the config role writes them)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s is mode %o; it holds the API key and should be 0600", path, mode)
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1].replace("'\"'\"'", "'")
        values[name.strip()] = value
    return values


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (an exited child nobody reaped) is not a running job.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class Runs:
    """What the job folders say: is a job running, did the last one end, are its outputs safe."""

    def __init__(self, trainer_dir: Path):
        self.runs_dir = trainer_dir / "runs"

    def run_dirs(self) -> list[Path]:
        if not self.runs_dir.is_dir():
            return []
        return sorted((p for p in self.runs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)

    def running_pids(self) -> list[int]:
        pids = []
        for run_dir in self.run_dirs():
            try:
                pid = int((run_dir / "train.pid").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if pid != os.getpid() and not (run_dir / "exit_code").exists() and pid_alive(pid):
                pids.append(pid)
        return pids

    def finished_and_safe(self) -> tuple[bool, str]:
        """(the latest job ended, why its outputs are safe or what is missing)."""
        dirs = self.run_dirs()
        if not dirs:
            return False, "no job yet"
        latest = dirs[-1]
        if not (latest / "exit_code").exists():
            return False, f"{latest.name} has not ended"
        if (latest / FETCHED_MARKER).exists():
            return True, f"{latest.name} ended and the controller fetched its outputs"
        result = _find_result(latest)
        if _trained(result) and _push_confirmed(result):
            return True, f"{latest.name} ended and its outputs were pushed to {result['hub'].get('repo')}"
        return False, f"{latest.name} ended; its outputs are neither pushed nor fetched yet"

    def holds_the_only_model(self) -> bool:
        """The latest job trained a model that exists nowhere but here (not pushed, not fetched)."""
        dirs = self.run_dirs()
        if not dirs or not (dirs[-1] / "exit_code").exists() or (dirs[-1] / FETCHED_MARKER).exists():
            return False
        result = _find_result(dirs[-1])
        return _trained(result) and not _push_confirmed(result)


def _trained(result: dict | None) -> bool:
    return bool(result) and result.get("status") == "succeeded"


def _push_confirmed(result: dict) -> bool:
    return bool((result.get("hub") or {}).get("confirmed"))


def _find_result(run_dir: Path) -> dict | None:
    candidates = [run_dir / "outputs" / "result.json", run_dir / "result.json", *run_dir.glob("*/result.json")]
    # The job config may name another output folder (relative to the trainer folder).
    trainer_dir = run_dir.parent.parent
    try:
        job = json.loads((trainer_dir / "job.json").read_text())
        if job.get("run_id") == run_dir.name and job.get("output_dir"):
            candidates.insert(0, trainer_dir / os.path.expanduser(job["output_dir"]) / "result.json")
    except (OSError, ValueError, AttributeError):
        pass
    for candidate in candidates:
        try:
            return json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
    return None


def last_activity(trainer_dir: Path, skip: Path, max_depth: int = 4) -> float:
    """Newest modification time of anything within max_depth levels of the trainer folder.

    Setup counts as activity (files copied, packages landing in the venv's site-packages, logs
    growing), so a long install is not mistaken for an idle instance."""
    newest = 0.0
    base_depth = len(trainer_dir.parts)
    for root, dirs, files in os.walk(trainer_dir):
        root_path = Path(root)
        if root_path == skip:
            dirs[:] = []
            continue
        depth = len(root_path.parts) - base_depth
        with contextlib.suppress(OSError):
            newest = max(newest, root_path.stat().st_mtime)
        if depth >= max_depth:
            dirs[:] = []
            continue
        for name in files:
            with contextlib.suppress(OSError):
                newest = max(newest, (root_path / name).stat().st_mtime)
    return newest


class Watchdog:
    def __init__(self, config_path: Path):
        self.config_path = config_path
        self.state_dir = config_path.parent
        self.state_path = self.state_dir / "state.json"
        self.config: dict = {}
        self.state: dict = {}
        self.reload()

    def reload(self) -> None:
        self.config = {**DEFAULTS, **json.loads(self.config_path.read_text())}
        try:
            self.state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            self.state = {}
        if "first_started" not in self.state:
            self.state["first_started"] = time.time()
            self._save_state()

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.state_path)

    @property
    def trainer_dir(self) -> Path:
        return Path(os.path.expanduser(self.config["trainer_dir"]))

    def api(self) -> LambdaApi:
        env = read_env_file(Path(os.path.expanduser(self.config["env_file"])))
        key = env.get("LAMBDA_API_KEY")
        if not key:
            raise ApiError(f"no LAMBDA_API_KEY in {self.config['env_file']}")
        return LambdaApi(self.config.get("api_url") or DEFAULTS["api_url"], key)

    def started_at(self) -> float:
        return float(self.config.get("started_at") or self.state["first_started"])

    def price_per_hour(self) -> float | None:
        cents = self.state.get("price_cents_per_hour")
        return None if cents is None else cents / 100

    # -- the decision -------------------------------------------------------------------------

    def reason_to_terminate(self, now: float) -> str | None:
        runs = Runs(self.trainer_dir)
        hours = (now - self.started_at()) / 3600
        max_hours, max_cost = self.config.get("max_hours"), self.config.get("max_cost")
        if max_hours and hours >= float(max_hours):
            return f"budget: {hours:.2f} h of max-hours {float(max_hours):g} spent"
        price = self.price_per_hour()
        if max_cost and price is not None and hours * price >= float(max_cost):
            return f"budget: ${hours * price:.2f} of max-cost ${float(max_cost):g} spent"
        running = runs.running_pids()
        if running:
            self.state["last_job_seen"] = now
            return None
        safe, why = runs.finished_and_safe()
        if safe:
            since = self.state.setdefault("safe_since", now)
            if now - since >= float(self.config["finished_grace_seconds"]):
                return f"finished: {why}"
            return None
        self.state.pop("safe_since", None)
        if runs.holds_the_only_model():
            # Idling would lose the trained model; only the budget (above) may end this instance.
            return None
        idle_limit = float(self.config["idle_minutes"]) * 60
        active = max(self.state.get("last_job_seen", 0), self.started_at(), self.state["first_started"],
                     last_activity(self.trainer_dir, self.state_dir))
        if idle_limit > 0 and now - active >= idle_limit:
            return f"idle: no job and no activity for {(now - active) / 60:.1f} min ({why})"
        return None

    def stop_jobs(self) -> None:
        """SIGTERM running jobs' process groups; wait up to grace_seconds for them to save and exit."""
        runs = Runs(self.trainer_dir)
        pids = runs.running_pids()
        if not pids:
            return
        for pid in pids:
            log.info("asking job pid %s to stop (SIGTERM)", pid)
            with contextlib.suppress(OSError):
                group = os.getpgid(pid)
                # The job's own group takes its workers along; never the watchdog's group.
                if group != os.getpgrp():
                    os.killpg(group, signal.SIGTERM)
                else:
                    os.kill(pid, signal.SIGTERM)
        deadline = time.time() + float(self.config["grace_seconds"])
        while time.time() < deadline and any(pid_alive(pid) for pid in pids):
            time.sleep(1)

    def terminate(self, reason: str) -> bool:
        name = self.config["instance_name"]
        log.warning("terminating instance %s: %s", name, reason)
        if reason.startswith("budget"):
            self.stop_jobs()
        instances = self.api().instances_named(name)
        if not instances:
            log.info("no live instance named %s: nothing to terminate", name)
            return True
        self.api().terminate([i["id"] for i in instances])
        log.warning("terminate requested for %s (%s)", name, ", ".join(i["id"] for i in instances))
        self.state["terminated"] = {"at": time.time(), "reason": reason, "ids": [i["id"] for i in instances]}
        self._save_state()
        return True

    def learn_price(self) -> None:
        if "price_cents_per_hour" in self.state:
            return
        instances = self.api().instances_named(self.config["instance_name"])
        if instances:
            self.state["instance_id"] = instances[0]["id"]
            self.state["price_cents_per_hour"] = (instances[0].get("instance_type") or {}).get(
                "price_cents_per_hour")
            self._save_state()
            log.info("watching instance %s (%s), $%.2f/h", self.config["instance_name"], instances[0]["id"],
                     (self.state["price_cents_per_hour"] or 0) / 100)

    def poll(self) -> bool:
        """One look; returns True once the instance has been told to terminate."""
        try:
            self.reload()
            if self.config.get("enabled") is False:
                log.info("disabled in %s: exiting", self.config_path)
                return True
            self.learn_price()
            reason = self.reason_to_terminate(time.time())
            self._save_state()
            if reason:
                return self.terminate(reason)
        except ApiError as error:
            log.error("Lambda Cloud API: %s; retrying at the next poll", error)
        except Exception:
            log.exception("watchdog poll failed; retrying at the next poll")
        return False

    def run(self, once: bool = False) -> None:
        log.info("watchdog started (pid %s) for %s", os.getpid(), self.config.get("instance_name"))
        while True:
            if self.poll() or once:
                return
            time.sleep(float(self.config["poll_seconds"]))


def daemonize(pid_file: Path, log_file: Path) -> None:
    """Detach from the SSH session: double fork, new session, stdio to the log."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    pid_file.write_text(f"{os.getpid()}\n")


def already_running(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid == os.getpid() or not pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid
    return pid if b"watchdog" in cmdline else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="End this Lambda Cloud instance on budget, finish or idle.")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--daemon", action="store_true", help="detach and keep running after logout")
    parser.add_argument("--once", action="store_true", help="look once and exit (for checks)")
    args = parser.parse_args(argv)
    config_path = args.config.expanduser().resolve()
    state_dir = config_path.parent
    pid_file, log_file = state_dir / "watchdog.pid", state_dir / "watchdog.log"
    running = already_running(pid_file)
    if running and not args.once:
        print(f"watchdog already running (pid {running}); it re-reads {config_path} every poll")
        return 0
    if args.daemon:
        daemonize(pid_file, log_file)
    # A daemon's stderr is already the log file; in the foreground, write the log file too.
    handler = logging.StreamHandler() if args.daemon or args.once else logging.FileHandler(log_file)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=[handler])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Watchdog(config_path).run(once=args.once)
    return 0


if __name__ == "__main__":
    sys.exit(main())
