"""`lt` as a user meets it first: help, configuration, types and status, each a real process."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from tests.cli_support import REPO_ROOT, LtEnv
from tests.fakes.lambda_api import FakeLambdaAPI

VERBS = ["up", "push", "configure", "install", "train", "down", "status", "logs", "ssh", "types",
         "preflight", "export", "config", "config init", "config show", "config check"]
SECRET = "lambda-secret-0123456789abcdef"


@pytest.fixture
def lt(tmp_path):
    return LtEnv(tmp_path)


@pytest.fixture
def api():
    with FakeLambdaAPI(api_key=SECRET, boot_seconds=0.1) as fake:
        yield fake


def test_help_lists_every_verb(lt):
    result = lt("--help", check=True)
    for verb in VERBS:
        if " " not in verb:
            assert f"\n  {verb} " in result.stdout, verb


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_an_example(lt, verb):
    result = lt(*verb.split(), "--help", check=True)
    assert result.stdout.startswith(f"Usage: lt {verb}")
    if verb != "config":
        assert "Example usage:" in result.stdout


def test_help_imports_no_heavy_module():
    code = ("import sys\nsys.argv = ['lt', '--help']\nfrom wrapper.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted(sys.modules)), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    loaded = set(result.stderr.split())
    for heavy in ("torch", "transformers", "ansible", "ansible_runner", "requests", "sqlite3", "trl"):
        assert heavy not in loaded, f"`lt --help` imports {heavy}"


def test_help_is_fast():
    from bench.cli_startup import measure

    assert measure(runs=5)["median_s"] < 0.3


# -- config ----------------------------------------------------------------------------------------

def test_config_init_writes_every_key_private(lt):
    result = lt("config", "init", check=True)
    path = lt.cwd / "config" / "trainer.json"
    assert "Wrote config/trainer.json" in result.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    written = json.loads(path.read_text())
    assert "hugging-face--access-token" in written  # the seed's spelling
    assert written["lambda-cloud-api-key"] is None
    again = lt("config", "init")
    assert again.returncode == 1 and "exists; use --force" in again.stderr
    assert lt("config", "init", "--force").returncode == 0


def test_config_show_redacts_secrets_and_names_sources(lt):
    lt.write_config({"lambda-cloud-api-key": SECRET, "hugging-face-access-token": "hf_secret_token_value",
                     "dataset": "me/chats", "lora-r": 8})
    shown = lt.json("config", "show", "--json", "-s", "lora-r=32", env={"HF_TOKEN": "hf_env_token_value"})
    assert shown["settings"]["lambda-cloud-api-key"] == "********"
    assert shown["settings"]["hugging-face--access-token"] == "********"
    assert shown["sources"]["hugging-face--access-token"] == "environment"  # env beats file
    assert shown["settings"]["lora-r"] == 32 and shown["sources"]["lora-r"] == "flag"  # flag beats file
    assert shown["sources"]["dataset"] == "config file"
    assert shown["sources"]["seed"] == "default"
    table = lt("config", "show", check=True)
    for text in (table.stdout, table.stderr, json.dumps(shown)):
        assert SECRET not in text and "secret_token" not in text


def test_unknown_key_is_an_error_naming_the_closest(lt):
    lt.write_config({"dataset": "me/chats", "lambda-cloud-api-kye": "x"})
    result = lt("config", "show")
    assert result.returncode == 1
    assert "config/trainer.json:3: lambda-cloud-api-kye: unknown key; did you mean 'lambda-cloud-api-key'?" \
        in result.stderr


def test_bad_value_names_file_line_and_key(lt):
    lt.write_config({"dataset": "me/chats", "lora-r": "sixteen"})
    result = lt("config", "check")
    assert result.returncode == 1
    assert "config/trainer.json:3: lora-r: expected a whole number" in result.stderr


def test_warns_when_secrets_file_is_readable_by_others(lt):
    lt.write_config({"lambda-cloud-api-key": SECRET}, mode=0o644)
    result = lt("config", "show", check=True)
    assert "readable by group/others" in result.stderr and "chmod 600" in result.stderr
    lt.write_config({"lambda-cloud-api-key": SECRET}, mode=0o600)
    assert "readable" not in lt("config", "show", check=True).stderr


def test_config_check_lists_what_is_missing_then_passes(lt):
    result = lt("config", "check")
    assert result.returncode == 1
    assert "dataset: is required" in result.stderr
    assert "lambda-cloud-api-key: is required" in result.stderr and "$LAMBDA_API_KEY" in result.stderr
    key = lt.home / ".ssh" / "lambda"
    key.parent.mkdir()
    key.write_text("key")
    lt.write_config({"lambda-cloud-api-key": SECRET, "lambda-cloud-ssh-key-name": "laptop",
                     "lambda-cloud-ssh-identity-file": str(key), "dataset": "me/chats"})
    result = lt("config", "check", check=True)
    assert "complete for a cloud run" in result.stdout


def test_config_env_var_selects_the_file(lt):
    other = lt.write_config({"dataset": "me/other"}, name="elsewhere.json")
    shown = lt.json("config", "show", "--json", env={"LT_CONFIG": str(other)})
    assert shown["settings"]["dataset"] == "me/other"
    missing = lt("config", "show", "-c", "nope.json")
    assert missing.returncode == 1 and "nope.json not found" in missing.stderr


def test_example_config_has_every_key_and_loads(lt):
    from module_utils import trainer_config

    example = REPO_ROOT / "examples" / "trainer.json.example"
    names = list(json.loads(example.read_text()))
    assert names == [key.name for key in trainer_config.KEYS]
    trainer_config.load_config_file(str(example))
    trainer_config.load_config_file(str(REPO_ROOT / "examples" / "quickstart.json"))


# -- types and status against the fake API ---------------------------------------------------------

def test_types_shows_prices_and_capacity(lt, api):
    api.set_capacity("gpu_1x_a10", [])
    env = {"LAMBDA_API_KEY": SECRET, "LAMBDA_API_URL": api.url}
    rows = lt.json("types", "--json", env=env)
    by_name = {row["name"]: row for row in rows}
    assert by_name["gpu_1x_h100_sxm5"]["price_per_hour"] == 3.29
    assert "us-east-1" in by_name["gpu_1x_h100_sxm5"]["regions_with_capacity"]
    assert by_name["gpu_1x_a10"]["regions_with_capacity"] == []
    available = {row["name"] for row in lt.json("types", "--json", "--available", env=env)}
    assert "gpu_1x_a10" not in available and "gpu_1x_h100_sxm5" in available
    table = lt("types", env=env, check=True).stdout
    assert "gpu_1x_a10" in table and "none now" in table and "3.29" in table


def test_types_with_a_wrong_key_says_what_to_do(lt, api):
    result = lt("types", env={"LAMBDA_API_KEY": "wrong-key", "LAMBDA_API_URL": api.url})
    assert result.returncode == 1
    assert "global/invalid-api-key" in result.stderr and "What to do" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_flags_instances_no_run_knows(lt, api):
    api.add_ssh_key("laptop")
    from tests.lambda_support import lambda_client

    client = lambda_client(api)
    client.launch(region_name="us-east-1", instance_type_name="gpu_1x_a10", ssh_key_names=["laptop"],
                  name="lt-orphan-1")
    client.launch(region_name="us-east-1", instance_type_name="gpu_1x_a10", ssh_key_names=["laptop"],
                  name="someone-elses")
    env = {"LAMBDA_API_KEY": SECRET, "LAMBDA_API_URL": api.url}
    report = lt.json("status", "--json", env=env)
    assert [row["name"] for row in report["unknown_instances"]] == ["lt-orphan-1"]
    result = lt("status", env=env, check=True)
    assert "lt-orphan-1" in result.stderr and "lt down --all" in result.stderr
    assert "someone-elses" not in result.stdout + result.stderr


def test_status_without_a_key_shows_local_runs_only(lt):
    result = lt("status", check=True)
    assert "No runs yet" in result.stdout and "no Lambda Cloud API key" in result.stdout


def test_unexpected_errors_are_one_line_unless_debugging(lt):
    (lt.state / "runs.sqlite3").write_text("not a database")
    result = lt("status")
    assert result.returncode == 1
    assert "DatabaseError" in result.stderr and "LT_DEBUG=1" in result.stderr
    assert "Traceback" not in result.stderr
    debug = lt("status", env={"LT_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr


# -- the offline quickstart --------------------------------------------------------------------------

@pytest.mark.slow
def test_train_local_quickstart_makes_a_merged_model(lt):
    started = time.monotonic()
    result = lt("train", "--local", "--yes", timeout=600)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    runs = lt.runs()
    assert len(runs) == 1 and runs[0]["kind"] == "local" and runs[0]["status"] == "succeeded"
    run_id = runs[0]["run_id"]
    merged = lt.cwd / "outputs" / run_id / "merged"
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert f"merged model in outputs/{run_id}/merged/" in result.stdout
    assert "step 40/40" in result.stderr and "loss" in result.stderr
    result_file = json.loads((lt.cwd / "outputs" / run_id / "result.json").read_text())
    assert result_file["status"] == "succeeded"
    status = lt.json("status", "--json")
    assert status["runs"][0]["run_id"] == run_id and status["runs"][0]["status"] == "succeeded"
    # The tiny base model is built once and reused by the next quickstart.
    assert (lt.cwd / "outputs" / "tiny-llama-3" / "config.json").is_file()
    print(f"quickstart took {took:.1f} s")

    # Ready for Ollama: GGUF + Modelfile from the latest local run.
    exported = lt("export", "--json", timeout=300)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    files = json.loads(exported.stdout.strip().splitlines()[-1])["files"]
    assert any(f.endswith(".gguf") for f in files) and any(f.endswith("Modelfile") for f in files)
    assert all((lt.cwd / "outputs" / run_id / "export").samefile(os.path.dirname(f)) for f in files)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "base"
    code = "import sys\nfrom trainjob.tiny import write_tiny_base_model\nwrite_tiny_base_model(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO_ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return out


def test_preflight_checks_the_data_here(lt, tiny_base):
    ok = lt.json("preflight", "--json", "--dataset", str(REPO_ROOT / "examples" / "chats"),
                 "--base-model", str(tiny_base), "-s", "max-seq-length=256", timeout=300)
    assert ok["ok"] is True and ok["loss_tokens"] > 0 and ok["splits"]["train"]["conversations"] == 30
    bad = lt.cwd / "bad.jsonl"
    bad.write_text('{"chats": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"chats": [{"role": "assistant", "content": "I speak first"}]}\n')
    result = lt("preflight", "--dataset", str(bad), "--base-model", str(tiny_base), timeout=300)
    assert result.returncode == 2
    assert "bad.jsonl:2" in result.stdout + result.stderr


def test_cloud_train_stops_before_launch_on_bad_data(lt, tiny_base):
    """Bad data fails on this machine, before any request reaches Lambda Cloud."""
    bad = lt.cwd / "bad.jsonl"
    bad.write_text('{"chats": [{"role": "assistant", "content": "I speak first"}]}\n')
    key = lt.home / "id"
    key.write_text("x")
    lt.write_config({"lambda-cloud-api-key": SECRET, "lambda-cloud-ssh-key-name": "k",
                     "lambda-cloud-ssh-identity-file": str(key), "dataset": str(bad),
                     "base-model": str(tiny_base), "lambda-cloud-api-url": "http://127.0.0.1:9/api/v1"})
    result = lt("train", "--yes", timeout=300)
    assert result.returncode == 1
    assert "nothing was launched" in result.stderr and "bad.jsonl:1" in result.stderr
    assert lt.runs() == []


def test_extra_vars_refuse_secrets(lt):
    result = lt("up", "-e", "launch_api_key=abc", "--yes")
    assert result.returncode == 2 and "looks like a secret" in result.stderr
    result = lt("up", "--yes", env={"LT_EXTRA_VARS": '{"hf_token": "x"}'})
    assert result.returncode == 2 and "looks like a secret" in result.stderr
    result = lt("config", "show", "-s", "lambda-cloud-api-key=abc")
    assert result.returncode == 2 and "never on a command line" in result.stderr


def test_train_local_with_a_broken_dataset_fails_with_the_line(lt):
    data = lt.cwd / "bad.jsonl"
    data.write_text('{"chats": [{"role": "user", "content": "hi"}]}\n')
    result = lt("train", "--local", "--dataset", str(data), timeout=600)
    assert result.returncode == 1
    assert "bad.jsonl:1" in result.stdout + result.stderr
    assert lt.runs()[0]["status"] == "failed"
    assert os.path.exists(lt.cwd / "outputs")
