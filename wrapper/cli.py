"""`lt`: fine-tune Llama 3 Instruct on a Lambda Cloud GPU (or on this machine) with Ansible.

Commands parse options and present results; the work lives in the modules next to this one. Only
click is imported at startup so that `lt --help` answers at once: ansible-runner, requests and the
training stack are imported inside the commands that use them.
"""

from __future__ import annotations

import json
import os
import sys

import click

from wrapper import __version__

DEBUG_ENV = "LT_DEBUG"


class LtGroup(click.Group):
    """Shows failures as one message with the fix; LT_DEBUG=1 shows the traceback instead."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            if os.environ.get(DEBUG_ENV):
                raise
            raise click.ClickException(_describe(error)) from None


def _describe(error: Exception) -> str:
    # The Lambda client's and the config table's errors already say what to do.
    known = {"LambdaCloudError", "ConfigError", "JobConfigError"}
    if any(cls.__name__ in known for cls in type(error).__mro__):
        return str(error)
    return f"{type(error).__name__}: {error} (set {DEBUG_ENV}=1 to see the traceback)"


# -- shared options ------------------------------------------------------------------------------

def config_option(command):
    return click.option("-c", "--config", "config", type=click.Path(dir_okay=False), envvar="LT_CONFIG", show_envvar=True,
                        help="Config file (default: config/trainer.json).")(command)


def set_option(command):
    return click.option("-s", "--set", "set_options", multiple=True, metavar="KEY=VALUE",
                        help="Any config key for this run, e.g. -s learning-rate=1e-4 (repeatable).")(command)


def json_option(command):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(command)


def yes_option(command):
    return click.option("-y", "--yes", is_flag=True, envvar="LT_YES", show_envvar=True,
                        help="Do not ask for confirmation (launches cost money).")(command)


def extra_vars_option(command):
    return click.option("-e", "--extra-vars", "extra_vars", multiple=True, metavar="VARS",
                        help="Ansible variables for the playbooks: KEY=VALUE, a JSON object or @FILE "
                             "(repeatable; also $LT_EXTRA_VARS, a JSON object). Never secrets.")(command)


def _extra(extra_vars) -> dict:
    from wrapper import extravars

    return extravars.parse(extra_vars)


def run_argument(command):
    return click.argument("run", required=False, metavar="[RUN]")(command)


def cloud_options(command):
    for decorator in reversed([
        click.option("-t", "--type", "instance_types", multiple=True, metavar="TYPE",
                     help="Instance type, in order of preference (repeatable; `lt types` lists them)."),
        click.option("-r", "--region", "regions", multiple=True, metavar="REGION",
                     help="Region, in order of preference (repeatable; default: any with capacity)."),
    ]):
        command = decorator(command)
    return command


def budget_options(command):
    for decorator in reversed([
        click.option("--max-hours", type=float, envvar="LT_MAX_HOURS", show_envvar=True,
                     help="Time budget: the on-instance watchdog terminates the instance after it."),
        click.option("--max-cost", type=float, envvar="LT_MAX_COST", show_envvar=True,
                     help="Cost budget in dollars, enforced by the watchdog."),
        click.option("--watchdog/--no-watchdog", default=None,
                     help="Run the watchdog that ends the instance on budget or when the job is done "
                          "(default: on; it puts the API key, mode 0600, on the instance)."),
    ]):
        command = decorator(command)
    return command


def job_options(command):
    for decorator in reversed([
        click.option("--base-model", metavar="REPO_OR_DIR", help="Base model: Hub repo id or local directory."),
        click.option("--dataset", metavar="REPO_OR_PATH",
                     help="Chats dataset: Hub dataset repo id, or a local .jsonl file or folder."),
        click.option("--max-steps", type=int, help="Optimizer steps (-1: from the number of epochs)."),
        click.option("--hub-repo", metavar="REPO", help="Model repo to push the results to."),
    ]):
        command = decorator(command)
    return command


def _settings(config, set_options=(), **flags):
    from wrapper.settings import load_settings

    settings = load_settings(config, flags, set_options)
    for warning in settings.warnings:
        click.secho(f"Warning: {warning}", fg="yellow", err=True)
    return settings


def _flags(instance_types=(), regions=(), max_hours=None, max_cost=None, watchdog=None, base_model=None,
           dataset=None, max_steps=None, hub_repo=None):
    """Option values under their config variable names."""
    return {"instance_types": instance_types, "regions": regions, "max_hours": max_hours,
            "max_cost": max_cost, "watchdog": watchdog, "base_model": base_model, "dataset": dataset,
            "max_steps": max_steps, "hub_repo": hub_repo}


def _print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


# -- the group -----------------------------------------------------------------------------------

@click.group(cls=LtGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="lt")
def cli():
    """Fine-tune Llama 3 Instruct on a Lambda Cloud GPU, or on this machine.

    Example usage:

    \b
        lt config init          # write config/trainer.json, then fill in the keys
        lt train --local        # offline quickstart: example chats, tiny model, about a minute on CPU
        lt train                # up, push, configure, install, train, down
        lt status               # runs, instances and what they cost so far
    """


# -- lifecycle verbs -----------------------------------------------------------------------------

@cli.command(name="up")
@config_option
@cloud_options
@budget_options
@set_option
@extra_vars_option
@yes_option
@run_argument
def up_command(config, instance_types, regions, max_hours, max_cost, watchdog, set_options, extra_vars, yes,
               run):
    """Launch a GPU instance for a new run.

    Picks the first instance type and region with capacity, in your order of preference, and waits
    until it is active and answers SSH. Run again (or given RUN), it reuses the instance that a
    run brought up and has not trained on yet.

    Example usage:

    \b
        lt up -t gpu_1x_a100_sxm4 -t gpu_1x_a10 --max-hours 3
    """
    from wrapper import lifecycle

    settings = _settings(config, set_options, **_flags(instance_types, regions, max_hours, max_cost, watchdog))
    lifecycle.up(settings, run, yes, _extra(extra_vars))


def _step_command(name: str, summary: str, example: str):
    """push, configure and install: run one playbook against a run's instance."""

    @config_option
    @set_option
    @extra_vars_option
    @run_argument
    def command(config, set_options, extra_vars, run, **flags):
        from wrapper import lifecycle

        settings = _settings(config, set_options, **_flags(**flags))
        lifecycle.step(name, settings, run, _extra(extra_vars))

    command.__doc__ = f"""{summary}

    RUN is a run id (or its start), an instance name or id; default: the latest run with an
    instance.

    Example usage:

    \b
        {example}
    """
    return command


push_command = cli.command(name="push")(job_options(_step_command(
    "push", "Copy the job code and local dataset files to the instance.", "lt push --dataset data/chats")))
configure_command = cli.command(name="configure")(budget_options(job_options(_step_command(
    "configure", "Write the job config and 0600 secrets file; start the watchdog.",
    "lt configure --max-hours 4"))))
install_command = cli.command(name="install")(_step_command(
    "install", "Create the venv and install the pinned training packages.", "lt install"))


@cli.command(name="train")
@config_option
@cloud_options
@budget_options
@job_options
@set_option
@extra_vars_option
@click.option("--local", is_flag=True, help="Train on this machine: no cloud, no accounts.")
@click.option("-d", "--detach", is_flag=True, help="Return once the job has started; `lt logs -f` reattaches.")
@click.option("--skip-preflight", is_flag=True, envvar="LT_SKIP_PREFLIGHT", show_envvar=True,
              help="Launch without checking the data here first (the job still checks it on the instance).")
@yes_option
@run_argument
def train_command(config, instance_types, regions, max_hours, max_cost, watchdog, base_model, dataset,
                  max_steps, hub_repo, set_options, extra_vars, local, detach, skip_preflight, yes, run):
    """Train a model: the whole lifecycle when no instance is up.

    With no instance up this runs up, push, configure, install, train and down, after showing the
    instance type, its price and an estimate of the cost, and asking to go on.

    --local runs the same job on this machine; without --config it uses the quickstart settings
    (examples/quickstart.json: the example chats and a tiny model built on the spot when no base
    model is reachable) and writes the merged model to ./outputs/RUN/.

    Example usage:

    \b
        lt train --local
        lt train --max-steps 200 --max-hours 2 --yes
        lt train --detach && lt logs -f
    """
    flags = _flags(instance_types, regions, max_hours, max_cost, watchdog, base_model, dataset, max_steps,
                   hub_repo)
    if local:
        from wrapper import local as local_run

        local_run.train_local(config, set_options, flags, _extra(extra_vars))
        return
    from wrapper import lifecycle

    settings = _settings(config, set_options, **flags)
    lifecycle.train(settings, run, yes, detach, _extra(extra_vars), skip_preflight)


@cli.command(name="down")
@config_option
@click.option("--all", "all_instances", is_flag=True,
              help="End every instance whose name has our prefix, known to a run or not.")
@extra_vars_option
@yes_option
@run_argument
def down_command(config, all_instances, extra_vars, yes, run):
    """Terminate a run's instance; safe to repeat.

    The instance's disk, with the job's secrets on it, goes with it; the API is asked again
    afterwards to confirm that nothing named for the run is left running.

    Example usage:

    \b
        lt down                 # the latest run's instance
        lt down 20260101-1200   # a given run
        lt down --all --yes     # every instance named with our prefix
    """
    from wrapper import lifecycle

    settings = _settings(config)
    if all_instances:
        lifecycle.down_all(settings, yes, _extra(extra_vars))
    else:
        lifecycle.down(settings, run, _extra(extra_vars))


# -- looking at runs -----------------------------------------------------------------------------

@cli.command(name="status")
@config_option
@json_option
@click.option("-n", "--limit", type=int, default=10, show_default=True, help="Finished runs to show.")
@run_argument
def status_command(config, as_json, limit, run):
    """Runs, their instances and what they cost so far.

    Also flags any instance named with our prefix that no local run knows about.

    Example usage:

    \b
        lt status
        lt status --json
    """
    from wrapper import status

    report = status.gather(_settings(config), run, limit)
    if as_json:
        _print_json(report)
    else:
        status.print_report(report)


@cli.command(name="logs")
@config_option
@click.option("-f", "--follow", is_flag=True, help="Keep showing progress until the job ends.")
@click.option("-n", "--lines", type=int, default=40, show_default=True, help="Log lines to show first.")
@click.option("--raw", is_flag=True, help="Print the log as it is, without the progress display.")
@extra_vars_option
@run_argument
def logs_command(config, follow, lines, raw, extra_vars, run):
    """Show a run's training log; -f follows it until the job ends.

    Following reattaches to a detached run: progress, the result, and the end of the instance.

    Example usage:

    \b
        lt logs -f
        lt logs 20260101-1200 -n 200 --raw
    """
    from wrapper import logs

    logs.show(_settings(config), run, follow=follow, lines=lines, raw=raw, extra_vars=_extra(extra_vars))


@cli.command(name="ssh", context_settings={"ignore_unknown_options": True})
@config_option
@extra_vars_option
@click.argument("run", required=False, metavar="[RUN]")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh_command(config, extra_vars, run, command):
    """Open a shell on a run's instance (or run COMMAND there).

    Example usage:

    \b
        lt ssh
        lt ssh 20260101-1200 -- nvidia-smi
    """
    from wrapper import remote

    remote.open_ssh(_settings(config), run, list(command), _extra(extra_vars))


@cli.command(name="types")
@config_option
@json_option
@click.option("-a", "--available", is_flag=True, help="Only types with capacity somewhere now.")
def types_command(config, as_json, available):
    """Instance types, their price per hour and regions with capacity.

    Example usage:

    \b
        lt types --available
    """
    from wrapper import cloud

    rows = cloud.instance_type_rows(_settings(config), available_only=available)
    if as_json:
        _print_json(rows)
    else:
        cloud.print_types(rows)


@cli.command(name="preflight")
@config_option
@job_options
@set_option
@json_option
def preflight_command(config, base_model, dataset, max_steps, hub_repo, set_options, as_json):
    """Run the training job's checks here, before any launch.

    Config, data (every line), chat template, assistant mask, lengths, memory fit.

    Example usage:

    \b
        lt preflight --dataset data/chats
    """
    from wrapper import preflight

    settings = _settings(config, set_options, **_flags(base_model=base_model, dataset=dataset,
                                                         max_steps=max_steps, hub_repo=hub_repo))
    sys.exit(preflight.run(settings, as_json=as_json))


@cli.command(name="export")
@click.argument("target", required=False, metavar="[RUN_OR_FOLDER]")
@click.option("-o", "--out", type=click.Path(file_okay=False),
              help="Output folder (default: export/ next to the merged model).")
@click.option("-f", "--formats", default="gguf-q8_0", show_default=True, envvar="LT_EXPORT_FORMATS", show_envvar=True,
              help="Comma-separated GGUF formats (gguf-f16, gguf-q8_0); the first is Ollama's.")
@click.option("--name", help="Model name for the files and `ollama create` (default: the folder's name).")
@json_option
def export_command(target, out, formats, name, as_json):
    """Export a merged model as GGUF plus an Ollama Modelfile.

    RUN_OR_FOLDER is a run id, a run's output folder or a merged model folder; default: the latest
    local run.

    Example usage:

    \b
        lt export                              # the latest `lt train --local` run
        lt export outputs/20260101-1200/merged -f gguf-f16,gguf-q8_0
    """
    from wrapper import export

    sys.exit(export.run(target, out, formats, name, as_json))


# -- configuration -------------------------------------------------------------------------------

@cli.group(name="config", cls=LtGroup)
def config_group():
    """Write, show and check the configuration."""


@config_group.command(name="init")
@click.option("--path", type=click.Path(dir_okay=False), default="config/trainer.json", show_default=True,
              help="Where to write the config file.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def config_init(path, force):
    """Write a config file with every key (mode 0600).

    Example usage:

    \b
        lt config init && $EDITOR config/trainer.json
    """
    from wrapper import config_commands

    config_commands.init(path, force)


@config_group.command(name="show")
@config_option
@set_option
@json_option
def config_show(config, set_options, as_json):
    """Show the settings in effect and their sources (secrets hidden).

    Example usage:

    \b
        LAMBDA_API_KEY=... lt config show --json
    """
    from wrapper import config_commands

    config_commands.show(_settings(config, set_options), as_json)


@config_group.command(name="check")
@config_option
@set_option
@click.option("--local", is_flag=True, help="Check for `lt train --local` (no cloud keys needed).")
def config_check(config, set_options, local):
    """Check the settings for a run: keys, files, permissions.

    Example usage:

    \b
        lt config check
    """
    from wrapper import config_commands

    sys.exit(config_commands.check(_settings(config, set_options), local=local))


def main() -> None:
    cli(prog_name="lt")
