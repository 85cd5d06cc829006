"""`lt status`: local run records, reconciled with what Lambda Cloud says is running."""

from __future__ import annotations

import time

import click

from wrapper import costs
from wrapper.progress import format_duration
from wrapper.records import FINAL_STATUSES, Records, RunNotFound, instance_may_be_running


def gather(settings, run_ref: str | None, limit: int) -> dict:
    records = Records()
    if run_ref:
        try:
            runs = [records.find(run_ref)]
        except RunNotFound:
            raise click.ClickException(f"no run {run_ref!r}; `lt status` lists the runs") from None
    else:
        everything = records.all()
        live = [run for run in everything if instance_may_be_running(run)]
        rest = [run for run in everything if not instance_may_be_running(run)][:limit]
        runs = live + rest
    report = {"runs": runs, "instances": [], "unknown_instances": [], "cloud": "not checked"}
    if settings.get("lambda_api_key"):
        _reconcile(settings, records, report)
    else:
        report["cloud"] = "not checked: no Lambda Cloud API key (set LAMBDA_API_KEY)"
    now = time.time()
    for run in report["runs"]:
        run["cost_so_far"] = costs.cost_so_far(run, now)
        run["hours"] = costs.hours_between(run.get("launched_at"), run.get("terminated_at"), now)
    return report


def _reconcile(settings, records: Records, report: dict) -> None:
    """Mark runs whose instance is gone as terminated; list instances no run knows about."""
    from wrapper import cloud

    try:
        api = cloud.client(settings)
        instances = cloud.our_instances(api, settings["instance_name_prefix"])
    except Exception as error:  # a status display must not fail because the API does
        report["cloud"] = f"unreachable: {error}"
        return
    report["cloud"] = "ok"
    by_key = {}
    for instance in instances:
        by_key[instance["id"]] = instance
        by_key[instance.get("name")] = instance
    known = set()
    for index, run in enumerate(report["runs"]):
        if not instance_may_be_running(run):
            continue
        instance = by_key.get(run.get("instance_id")) or by_key.get(run.get("instance_name"))
        if instance is None:
            if run["instance_state"] == "pending" and time.time() - run["created_at"] < 60:
                continue  # a launch in flight may not be listed yet
            fields = {"instance_state": "terminated", "terminated_at": time.time()}
            if run["status"] not in FINAL_STATUSES:
                # lt stopped before the run did (killed, closed laptop); the watchdog or a person ended it.
                fields.update(status="interrupted", message="lt stopped before the run finished; the "
                              "instance was ended outside lt (the watchdog, the dashboard or another lt)")
            report["runs"][index] = records.update(run["run_id"], **fields)
            continue
        known.add(instance["id"])
        if not run.get("instance_id") or run.get("ip") != instance.get("ip"):
            report["runs"][index] = records.update(run["run_id"], instance_id=instance["id"],
                                                   ip=instance.get("ip"))
    # Instances named like ours but known to no run here (another machine, a lost record).
    all_known = {run.get("instance_id") for run in records.all()} | {
        run.get("instance_name") for run in records.all()}
    for instance in instances:
        row = {"id": instance["id"], "name": instance.get("name"), "status": instance.get("status"),
               "ip": instance.get("ip"), "type": (instance.get("instance_type") or {}).get("name"),
               "region": (instance.get("region") or {}).get("name"),
               "price_per_hour": (instance.get("instance_type") or {}).get("price_cents_per_hour", 0) / 100}
        report["instances"].append(row)
        if instance["id"] not in known and instance["id"] not in all_known and \
                instance.get("name") not in all_known:
            report["unknown_instances"].append(row)


def print_report(report: dict) -> None:
    runs = report["runs"]
    if not runs:
        click.echo("No runs yet. `lt train --local` runs the quickstart; `lt train` a cloud run.")
    else:
        click.echo(f"{'RUN':<21} {'STATUS':<12} {'INSTANCE':<11} {'TYPE':<18} {'REGION':<16} "
                   f"{'$/H':>5} {'UP':>7} {'COST':>8}")
        for run in runs:
            price = run.get("price_cents_per_hour")
            click.echo(f"{run['run_id']:<21} {run['status']:<12} {_instance(run):<11} "
                       f"{run.get('instance_type') or '-':<18} {run.get('region') or '-':<16} "
                       f"{(price / 100 if price else 0):>5.2f} "
                       f"{format_duration(run['hours'] * 3600) if run.get('launched_at') else '-':>7} "
                       f"{costs.money(run['cost_so_far']):>8}")
    for run in runs:
        if run["instance_state"] in ("pending", "active", "left-running"):
            click.echo(f"  {run['run_id']}: instance {run.get('instance_name')} "
                       f"({run.get('instance_id') or 'id unknown'}) is running; end it with "
                       f"`lt down {run['run_id']}`")
    if report["cloud"] != "ok":
        click.echo(f"Lambda Cloud {report['cloud']}")
    for row in report["unknown_instances"]:
        click.secho(f"! instance {row['name']} ({row['id']}, {row['type']}, {row['region']}, "
                    f"{row['status']}, ${row['price_per_hour']:.2f}/h) belongs to no run here; "
                    f"`lt down --all` ends every instance with this prefix", fg="red", err=True)


def _instance(run: dict) -> str:
    if run["kind"] == "local":
        return "local"
    return {"pending": "launching", "active": "running", "left-running": "running!",
            "terminated": "terminated"}.get(run["instance_state"], run["instance_state"])
