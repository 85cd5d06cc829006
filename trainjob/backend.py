"""The one place that decides how this machine trains: Unsloth, transformers on CUDA, or CPU.

Decided before transformers, TRL or PEFT are imported: Unsloth patches them at import time and
warns (and patches less) when it comes second. `LLAMA_TRAINER_BACKEND` forces a choice, e.g. to
compare the plain transformers path with Unsloth on the same GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

UNSLOTH = "unsloth"
TRANSFORMERS_CUDA = "transformers-cuda"
CPU = "cpu"
BACKENDS = (UNSLOTH, TRANSFORMERS_CUDA, CPU)
FORCE_ENV = "LLAMA_TRAINER_BACKEND"


class BackendError(RuntimeError):
    pass


@dataclass(frozen=True)
class Backend:
    name: str
    # torch dtype name the base model is loaded in (compute dtype when 4-bit).
    dtype: str
    load_in_4bit: bool
    optim: str
    bf16: bool
    fp16: bool
    use_cpu: bool
    # TRL's fused LM-head loss (no full-vocabulary logits) runs on Triton kernels: CUDA only.
    fused_loss: bool
    device_name: str
    why: str

    @property
    def on_cuda(self) -> bool:
        return self.name != CPU

    def describe(self) -> dict:
        return asdict(self)


def choose_backend(load_in_4bit: bool | None = None, optim: str | None = None) -> Backend:
    """Pick the backend for this machine and the job's wishes, and log the choice with its reason."""
    import torch

    forced = os.environ.get(FORCE_ENV, "").strip() or None
    if forced is not None and forced not in BACKENDS:
        raise BackendError(f"{FORCE_ENV}={forced!r} is not a backend; use one of {', '.join(BACKENDS)}")
    cuda = torch.cuda.is_available()
    if forced in (UNSLOTH, TRANSFORMERS_CUDA) and not cuda:
        raise BackendError(f"{FORCE_ENV}={forced} needs a CUDA GPU, and torch sees none")

    if forced == CPU or not cuda:
        name, why = CPU, f"forced by {FORCE_ENV}" if forced else "no CUDA device"
    elif forced == TRANSFORMERS_CUDA:
        name, why = TRANSFORMERS_CUDA, f"forced by {FORCE_ENV}"
    else:
        unsloth_error = _import_unsloth()
        if unsloth_error is None:
            name, why = UNSLOTH, "CUDA and unsloth available"
        elif forced == UNSLOTH:
            raise BackendError(f"{FORCE_ENV}=unsloth, but unsloth does not import: {unsloth_error}")
        else:
            name, why = TRANSFORMERS_CUDA, f"CUDA without unsloth ({unsloth_error})"

    if name == CPU:
        if load_in_4bit:
            raise BackendError(
                "load_in_4bit is true, but 4-bit loading needs a CUDA GPU; set it to null or false here"
            )
        backend = Backend(name=CPU, dtype="float32", load_in_4bit=False, optim=optim or "adamw_torch",
                          bf16=False, fp16=False, use_cpu=True, fused_loss=False, device_name="cpu", why=why)
    else:
        has_bnb = importlib.util.find_spec("bitsandbytes") is not None
        four_bit = has_bnb if load_in_4bit is None else load_in_4bit
        if four_bit and not has_bnb:
            raise BackendError("load_in_4bit is true, but bitsandbytes is not installed; pip install bitsandbytes")
        bf16 = torch.cuda.is_bf16_supported()
        backend = Backend(
            name=name,
            dtype="bfloat16" if bf16 else "float16",
            load_in_4bit=four_bit,
            optim=optim or ("adamw_8bit" if has_bnb else "adamw_torch"),
            bf16=bf16,
            fp16=not bf16,
            use_cpu=False,
            fused_loss=importlib.util.find_spec("triton") is not None,
            device_name=torch.cuda.get_device_name(0),
            why=why,
        )
    log.info("backend: %s (%s); %s, 4-bit %s, optimizer %s, fused loss %s, on %s", backend.name, backend.why,
             backend.dtype, backend.load_in_4bit, backend.optim, backend.fused_loss, backend.device_name)
    return backend


def _import_unsloth() -> str | None:
    """Import unsloth now, ahead of transformers/trl/peft; return why not when it can't."""
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth not installed"
    try:
        import unsloth  # noqa: F401
    except Exception as exc:  # unsloth raises many kinds of errors on unsupported setups
        return f"unsloth import failed: {type(exc).__name__}: {exc}"
    return None
