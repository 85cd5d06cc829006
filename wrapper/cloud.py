"""Lambda Cloud calls `lt` makes itself (listings and checks); launches go through the playbooks."""

from __future__ import annotations

import os

import click

from wrapper.project import lambda_cloud


def client(settings):
    """A client for the configured account; LAMBDA_API_BACKOFF / LAMBDA_LAUNCH_INTERVAL tune retries
    exactly as they do for the Ansible modules."""
    settings.require("lambda-cloud-api-key")
    module = lambda_cloud()
    return module.LambdaCloudClient(
        settings["lambda_api_key"], base_url=settings.get("lambda_api_url"),
        backoff=float(os.environ.get("LAMBDA_API_BACKOFF", 1.0)),
        launch_interval=float(os.environ.get("LAMBDA_LAUNCH_INTERVAL", 12.0)))


def instance_type_rows(settings, available_only: bool = False) -> list[dict]:
    catalogue = client(settings).instance_types()
    rows = []
    for name, entry in catalogue.items():
        kind = entry.get("instance_type", {})
        regions = [region["name"] for region in entry.get("regions_with_capacity_available", [])]
        if available_only and not regions:
            continue
        rows.append({
            "name": name,
            "description": kind.get("gpu_description") or kind.get("description") or "",
            "gpus": (kind.get("specs") or {}).get("gpus"),
            "price_per_hour": kind.get("price_cents_per_hour", 0) / 100,
            "regions_with_capacity": regions,
        })
    return sorted(rows, key=lambda row: (row["price_per_hour"], row["name"]))


def print_types(rows: list[dict]) -> None:
    if not rows:
        click.echo("No instance types to show.")
        return
    width = max(len(row["name"]) for row in rows)
    click.echo(f"{'TYPE':<{width}}  {'$/H':>6}  {'GPUS':>4}  {'GPU':<22}  REGIONS WITH CAPACITY")
    for row in rows:
        regions = ", ".join(row["regions_with_capacity"]) or "none now"
        click.echo(f"{row['name']:<{width}}  {row['price_per_hour']:>6.2f}  {row['gpus'] or 0:>4}  "
                   f"{row['description'][:22]:<22}  {regions}")


def first_choice(catalogue: dict, instance_types: list[str], regions: list[str]):
    """The (type, region, cents per hour) a launch would try first, or None when nothing has capacity.

    Capacity listings are not reservations: the playbook may still fail over to a later choice."""
    for type_name in instance_types:
        entry = catalogue.get(type_name)
        if entry is None:
            raise click.ClickException(
                f"unknown instance type {type_name!r}; `lt types` lists them (known: "
                f"{', '.join(sorted(catalogue))})")
        listed = [region["name"] for region in entry.get("regions_with_capacity_available", [])]
        for region in regions or listed:
            if region in listed:
                return type_name, region, entry["instance_type"]["price_cents_per_hour"]
    return None


def price_cents(catalogue: dict, type_name: str | None) -> int | None:
    entry = catalogue.get(type_name or "")
    return entry["instance_type"]["price_cents_per_hour"] if entry else None


def our_instances(api, prefix: str) -> list[dict]:
    """Live instances named with our prefix (`<prefix>-<run id>`)."""
    live = lambda_cloud().LIVE_STATUSES
    return [instance for instance in api.list_instances()
            if (instance.get("name") or "").startswith(f"{prefix}-") and instance.get("status") in live]
