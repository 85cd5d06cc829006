"""The cloud lifecycle verbs: up, push, configure, install, train, down.

Two rules shape everything here. Every launch is recorded before anything can fail (the run record
holds the instance's name from the start, and its id as soon as the launch task reports it). And
every way out (success, failure, Ctrl-C, SIGTERM, a bug) ends with the instance terminated, or with
a loud warning naming it and the command that ends it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from wrapper import cloud, costs
from wrapper import records as run_records
from wrapper.progress import Progress
from wrapper.runner import Interrupts, PlaybookResult, run_playbook

# Statuses of runs whose instance was prepared step by step: `lt train` trains on it.
PREPARED = ("up", "pushed", "configured", "installed")
STEP_STATUS = {"push": "pushed", "configure": "configured", "install": "installed"}
TAIL_LINES_PER_POLL = 100


class Run:
    """One run: its record, its settings and how to talk about its instance."""

    def __init__(self, settings, record: dict, extra_vars: dict | None = None):
        self.settings = settings
        self.records = run_records.Records()
        self.record = record
        self.extra_vars = extra_vars or {}
        self.after_launch = "up"  # the status once the instance is known

    @property
    def id(self) -> str:
        return self.record["run_id"]

    def update(self, **fields) -> dict:
        self.record = self.records.update(self.id, **fields)
        return self.record

    def cost(self) -> float | None:
        return costs.cost_so_far(self.record)

    def down_command(self) -> str:
        return f"lt down {self.id}"

    def describe_instance(self) -> str:
        record = self.record
        return f"{record['instance_name']} ({record.get('instance_id') or 'id not known yet'})"

    # -- running playbooks ------------------------------------------------------------------------

    def extravars(self, **more) -> dict:
        """The run's identity, the settings given as flags, local paths made absolute (the playbooks
        run in the project folder) and the user's extra vars. Never a secret."""
        settings = self.settings
        variables = {var: value for var, value in settings.public_values().items()
                     if settings.sources.get(var) == "flag"}
        for var in ("dataset", "base_model", "ssh_identity_file"):
            value = settings.get(var)
            if isinstance(value, str) and value and Path(value).expanduser().exists():
                variables[var] = str(Path(value).expanduser().resolve())
        if settings.config_exists:
            variables["config_file"] = str(settings.config_path.resolve())
        variables.update(run_id=self.id, instance_name=self.record["instance_name"],
                         train_fetch_dir=str(Path.cwd() / "outputs"),
                         # Enough lines per poll that the progress display misses few step events.
                         train_tail_lines=TAIL_LINES_PER_POLL)
        if self.record.get("launched_at"):
            variables["launched_at"] = self.record["launched_at"]
        variables.update(self.extra_vars)
        variables.update(more)
        return variables

    def playbook(self, name: str, progress: Progress, interrupts: Interrupts | None = None,
                 **more) -> PlaybookResult:
        return run_playbook(name, self.extravars(**more), secrets=self.settings.secrets_env(),
                            progress=progress, cancelled=interrupts, on_event=self.learn_from_event)

    def learn_from_event(self, event: dict) -> None:
        """Record the instance as soon as the launch (or find) task reports it."""
        if event.get("event") != "runner_on_ok":
            return
        res = (event.get("event_data") or {}).get("res") or {}
        instance = res.get("instance")
        if not isinstance(instance, dict) or instance.get("name") != self.record["instance_name"]:
            found = [i for i in res.get("instances") or [] if isinstance(i, dict)
                     and i.get("name") == self.record["instance_name"]]
            instance = found[0] if found else None
        if not instance or not instance.get("id"):
            return
        fields = {"instance_id": instance["id"], "ip": instance.get("ip"), "instance_state": "active"}
        if self.record["status"] == "launching":
            fields["status"] = self.after_launch
        for field, key in (("instance_type", "instance_type"), ("region", "region"),
                           ("price_cents_per_hour", "price_cents_per_hour")):
            value = instance.get(key)
            if isinstance(value, dict):
                value = value.get("name") if key != "price_cents_per_hour" else None
            if value is not None:
                fields[field] = value
        self.update(**fields)

    # -- ending the instance ----------------------------------------------------------------------

    def ensure_terminated(self, why: str) -> bool:
        """Terminate the run's instance through the API (by id and by name); True when none is left.

        Used on every path that must not leave the instance running; a failure is shouted, never
        swallowed."""
        name, instance_id = self.record["instance_name"], self.record.get("instance_id")
        try:
            api = cloud.client(self.settings)
            live = [i for i in api.list_instances() if (i.get("name") == name or i["id"] == instance_id)
                    and i.get("status") in ("booting", "active", "unhealthy")]
            if live:
                api.terminate([i["id"] for i in live])
        except Exception as error:
            self.update(instance_state="left-running", message=f"terminate failed: {error}")
            warn_left_running(self, f"{why}, but terminating it failed: {error}")
            return False
        fields = {"instance_state": "terminated"}
        if not self.record.get("terminated_at"):
            fields["terminated_at"] = time.time()
        if live and not instance_id:
            fields["instance_id"] = live[0]["id"]
        self.update(**fields)
        if live:
            click.echo(f"Terminated {self.describe_instance()} ({why}).", err=True)
        return True

    def mark_terminated_if_gone(self) -> bool:
        """After a playbook that ends in teardown: check with the API and record what is true."""
        return self.ensure_terminated("the run is over")


def warn_left_running(run: Run, why: str) -> None:
    price = run.record.get("price_cents_per_hour")
    rate = f" at ${price / 100:.2f}/h" if price else ""
    click.secho(
        f"\n!!! Instance {run.describe_instance()} MAY STILL BE RUNNING{rate}: {why}.\n"
        f"!!! End it with: {run.down_command()}   (or in the Lambda Cloud dashboard)\n",
        fg="red", bold=True, err=True)


# -- choosing and confirming a launch ------------------------------------------------------------------

def plan_launch(settings, yes: bool, with_estimate: bool = True) -> tuple[str, str, int]:
    """Show the instance type, its price and the estimate; ask to go on unless --yes."""
    settings.require("lambda-cloud-api-key", "lambda-cloud-ssh-key-name")
    catalogue = cloud.client(settings).instance_types()
    choice = cloud.first_choice(catalogue, settings["instance_types"], settings["regions"])
    if choice is None:
        raise click.ClickException(
            f"no capacity now for {', '.join(settings['instance_types'])}"
            + (f" in {', '.join(settings['regions'])}" if settings["regions"] else "")
            + "; `lt types --available` shows where there is capacity; add those types or regions "
              "(-t TYPE, -r REGION, or instance-types / regions in the config)")
    type_name, region, cents = choice
    click.echo(f"Instance: {type_name} in {region}, ${cents / 100:.2f}/h "
               f"(first choice with capacity of {', '.join(settings['instance_types'])}).", err=True)
    if with_estimate:
        estimate = costs.estimate(settings.values, type_name, cents)
        click.echo(f"Cost: {estimate.summary()}.", err=True)
    budget = costs.budget_hours(settings.values, cents)
    if settings.get("watchdog", True):
        if budget is not None:
            click.echo(f"The watchdog on the instance ends it after {budget:.2g} h at the latest, even if "
                       "this computer goes away.", err=True)
    else:
        click.secho("Warning: --no-watchdog: nothing on the instance will end it if `lt` is stopped; "
                    "`lt down` ends it.", fg="yellow", err=True)
    if not yes and not click.confirm("Launch it?", default=False, err=True):
        raise click.ClickException("not launched")
    return choice


def new_run(settings, choice, extra_vars: dict) -> Run:
    """The record comes first: before the launch request can fail or be interrupted."""
    type_name, region, cents = choice
    run_id = run_records.new_run_id()
    record = run_records.Records().create(
        run_id, "cloud", "launching", instance_state="pending",
        instance_name=f"{settings['instance_name_prefix']}-{run_id}", instance_type=type_name, region=region,
        price_cents_per_hour=cents, launched_at=time.time(), watchdog=bool(settings.get("watchdog", True)),
        settings=settings.public_values())
    return Run(settings, record, extra_vars)


def find_run(settings, ref: str | None, extra_vars: dict, statuses: tuple[str, ...] | None = None) -> Run:
    """The run named by ``ref``, else the latest with a running instance."""
    records = run_records.Records()
    if ref:
        try:
            record = records.find(ref)
        except run_records.RunNotFound:
            raise click.ClickException(f"no run {ref!r}; `lt status` lists the runs") from None
    else:
        record = next((r for r in records.all() if run_records.instance_may_be_running(r)
                       and (statuses is None or r["status"] in statuses)), None)
        if record is None:
            raise click.ClickException("no run with a running instance; `lt up` launches one")
    return Run(settings, record, extra_vars)


# -- the verbs -------------------------------------------------------------------------------------------

def up(settings, ref: str | None, yes: bool, extra_vars: dict) -> Run:
    """A new run's instance; or, given a run (or with a prepared run's instance still up), that one again."""
    run = find_run(settings, ref, extra_vars) if ref else _prepared_run(settings, None, extra_vars)
    if ref and not run_records.instance_may_be_running(run.record):
        raise click.ClickException(f"run {run.id}'s instance is gone; `lt up` starts a new run")
    if run is not None:
        click.echo(f"Run {run.id}: reusing {run.describe_instance()} (a new run: `lt down {run.id}` first)",
                   err=True)
    else:
        run = new_run(settings, plan_launch(settings, yes, with_estimate=False), extra_vars)
        click.echo(f"Run {run.id}: launching {run.record['instance_name']}", err=True)
    _guarded(run, "up", terminate_on_failure=run.record["status"] == "launching")
    if run.record["status"] in ("launching", *PREPARED):
        run.update(status="up" if run.record["status"] == "launching" else run.record["status"])
    record = run.record
    click.echo(f"✓ {run.describe_instance()} is up at {record.get('ip')}: {record.get('instance_type')} in "
               f"{record.get('region')}, ${(record.get('price_cents_per_hour') or 0) / 100:.2f}/h.")
    click.secho(f"It bills until it is terminated: `lt train {run.id}` trains on it; `lt configure` starts "
                f"the watchdog; {run.down_command()} ends it.", fg="yellow", err=True)
    return run


def step(name: str, settings, ref: str | None, extra_vars: dict) -> None:
    """push, configure, install: one playbook on a run's instance; the instance stays up."""
    run = find_run(settings, ref, extra_vars)
    if name == "configure" and not settings.get("watchdog", True):
        click.secho("Warning: the watchdog is off: nothing on the instance will end it; "
                    f"{run.down_command()} does.", fg="yellow", err=True)
    _guarded(run, name, terminate_on_failure=False)
    if run.record["status"] in PREPARED:
        run.update(status=STEP_STATUS[name])
    click.echo(f"✓ {name}: done on {run.describe_instance()} (run {run.id}).")


def train(settings, ref: str | None, yes: bool, detach: bool, extra_vars: dict,
          skip_preflight: bool = False) -> None:
    from wrapper import config_commands, preflight

    prepared = _prepared_run(settings, ref, extra_vars)
    if prepared is None:
        settings.require("dataset", "lambda-cloud-api-key", "lambda-cloud-ssh-key-name")
        problems = config_commands.problems(settings, local=False)
        if problems:
            raise click.ClickException("the settings are not ready for a run:\n  - " + "\n  - ".join(problems))
    if not skip_preflight:
        settings.require("dataset")
        preflight.before_launch(settings)
    if prepared is not None:
        _train_on(prepared, detach)
        return
    choice = plan_launch(settings, yes)
    run = new_run(settings, choice, extra_vars)
    click.echo(f"Run {run.id}: up → push → configure → install → train → down on "
               f"{run.record['instance_name']}", err=True)
    more = {"down_after_train": "never", "train_detach": True} if detach else {"down_after_train": "always"}
    run.after_launch = "training"
    run.update(detached=detach, down_after=True)
    _guarded(run, "train", terminate_on_failure=True, **more)
    if detach:
        _detached(run)
        return
    _finished(run)
    run.mark_terminated_if_gone()
    _say_finished(run)


def down(settings, ref: str | None, extra_vars: dict) -> None:
    if not ref and run_records.Records().latest(live_instance=True) is None:
        click.echo("Nothing to end: no run has a running instance (`lt status` checks with Lambda Cloud).")
        return
    run = find_run(settings, ref, extra_vars) if ref else _latest_live(settings, extra_vars)
    result = run.playbook("down", Progress(cost=run.cost))
    gone = run.ensure_terminated("lt down")
    if run.record["status"] not in run_records.FINAL_STATUSES:
        run.update(status="stopped")
    if not gone:
        raise click.ClickException(f"{run.describe_instance()} could not be terminated")
    if not result.ok:
        click.echo("down.yml reported a problem, but the API confirms the instance is gone.", err=True)
    spent = run.cost()
    click.echo(f"✓ {run.describe_instance()} is terminated"
               + (f"; it cost {costs.money(spent)}" if spent is not None else "") + ".")


def down_all(settings, yes: bool, extra_vars: dict) -> None:
    api = cloud.client(settings)
    prefix = settings["instance_name_prefix"]
    live = cloud.our_instances(api, prefix)
    if not live:
        click.echo(f"No running instance is named {prefix}-*.")
        return
    for instance in live:
        click.echo(f"  {instance.get('name')} ({instance['id']}), {instance.get('status')}", err=True)
    if not yes and not click.confirm(f"Terminate these {len(live)} instance(s)?", default=False, err=True):
        raise click.ClickException("nothing terminated")
    progress = Progress()
    variables = {**extra_vars, "down_all": True}
    if settings.config_exists:
        variables["config_file"] = str(settings.config_path.resolve())
    run_playbook("down", variables, secrets=settings.secrets_env(), progress=progress)
    left = cloud.our_instances(api, prefix)
    if left:
        api.terminate([i["id"] for i in left])  # the playbook missed some: the API call is the backstop
    records = run_records.Records()
    for record in records.all():
        if record.get("instance_name") in {i.get("name") for i in live} and record["instance_state"] != "terminated":
            records.update(record["run_id"], instance_state="terminated", terminated_at=time.time())
    click.echo(f"✓ terminated {len(live)} instance(s) named {prefix}-*.")


# -- helpers -----------------------------------------------------------------------------------------------

def _latest_live(settings, extra_vars: dict) -> Run:
    return find_run(settings, None, extra_vars)


def _prepared_run(settings, ref: str | None, extra_vars: dict) -> Run | None:
    """The run to train on when its instance was brought up step by step, else None (a new run)."""
    if ref:
        run = find_run(settings, ref, extra_vars)
        if not run_records.instance_may_be_running(run.record):
            raise click.ClickException(f"run {run.id} has no running instance; `lt train` without a run "
                                       "starts a new one")
        return run
    try:
        return find_run(settings, None, extra_vars, statuses=PREPARED)
    except click.ClickException:
        return None


def _train_on(run: Run, detach: bool) -> None:
    click.echo(f"Run {run.id}: training on {run.describe_instance()} (it stays up afterwards)", err=True)
    more = {"down_after_train": "never"}
    if detach:
        more["train_detach"] = True
    run.update(status="training", detached=detach)
    _guarded(run, "train", terminate_on_failure=False, **more)
    if detach:
        _detached(run)
        return
    _finished(run)
    _say_finished(run)
    _say_still_running(run)


def _say_still_running(run: Run) -> None:
    watchdog = ("the watchdog ends it once the job's outputs are safe or the budget is spent; "
                if run.record.get("watchdog") else "")
    click.secho(f"{run.describe_instance()} is still running: {watchdog}{run.down_command()} ends it now.",
                fg="yellow", err=True)


def _guarded(run: Run, playbook: str, terminate_on_failure: bool, **more) -> PlaybookResult:
    """Run a playbook for ``run``; interrupted or failed (and terminate_on_failure), end the instance."""
    progress = Progress(cost=run.cost)

    def on_signal(signum: int) -> None:
        if signum > 0:
            progress.line("Interrupted: stopping, then terminating the instance…")
        else:
            progress.line("Still cleaning up: the instance is being terminated, please wait.")

    try:
        with Interrupts(on_signal) as interrupts:
            result = run.playbook(playbook, progress, interrupts, **more)
            if interrupts.received:
                run.update(status="interrupted", message="interrupted by the user")
                if run.ensure_terminated("interrupted"):
                    raise click.ClickException(f"run {run.id} interrupted; its instance is terminated")
                raise click.ClickException(f"run {run.id} interrupted")
    except click.ClickException:
        raise
    except BaseException as error:
        # A bug or an unexpected stop in lt itself: the instance must not outlive it unnoticed.
        run.update(status="failed", message=f"{type(error).__name__}: {error}")
        if terminate_on_failure:
            run.ensure_terminated(f"lt failed: {type(error).__name__}")
        else:
            warn_left_running(run, f"lt failed: {type(error).__name__}")
        raise
    if not result.ok:
        message = "; ".join(progress.failures) or f"{playbook}.yml failed ({result.status})"
        run.update(status="failed", message=message)
        _keep_result(run)
        progress.show_tail()
        if outputs_only_on_instance(result):
            # The trained model is neither pushed nor fetched: ending the instance would lose it.
            run.update(instance_state="kept", message=message)
            warn_left_running(run, "its trained model exists only there and could not be fetched; "
                                   f"fetch it with `lt logs -f {run.id}`, then end it")
        elif terminate_on_failure:
            run.ensure_terminated(f"{playbook} failed")
        else:
            warn_left_running(run, f"{playbook} failed and the instance was kept for you to look at")
        raise click.ClickException(f"run {run.id}: {playbook} failed: {message}")
    return result


def trained_model_is_safe(run: Run) -> bool:
    """False when the job trained a model that is neither confirmed on the Hub nor fetched here."""
    result = (run.record.get("outputs") or {}).get("result") or {}
    if result.get("status") != "succeeded":
        return True  # no finished model to lose
    if (result.get("hub") or {}).get("confirmed"):
        return True
    return (Path.cwd() / "outputs" / run.id / "merged").is_dir()


def outputs_only_on_instance(result: PlaybookResult) -> bool:
    """train.yml / reattach.yml say so (set_stats) when the outputs are on the instance alone."""
    return bool(result.artifact_data.get("outputs_kept_on"))


def _keep_result(run: Run) -> dict | None:
    """Read the result.json the train role fetched into ./outputs/<run>/ into the record."""
    path = Path.cwd() / "outputs" / run.id / "result.json"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    run.update(outputs={"result": result, "fetched_to": str(path.parent)})
    return result


def _finished(run: Run) -> None:
    result = _keep_result(run)
    status = (result or {}).get("status")
    run.update(status="succeeded" if status in (None, "succeeded") else "failed")


def _say_finished(run: Run) -> None:
    result = (run.record.get("outputs") or {}).get("result") or {}
    hub = result.get("hub") or {}
    parts = [f"✓ run {run.id} {run.record['status']}"]
    if result.get("steps"):
        parts.append(f"{result['steps']} steps")
    for name in ("train_loss", "eval_loss"):
        if isinstance(result.get(name), int | float):
            parts.append(f"{name.replace('_', ' ')} {result[name]:.4f}")
    if hub.get("repo"):
        parts.append(f"model: {hub.get('commit_url') or hub['repo']}")
    fetched = (run.record.get("outputs") or {}).get("fetched_to")
    if fetched:
        parts.append(f"result and log in {fetched}")
    spent = run.cost()
    if spent is not None:
        parts.append(f"cost {costs.money(spent)}")
    click.echo(", ".join(parts) + ".")


def _detached(run: Run) -> None:
    run.update(status="training", detached=True)
    click.echo(f"✓ run {run.id} is training on {run.describe_instance()}. Follow it: lt logs -f {run.id}")
    if run.record.get("watchdog"):
        click.echo("The watchdog on the instance ends it when the job is done and its outputs are safe, or "
                   "when the budget is spent.", err=True)
    else:
        warn_left_running(run, "the run is detached and the watchdog is off")


def follow(run: Run, **variables) -> None:
    """Follow a running job to its end (reattach.yml), then finish the run as `lt train` would have:
    record the result and, for a run that owns its instance, terminate it."""
    progress = Progress(cost=run.cost, quiet_tasks=True)
    with Interrupts(lambda signum: progress.line("Stopped following; the job keeps running.")) as interrupts:
        result = run.playbook("reattach", progress, interrupts, **variables)
    if interrupts.received:
        click.echo(f"Follow it again: lt logs -f {run.id}", err=True)
        if not run.record.get("watchdog"):
            warn_left_running(run, "nothing on the instance will end it (the watchdog is off)")
        return
    if not result.ok:
        run.update(status="failed", message="; ".join(progress.failures) or "the training job failed")
        _keep_result(run)
    else:
        _finished(run)
    if run.record.get("down_after") and (outputs_only_on_instance(result) or not trained_model_is_safe(run)):
        warn_left_running(run, "its trained model exists only there and could not be fetched; "
                               f"`lt logs -f {run.id}` tries again")
    elif run.record.get("down_after"):
        run.playbook("down", Progress(cost=run.cost, quiet_tasks=True))
        run.ensure_terminated("the run is over")
    if not result.ok:
        progress.show_tail()
        raise click.ClickException(f"run {run.id} failed: {run.record.get('message')}")
    _say_finished(run)
    if not run.record.get("down_after"):
        _say_still_running(run)
