"""Getting results onto the Hugging Face Hub, and checkpoints back from it.

The Hub repo holds the merged model at its root (so `from_pretrained(repo)` works), the adapter
under `adapter/`, the model card and loss curve, and the latest training checkpoint under
`last-checkpoint/` so a run can resume on another machine. Local outputs are never deleted here:
they stay in output_dir whatever happens to the push. The token comes from HF_TOKEN in the
environment, which huggingface_hub reads itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import progress

log = logging.getLogger(__name__)

CHECKPOINT_IN_REPO = "last-checkpoint"
T = TypeVar("T")


class PushError(RuntimeError):
    pass


class PushNotConfirmed(PushError):
    pass


def is_retryable(exc: BaseException) -> bool:
    """Server trouble and dropped connections are worth retrying; wrong tokens or names are not."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is None or status == 429 or status >= 500
    return isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError | PushNotConfirmed)


def with_retries(action: Callable[[], T], what: str, attempts: int = 6, first_delay: float = 2.0,
                 max_delay: float = 60.0, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `action`, retrying retryable failures with exponential backoff."""
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            if attempt == attempts or not is_retryable(exc):
                raise
            log.warning("%s failed (attempt %d of %d): %s; retrying in %.0f s", what, attempt, attempts,
                        _short(exc), delay)
            sleep(delay)
            delay = min(delay * 2, max_delay)
    raise AssertionError("unreachable")


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def hub_api():
    from huggingface_hub import HfApi

    return HfApi()


def repo_url(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"


def ensure_repo(repo_id: str, private: bool) -> str:
    """Create the model repo if it does not exist (private unless asked otherwise).

    Returns the full "owner/name" id: a bare name lands in the token owner's namespace.
    """
    api = hub_api()
    url = with_retries(lambda: api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True),
                       f"creating {repo_id}")
    return url.repo_id or repo_id


@dataclass
class PushResult:
    repo_id: str
    commit_url: str
    commit_oid: str
    files: list[str]


def push_files(repo_id: str, files: dict[str, Path], message: str, private: bool = True) -> PushResult:
    """Upload {path in repo: local file} in one commit, with retries, and confirm the files are there."""
    from huggingface_hub import CommitOperationAdd

    api = hub_api()
    repo_id = ensure_repo(repo_id, private)

    def attempt() -> PushResult:
        # Fresh operations each time: a failed attempt leaves upload state on the old ones.
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(local))
                      for name, local in sorted(files.items())]
        info = api.create_commit(repo_id, operations=operations, commit_message=message, repo_type="model")
        present = set(api.list_repo_files(repo_id, revision=info.oid, repo_type="model"))
        missing = sorted(set(files) - present)
        if missing:
            raise PushNotConfirmed(f"commit {info.oid} lacks {len(missing)} files, e.g. {missing[0]}")
        return PushResult(repo_id, str(info.commit_url), info.oid, sorted(files))

    size = sum(path.stat().st_size for path in files.values())
    log.info("pushing %d files (%.1f MB) to %s", len(files), size / 1e6, repo_id)
    return with_retries(attempt, f"pushing to {repo_id}")


def files_under(folder: Path, prefix: str = "") -> dict[str, Path]:
    """{path in repo: local path} for every file under folder, placed under prefix."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            relative = path.relative_to(folder).as_posix()
            files[f"{prefix}/{relative}" if prefix else relative] = path
    return files


class CheckpointPusher:
    """Pushes each saved checkpoint to `last-checkpoint/` in the background, one at a time, in order.

    Training goes on while a checkpoint uploads; a failed push is logged and the checkpoint stays
    on disk, so it never stops a run.
    """

    def __init__(self, repo_id: str | None, private: bool = True) -> None:
        self.repo_id = repo_id
        self.private = private
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-push")
        self._pending: Future | None = None
        self._lock = threading.Lock()
        self.pushed_steps: list[int] = []
        self.failures: list[str] = []

    def submit(self, checkpoint_dir: Path, step: int) -> None:
        if self.repo_id is None:
            progress.emit("checkpoint", step=step, path=str(checkpoint_dir), pushed=False)
            return
        with self._lock:
            # The Trainer may rotate older checkpoints away; one upload at a time keeps each intact.
            if self._pending is not None:
                self._pending.result()
            self._pending = self._pool.submit(self._push, checkpoint_dir, step)

    def _push(self, checkpoint_dir: Path, step: int) -> None:
        try:
            result = push_files(self.repo_id, files_under(checkpoint_dir, CHECKPOINT_IN_REPO),
                                f"Checkpoint at step {step}", self.private)
        except Exception as exc:
            self.failures.append(f"step {step}: {_short(exc)}")
            log.warning("checkpoint %s was not pushed (%s); it stays in %s", step, _short(exc), checkpoint_dir)
            progress.emit("checkpoint", step=step, path=str(checkpoint_dir), pushed=False, error=_short(exc))
            return
        self.pushed_steps.append(step)
        progress.emit("checkpoint", step=step, path=str(checkpoint_dir), pushed=True, commit=result.commit_oid)

    def wait(self) -> None:
        with self._lock:
            if self._pending is not None:
                self._pending.result()
                self._pending = None

    def close(self) -> None:
        self.wait()
        self._pool.shutdown(wait=True)


def checkpoint_push_callback(pusher: CheckpointPusher):
    """A TrainerCallback handing every checkpoint the Trainer saves to the pusher."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class PushCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if checkpoint.is_dir():
                pusher.submit(checkpoint, state.global_step)

    return PushCheckpoints()


def download_last_checkpoint(repo_id: str, dest: Path) -> Path | None:
    """Fetch `last-checkpoint/` from the repo into dest; None when the repo or checkpoint is missing."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        with_retries(lambda: snapshot_download(repo_id, repo_type="model", local_dir=dest,
                                               allow_patterns=f"{CHECKPOINT_IN_REPO}/*"),
                     f"downloading the checkpoint from {repo_id}")
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        log.info("no checkpoint on the Hub: %s", _short(exc))
        return None
    checkpoint = dest / CHECKPOINT_IN_REPO
    if not (checkpoint / "trainer_state.json").is_file():
        log.info("no checkpoint on the Hub in %s", repo_id)
        return None
    return checkpoint
