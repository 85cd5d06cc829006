"""The real Llama 3 tokenizer (128,256 tokens) for tests, with no Hub access.

llama-cpp-python's source distribution carries llama.cpp's vocab-only GGUF of Llama 3
(`vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf`). This module finds that file in `.cache/`
(or a llama-cpp build cache there), else downloads the sdist from the package index once and takes
just that file out of it. transformers reads the GGUF into a fast tokenizer, but with GPT-2's split
rule instead of Llama 3's and without the bos post-processor; both are put back here so the result
tokenizes exactly like Meta-Llama-3-8B-Instruct's `tokenizer.json` (its tokenizer_config sets eos
`<|eot_id|>`; the chat template is left out so tests can add it). The rebuilt tokenizer is saved
under `.cache/llama3-tokenizer/`: the GGUF conversion takes ~25 s on two cores, a reload ~5 s.

    from tests.llama3_vocab import llama3_tokenizer_or_skip
    tokenizer = llama3_tokenizer_or_skip()
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = REPO_ROOT / ".cache"
VOCAB_FILE = "ggml-vocab-llama-bpe.gguf"
SDIST_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_MEMBER = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/models/{VOCAB_FILE}"
SAVED_TOKENIZER = CACHE / "llama3-tokenizer"
VOCAB_SIZE = 128256


class VocabUnavailable(RuntimeError):
    """The vocab GGUF could not be found or fetched; the message says why."""


@contextlib.contextmanager
def _cache_lock():
    # Several test processes may ask at once: one downloads and converts, the others wait and reuse.
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".llama3-vocab.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def llama3_vocab_gguf(download: bool = True) -> Path:
    """Path of the Llama 3 vocab GGUF, fetching the sdist if needed; VocabUnavailable otherwise."""
    with _cache_lock():
        return _find_or_fetch_vocab(download)


def _find_or_fetch_vocab(download: bool) -> Path:
    target = CACHE / VOCAB_FILE
    if target.is_file():
        return target
    built = sorted(CACHE.glob(f"llama-cpp/**/{VOCAB_FILE}"))
    if built:
        return built[0]
    sdists = [CACHE / "sdist" / SDIST_NAME, *sorted(CACHE.glob(f"llama-cpp/**/{SDIST_NAME}"))]
    sdist = next((path for path in sdists if path.is_file()), None)
    if sdist is None:
        if not download:
            raise VocabUnavailable(f"{VOCAB_FILE} is not cached under {CACHE} and downloading is off")
        sdist = _download_sdist(CACHE / "sdist")
    _extract_member(sdist, SDIST_MEMBER, target)
    return target


def _download_sdist(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"llama-cpp-python=={SDIST_VERSION}", "-d", str(folder),
    ]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        raise VocabUnavailable(
            f"could not download llama-cpp-python {SDIST_VERSION} (it carries {VOCAB_FILE}): "
            f"{detail.strip()[-300:]}"
        ) from error
    sdist = folder / SDIST_NAME
    if not sdist.is_file():
        raise VocabUnavailable(f"pip download did not leave {sdist}")
    return sdist


def _extract_member(sdist: Path, member: str, target: Path) -> None:
    try:
        with tarfile.open(sdist) as archive:
            source = archive.extractfile(member)
            if source is None:
                raise KeyError(member)
            with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
                shutil.copyfileobj(source, out)
    except (KeyError, tarfile.TarError, OSError) as error:
        raise VocabUnavailable(f"{sdist} has no usable {member}: {error}") from error
    os.replace(out.name, target)


def _rebuild_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Convert the GGUF vocab into the tokenizer Meta ships and save it to `out_dir`."""
    from tokenizers import Regex, pre_tokenizers, processors
    from transformers import AutoTokenizer

    from trainjob.tiny import LLAMA3_SPLIT_PATTERN

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos}:1 $B:1",
                special_tokens=[(bos, backend.token_to_id(bos))],
            ),
        ]
    )
    tokenizer.bos_token = bos
    tokenizer.eos_token = "<|eot_id|>"
    tokenizer.pad_token = None
    tokenizer.chat_template = None
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".llama3-tokenizer-"))
    tokenizer.save_pretrained(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    out_dir.chmod(0o755)  # mkdtemp makes it private; other test processes read it too


def load_llama3_tokenizer(download: bool = True):
    """A fresh copy of the real Llama 3 Instruct tokenizer (no chat template, no pad token)."""
    from transformers import AutoTokenizer

    with _cache_lock():
        if not (SAVED_TOKENIZER / "tokenizer.json").is_file():
            _rebuild_tokenizer(_find_or_fetch_vocab(download), SAVED_TOKENIZER)
    return AutoTokenizer.from_pretrained(str(SAVED_TOKENIZER))


def llama3_tokenizer_or_skip(download: bool = True):
    """`load_llama3_tokenizer()`, or skip the calling test saying why it can't be had."""
    import pytest

    try:
        return load_llama3_tokenizer(download)
    except VocabUnavailable as error:
        pytest.skip(f"real Llama 3 tokenizer unavailable: {error}")
