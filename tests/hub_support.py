"""Helpers for tests that run the real Hugging Face clients against the fake Hub.

``HF_ENDPOINT`` is read once, at import: ``huggingface_hub.constants.ENDPOINT`` and the download URL
template built from it, and ``datasets.config.HF_ENDPOINT`` (a copy). Changing the environment or patching
``constants.ENDPOINT`` later does not move downloads (``hf_hub_url`` uses the template); only
``HfApi(endpoint=...)`` / ``hf_hub_download(endpoint=...)`` take another endpoint per call, and
transformers/datasets don't pass one. So run client code in a subprocess whose environment is
``hub_env`` (or ``hub_env_for(hub, home)``)::

    # importing the fixture functions registers the fixtures `fake_hub` and `hub_env`
    from tests.hub_support import fake_hub_fixture, hub_env_fixture, run_python  # noqa: F401

    def test_push(fake_hub, hub_env):
        fake_hub.add_repo("meta-llama/Meta-Llama-3-8B-Instruct", model_dir)
        run_python("from huggingface_hub import snapshot_download; ...", hub_env)
        assert fake_hub.list_files("tester/out")

For a product process on another "host" (an sshd session, ansible), start the fake as its own
process: ``with hub_process(tmp_path / "hub") as (url, root): ...`` and pass ``client_env(url, ...)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from tests.fakes.hub import FakeHub

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_TOKEN = "hf_fakehubtoken0123456789abcdefABCDEF"
HUB_USER = "tester"


def client_env(url, home, token=HUB_TOKEN) -> dict[str, str]:
    """The variables that point huggingface_hub / datasets / transformers at the Hub at `url`."""
    home = Path(home)
    return {
        "HF_ENDPOINT": url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_TOKEN": token or "",
        # Xet storage is a separate service a loopback fake cannot play: use the LFS protocol.
        "HF_HUB_DISABLE_XET": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def hub_env_for(hub: FakeHub, home, token=HUB_TOKEN, base=None) -> dict[str, str]:
    """A full environment for a subprocess: `base` (default os.environ) + the Hub variables, with the
    repository on PYTHONPATH so `trainjob` and `tests` import."""
    env = dict(os.environ if base is None else base)
    env.pop("HF_TOKEN_PATH", None)
    env.update(client_env(hub.url, home, token))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_python(code: str, env: dict, *args, timeout=180, cwd=None, check=True) -> subprocess.CompletedProcess:
    """Run `code` (sys.argv[1:] = `args`) with python3 in `env`; with check=True a non-zero exit fails
    the test, showing the output."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                          cwd=cwd or REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"python exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def last_json_line(proc: subprocess.CompletedProcess):
    """The last stdout line that parses as JSON (scripts print their results that way)."""
    for line in reversed(proc.stdout.splitlines()):
        with contextlib.suppress(ValueError):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{proc.stdout}\n{proc.stderr}")


@contextlib.contextmanager
def hub_process(root, token=HUB_TOKEN, *extra_args):
    """Run `python3 -m tests.fakes.hub` storing under `root`; yields (url, root)."""
    root = Path(root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.hub", "--port", "0", "--token", token, "--root", str(root),
         *extra_args],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            proc.kill()
            raise RuntimeError(f"fake hub did not start: {url!r} {proc.stderr.read()}")
        yield url, root
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def inject_failure(url, route, status=500, times=1):
    """`fail_next` for a fake Hub running as a process."""
    body = json.dumps({"route": route, "status": status, "times": times}).encode()
    request = urllib.request.Request(f"{url}/_fake/fail", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


@pytest.fixture(name="fake_hub")
def fake_hub_fixture(tmp_path):
    """A started FakeHub (token HUB_TOKEN, user "tester") storing under tmp_path/"hub"."""
    with FakeHub(HUB_TOKEN, user=HUB_USER, root=tmp_path / "hub") as hub:
        yield hub


@pytest.fixture(name="hub_env")
def hub_env_fixture(fake_hub, tmp_path):
    """Subprocess environment whose Hugging Face clients talk to `fake_hub` (fresh HF_HOME)."""
    return hub_env_for(fake_hub, tmp_path / "hf-home")
