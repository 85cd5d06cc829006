"""How a run trains fast on the machine it lands on: one plan, chosen from the device and the model.

    device = probe_device()                      # after the model is loaded: free memory excludes its weights
    plan = choose_speed_plan(device, model.config, max_seq_length=2048, batch_size=2)
    plan = apply_speed_plan(model, plan)         # attention, kernels, loss head, compile; returns what applied
    SFTConfig(..., **plan.trainer_kwargs())      # activation checkpointing lives in the training arguments
    log.info("speed plan: %s", plan.summary())   # plan.describe() for the machine-readable start event

What the plan decides, in the order the gains come on chat data (measured by bench/train_speed.py):
- packing with per-document attention: TRL's best-fit packing in padding-free mode (position_ids restart
  per document, no attention mask); the plan keeps it on.
- the loss head: TRL's SFTTrainer projects hidden states through a fused, chunked LM head and never
  builds the (tokens x vocabulary) logits. Its kernel is Triton (CUDA only); elsewhere the plan installs
  a plain-torch version of the same kernel (`TorchChunkedLogProb`), so CPU runs take the same code path.
- activation checkpointing: none, selective (every n-th layer), full or offloaded to host memory, the
  fastest that an activation-memory estimate says fits in the memory left after the weights.
- attention: FlashAttention 3/2 when installed, else PyTorch's own varlen flash kernel (checked on the
  device before use), else SDPA (which honours packed position_ids with a block-diagonal mask).
- Liger's RMSNorm, RoPE and SwiGLU kernels on CUDA when installed (its fused linear cross-entropy is not
  used: TRL's fused head already does that job and refuses Liger's).
- torch.compile of each decoder layer: off unless asked for (LLAMA_TRAINER_SPEED=compile=on).
- Unsloth: on the unsloth backend its own kernels and offloaded checkpointing are left in charge.

`LLAMA_TRAINER_SPEED="checkpointing=full,attention=sdpa,liger=off,compile=on,fused_loss=model"` overrides
single choices (for comparisons and for getting out of trouble); `LLAMA_TRAINER_MAX_MEMORY_GIB` caps the
memory the plan may use on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

SPEED_ENV = "LLAMA_TRAINER_SPEED"
MEMORY_ENV = "LLAMA_TRAINER_MAX_MEMORY_GIB"
GIB = 1024**3

CHECKPOINTING = ("none", "selective", "full", "offloaded", "unsloth")
# every_n_layers values tried between none and full: checkpointing 1/8, 1/4, 1/3, 1/2 of the layers.
SELECTIVE_STEPS = (8, 4, 3, 2)
VARLEN = "lt_varlen"
ATTENTIONS = ("flash_attention_3", "flash_attention_2", VARLEN, "sdpa", "eager")
FUSED_LOSSES = ("trl-triton", "torch-chunked", "model")
# Room kept free on a GPU beyond the estimate: allocator fragmentation, cuBLAS workspaces, the estimate's error.
SAFETY_FACTOR = 1.15
SAFETY_BYTES = 2 * GIB


class SpeedPlanError(ValueError):
    """A speed override that names an unknown setting or value."""


# ---------------------------------------------------------------------------------------------
# What the machine has


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str
    total_memory: int
    # Free now, for this process: on a GPU, after the model's weights are loaded.
    free_memory: int
    # Held by this process's tensors now (the weights): counted against a memory cap.
    allocated_memory: int = 0
    capability: tuple[int, int] | None = None

    @property
    def on_cuda(self) -> bool:
        return self.kind == "cuda"


def probe_device() -> DeviceInfo:
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return DeviceInfo("cuda", torch.cuda.get_device_name(0), total, free, torch.cuda.memory_allocated(),
                          torch.cuda.get_device_capability(0))
    import psutil

    memory = psutil.virtual_memory()
    return DeviceInfo("cpu", "cpu", memory.total, memory.available)


@dataclass(frozen=True)
class Kernels:
    """Which optional kernels import here."""

    flash_attention_3: bool = False
    flash_attention_2: bool = False
    torch_varlen: bool = False
    liger: bool = False
    triton: bool = False
    unsloth: bool = False


def probe_kernels() -> Kernels:
    def has(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    return Kernels(
        flash_attention_3=has("flash_attn_interface"),
        flash_attention_2=has("flash_attn"),
        torch_varlen=has("torch.nn.attention.varlen"),
        liger=has("liger_kernel"),
        triton=has("triton"),
        unsloth=has("unsloth"),
    )


# ---------------------------------------------------------------------------------------------
# What training needs


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> ModelShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size)

    def matmul_parameters(self) -> int:
        """Weights that multiply every token (decoder projections and the LM head; not the embedding)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate
        return self.layers * per_layer + self.vocab * self.hidden

    def lora_parameters(self, rank: int) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        ins_outs = ((self.hidden + q) + 2 * (self.hidden + kv) + (q + self.hidden)
                    + 3 * (self.hidden + self.intermediate))
        return self.layers * rank * ins_outs


def layer_activation_elements(shape: ModelShape, fused_kernels: bool) -> int:
    """Activation elements one decoder layer keeps per token for the backward, with LoRA on all projections.

    Calibrated on Llama-3-8B, measured on an H200 (packed 2 x 4096): ~8.2 MB/token with Liger's kernels and
    no checkpointing, ~11 MB/token with the stock modules, which keep fp32 copies in RMSNorm and SiLU.
    """
    kv = shape.kv_heads * shape.head_dim
    elements = 14 * shape.hidden + 5 * shape.intermediate + 4 * kv
    if not fused_kernels:
        elements += 8 * shape.hidden + shape.intermediate
    return elements


@dataclass(frozen=True)
class MemoryEstimate:
    activations: int
    loss: int
    optimizer: int
    attention_mask: int

    @property
    def total(self) -> int:
        return self.activations + self.loss + self.optimizer + self.attention_mask


def estimate_training_memory(shape: ModelShape, tokens: int, checkpointing: str, every_n_layers: int = 1, *,
                             fused_kernels: bool, fused_loss: bool, dense_mask_tokens: int = 0,
                             lora_rank: int = 16, act_bytes: int = 2) -> MemoryEstimate:
    """Bytes a training step needs on the device beyond the weights, for `tokens` tokens per micro-batch."""
    layer = layer_activation_elements(shape, fused_kernels) * act_bytes
    boundary = shape.hidden * act_bytes
    if checkpointing in ("none", "unsloth"):
        per_token = shape.layers * layer if checkpointing == "none" else layer
    else:
        kept = math.ceil(shape.layers / every_n_layers) if checkpointing == "selective" else shape.layers
        stored_boundaries = 0 if checkpointing == "offloaded" else kept * boundary
        # Checkpointed layers keep their input; the others keep everything; one layer is rebuilt at a time.
        per_token = stored_boundaries + (shape.layers - kept) * layer + layer
    if fused_loss:
        # A (4096 tokens x 32768 vocabulary) tile, and the fp32 gradient of the hidden states.
        loss = 4096 * 32768 * act_bytes + tokens * shape.hidden * 4
    else:
        # Logits in the model's dtype, their fp32 copy and its gradient.
        loss = tokens * shape.vocab * (act_bytes + 8)
    # LoRA weights are fp32 (PEFT's default): weight, gradient, two AdamW moments.
    optimizer = shape.lora_parameters(lora_rank) * 16
    return MemoryEstimate(per_token * tokens, loss, optimizer, dense_mask_tokens**2 * 2)


def training_flops_per_token(shape: ModelShape) -> int:
    """LoRA training: forward 2N and input gradients 2N; frozen weights get no weight gradients (4N)."""
    return 4 * shape.matmul_parameters()


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass
class SpeedPlan:
    device: str
    attention: str
    packing: bool
    fused_loss: str
    liger: bool
    checkpointing: str
    every_n_layers: int
    compile_layers: bool
    unsloth: bool
    tokens_per_step: int
    memory_available: int | None
    memory_estimate: int
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def uses_fused_loss(self) -> bool:
        """Whether the trainer may score with TRL's fused LM head (pass to build_trainer's fused_loss)."""
        return self.fused_loss in ("trl-triton", "torch-chunked")

    def trainer_kwargs(self) -> dict[str, Any]:
        """Training-argument settings this plan implies (SFTConfig / TrainingArguments keywords)."""
        if self.checkpointing in ("none", "unsloth"):
            return {"gradient_checkpointing": False}
        kwargs: dict[str, Any] = {"use_reentrant": False}
        if self.checkpointing == "selective":
            kwargs["every_n_layers"] = self.every_n_layers
        if self.checkpointing == "offloaded":
            kwargs["offload"] = True
        return {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": kwargs}

    def describe(self) -> dict[str, Any]:
        """JSON-safe, for the start event and result.json."""
        data = dataclasses.asdict(self)
        data["memory_available_gib"] = None if self.memory_available is None else round(self.memory_available / GIB, 1)
        data["memory_estimate_gib"] = round(self.memory_estimate / GIB, 1)
        del data["memory_available"], data["memory_estimate"]
        return data

    def summary(self) -> str:
        checkpointing = self.checkpointing
        if checkpointing == "selective":
            checkpointing = f"selective (every {self.every_n_layers} layers)"
        memory = f"~{self.memory_estimate / GIB:.1f} GiB for training state"
        if self.memory_available is not None:
            memory += f" of {self.memory_available / GIB:.1f} GiB free"
        return (f"attention {self.attention}, packing {'on' if self.packing else 'off'}, loss {self.fused_loss}, "
                f"liger {'on' if self.liger else 'off'}, checkpointing {checkpointing}, "
                f"compile {'on' if self.compile_layers else 'off'}{', unsloth' if self.unsloth else ''}; "
                f"{self.tokens_per_step} tokens/micro-step, {memory}")


def parse_overrides(text: str | None) -> dict[str, str]:
    """`"checkpointing=full, compile=on"` -> {"checkpointing": "full", "compile": "on"}."""
    overrides: dict[str, str] = {}
    for item in (text or "").replace(";", ",").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise SpeedPlanError(f"{SPEED_ENV}: {item.strip()!r} is not key=value")
        overrides[key.strip()] = value.strip()
    allowed = {"attention": ATTENTIONS, "checkpointing": CHECKPOINTING[:4], "fused_loss": FUSED_LOSSES,
               "liger": ("on", "off"), "compile": ("on", "off"), "packing": ("on", "off"),
               "every_n_layers": None}
    for key, value in overrides.items():
        if key not in allowed:
            raise SpeedPlanError(f"{SPEED_ENV}: unknown setting {key!r}; settings: {', '.join(allowed)}")
        choices = allowed[key]
        if choices is None and not value.isdigit():
            raise SpeedPlanError(f"{SPEED_ENV}: {key} must be a whole number, got {value!r}")
        if choices is not None and value not in choices:
            raise SpeedPlanError(f"{SPEED_ENV}: {key} must be one of {', '.join(choices)}; got {value!r}")
    return overrides


def choose_speed_plan(device: DeviceInfo, model_config, *, max_seq_length: int, batch_size: int = 1,
                      load_in_4bit: bool = False, backend: str | None = None, lora_rank: int = 16,
                      packing: bool = True, free_memory: int | None = None, memory_budget: int | None = None,
                      kernels: Kernels | None = None, overrides: dict[str, str] | str | None = None) -> SpeedPlan:
    """The fastest configuration expected to fit; each choice carries its reason in `plan.reasons`.

    free_memory: bytes left for training (default: the device's free memory now, i.e. after the weights).
    memory_budget: a cap on the process's peak (e.g. 24 GiB); the weights already held count against it.
    overrides: single choices forced by the caller, or LLAMA_TRAINER_SPEED's text (default: that variable).
    """
    kernels = kernels or probe_kernels()
    if overrides is None:
        overrides = os.environ.get(SPEED_ENV)
    forced = parse_overrides(overrides) if isinstance(overrides, str) or overrides is None else dict(overrides)
    if memory_budget is None and os.environ.get(MEMORY_ENV):
        memory_budget = int(float(os.environ[MEMORY_ENV]) * GIB)
    shape = ModelShape.of(model_config)
    reasons: dict[str, str] = {}
    unsloth = backend == "unsloth"
    cuda = device.on_cuda

    packing = forced.get("packing", "on" if packing else "off") == "on"
    reasons["packing"] = ("padding-free packing, position_ids restart per document" if packing
                          else "off in the job config: batches are padded")
    tokens = batch_size * max_seq_length

    attention, reasons["attention"] = _choose_attention(device, kernels, unsloth)
    if "attention" in forced:
        attention, reasons["attention"] = forced["attention"], f"forced by {SPEED_ENV}"

    liger = cuda and kernels.liger and not unsloth
    reasons["liger"] = ("RMSNorm, RoPE, SwiGLU kernels (liger_kernel)" if liger else
                        "Unsloth's own kernels" if unsloth else
                        "needs CUDA" if not cuda else "liger_kernel is not installed")
    if "liger" in forced:
        liger, reasons["liger"] = forced["liger"] == "on", f"forced by {SPEED_ENV}"

    if cuda and kernels.triton:
        fused_loss, reasons["fused_loss"] = "trl-triton", "TRL's chunked LM head (Triton): no full logits"
    else:
        fused_loss, reasons["fused_loss"] = "torch-chunked", "TRL's chunked LM head with a plain-torch kernel"
    if "fused_loss" in forced:
        fused_loss, reasons["fused_loss"] = forced["fused_loss"], f"forced by {SPEED_ENV}"

    available = device.free_memory if free_memory is None else free_memory
    if memory_budget is not None:
        available = min(available, memory_budget - device.allocated_memory)
        reasons["memory"] = f"capped at {memory_budget / GIB:.1f} GiB peak"

    def need(mode: str, every: int = 1) -> int:
        estimate = estimate_training_memory(
            shape, tokens, mode, every, fused_kernels=liger or unsloth, fused_loss=fused_loss != "model",
            dense_mask_tokens=tokens if packing and attention in ("sdpa", "eager") else 0, lora_rank=lora_rank,
            act_bytes=2 if cuda else 4)
        return estimate.total

    if unsloth:
        checkpointing, every = "unsloth", 1
        reasons["checkpointing"] = "Unsloth's offloaded checkpointing"
    else:
        checkpointing, every, reasons["checkpointing"] = _choose_checkpointing(need, shape.layers, available, cuda)
    if "checkpointing" in forced:
        checkpointing, reasons["checkpointing"] = forced["checkpointing"], f"forced by {SPEED_ENV}"
        every = int(forced.get("every_n_layers", 2)) if checkpointing == "selective" else 1
    if checkpointing == "offloaded" and not cuda:
        # transformers pins host memory for the offloaded copies, which needs an accelerator.
        checkpointing, reasons["checkpointing"] = "full", "offloading needs a GPU: full checkpointing instead"

    compile_layers = forced.get("compile") == "on"
    reasons["compile"] = f"forced by {SPEED_ENV}" if "compile" in forced else "off until measured faster here"

    return SpeedPlan(
        device=device.name, attention=attention, packing=packing, fused_loss=fused_loss, liger=liger,
        checkpointing=checkpointing, every_n_layers=every, compile_layers=compile_layers, unsloth=unsloth,
        tokens_per_step=tokens, memory_available=available if cuda else None,
        memory_estimate=need(checkpointing, every), reasons=reasons,
    )


def _choose_attention(device: DeviceInfo, kernels: Kernels, unsloth: bool) -> tuple[str, str]:
    if unsloth:
        return "sdpa", "Unsloth patches attention itself"
    if not device.on_cuda:
        return "sdpa", "CPU: SDPA with a block-diagonal mask from the packed position_ids"
    capability = device.capability or (0, 0)
    if kernels.flash_attention_3 and capability[0] == 9:
        return "flash_attention_3", "FlashAttention 3 (Hopper), varlen over packed documents"
    if kernels.flash_attention_2 and capability >= (8, 0):
        return "flash_attention_2", "FlashAttention 2, varlen over packed documents"
    if kernels.torch_varlen and capability >= (8, 0):
        return VARLEN, "PyTorch's varlen flash kernel over packed documents"
    return "sdpa", "no varlen kernel here: SDPA with a dense block-diagonal mask"


def _choose_checkpointing(need, layers: int, available: int, cuda: bool) -> tuple[str, int, str]:
    """The first of none, selective (fewest layers first), full, offloaded whose estimate fits."""
    def fits(mode: str, every: int = 1) -> bool:
        return need(mode, every) * SAFETY_FACTOR + SAFETY_BYTES <= available

    def gib(mode: str, every: int = 1) -> str:
        return f"~{need(mode, every) / GIB:.1f} GiB"

    if not cuda:
        if fits("none"):
            return "none", 1, f"activations ({gib('none')}) fit in free RAM"
        return "full", 1, f"activations ({gib('none')}) would not fit in free RAM"
    if fits("none"):
        return "none", 1, f"all activations ({gib('none')}) fit in {available / GIB:.1f} GiB"
    for every in SELECTIVE_STEPS:
        if every < layers and fits("selective", every):
            return "selective", every, (f"checkpoint every {every} layers ({gib('selective', every)}); "
                                        f"all activations need {gib('none')}")
    if fits("full"):
        return "full", 1, f"full checkpointing ({gib('full')}); all activations need {gib('none')}"
    return "offloaded", 1, (f"checkpoints kept in host memory ({gib('offloaded')} on the GPU); "
                            f"even full checkpointing needs {gib('full')} of {available / GIB:.1f} GiB")


# ---------------------------------------------------------------------------------------------
# Applying it


def apply_speed_plan(model, plan: SpeedPlan) -> SpeedPlan:
    """Set the model up as `plan` says (in place); return the plan as applied.

    A step whose check fails here (a kernel that doesn't import or gives wrong numbers on this device)
    is turned off, with the reason, rather than failing the run.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    applied = dataclasses.replace(plan, reasons=dict(plan.reasons))
    if plan.unsloth:
        log.info("speed plan: %s", applied.summary())
        return applied

    if plan.attention != base.config._attn_implementation:
        applied.attention = _set_attention(base, plan.attention, applied.reasons)
    if plan.liger:
        applied.liger = _apply_liger(base, applied.reasons)
    if plan.fused_loss == "torch-chunked":
        install_torch_fused_head()
    if plan.checkpointing == "none" and getattr(base, "is_gradient_checkpointing", False):
        # 4-bit loading turns checkpointing on for every layer; this plan has the memory to go without.
        base.gradient_checkpointing_disable()
    if plan.compile_layers:
        for layer in _decoder_layers(base):
            layer.compile(dynamic=True)
    log.info("speed plan: %s", applied.summary())
    return applied


def _decoder_layers(base) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in base.modules() if isinstance(module, GradientCheckpointingLayer)]


def _set_attention(base, name: str, reasons: dict[str, str]) -> str:
    if name == VARLEN:
        problem = register_varlen_attention(check_device=base.device)
        if problem:
            reasons["attention"] = f"PyTorch varlen kernel unusable here ({problem}); SDPA instead"
            name = "sdpa"
    try:
        base.set_attn_implementation(name)
    except (ImportError, ValueError, KeyError) as exc:
        reasons["attention"] = f"{name} unavailable ({exc}); SDPA instead"
        name = "sdpa"
        base.set_attn_implementation(name)
    return name


def _apply_liger(base, reasons: dict[str, str]) -> bool:
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # TRL's fused LM head scores the loss; Liger's cross-entropy kernels would replace the model's forward.
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=base)
    except Exception as exc:  # an incompatible liger/transformers pair must not end the run
        reasons["liger"] = f"liger_kernel failed to apply ({type(exc).__name__}: {exc}); stock modules"
        log.warning("speed plan: %s", reasons["liger"])
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The loss head without Triton
#
# TRL's SFTTrainer always scores through a fused LM head whose kernel is Triton (CUDA/XPU only), and no
# maintained library offers a CPU kernel for it (Liger and cut-cross-entropy are Triton too). This is the
# same computation in plain torch: tokens in chunks, fp32 log-softmax statistics per chunk, the backward
# recomputing each chunk, so the (tokens x vocabulary) logits never exist whole.


def _chunk_rows(vocab: int) -> int:
    # ~64 MiB of fp32 logits per chunk.
    return max(16, (16 * 1024 * 1024) // max(vocab, 1))


def _transform(y, logit_scale: float, softcap: float | None, temperature: float):
    z = y * logit_scale
    if softcap is not None:
        z = softcap * (z / softcap).tanh()
    return z / temperature


def _make_torch_chunked_logprob():
    import torch

    class TorchChunkedLogProb(torch.autograd.Function):
        """Per-token log p(target), entropy, log sum p^2, mean logit and top-1 flags of hidden @ weight.T.

        The signature and outputs of TRL's ChunkedLogProbFunction: (hidden [N, H], weight [V, H], bias,
        targets [N], temperature, chunk_size, final_logit_softcapping, logit_scale, outputs).
        """

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0,
                    outputs=("log_probs",)):
            ctx.set_materialize_grads(False)
            rows = _chunk_rows(weight.shape[0])
            pieces: dict[str, list] = {name: [] for name in ("log_z", "target", "entropy", "sq", "mean", "top1")}
            with torch.no_grad():
                for start in range(0, hidden.shape[0], rows):
                    y = torch.nn.functional.linear(hidden[start:start + rows], weight, bias).float()
                    z = _transform(y, logit_scale, softcap, temperature)
                    t = targets[start:start + rows]
                    log_z = torch.logsumexp(z, dim=-1)
                    pieces["log_z"].append(log_z)
                    pieces["target"].append(z.gather(1, t[:, None]).squeeze(1))
                    if "entropy" in outputs:
                        p = torch.exp(z - log_z[:, None])
                        pieces["entropy"].append(log_z - (p * z).sum(-1))
                    if "log_sum_sq_probs" in outputs:
                        pieces["sq"].append(torch.logsumexp(2 * z, dim=-1) - 2 * log_z)
                    if "mean_logits" in outputs:
                        pieces["mean"].append(z.mean(-1))
                    if "is_top1" in outputs:
                        pieces["top1"].append(z.argmax(-1) == t)

            def cat(name):
                return torch.cat(pieces[name]) if pieces[name] else None

            log_z = cat("log_z") if pieces["log_z"] else hidden.new_zeros(0, dtype=torch.float32)
            target = cat("target") if pieces["target"] else hidden.new_zeros(0, dtype=torch.float32)
            log_probs = target - log_z
            entropy, sq, mean, top1 = cat("entropy"), cat("sq"), cat("mean"), cat("top1")
            if top1 is None and "is_top1" in outputs:
                top1 = torch.zeros(0, dtype=torch.bool, device=hidden.device)
            ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z if entropy is None else entropy)
            ctx.settings = (temperature, softcap, logit_scale, entropy is not None)
            ctx.mark_non_differentiable(*(x for x in (sq, mean, top1) if x is not None))
            return log_probs, entropy, sq, mean, top1

        @staticmethod
        def backward(ctx, grad_log_probs, grad_entropy, *_):
            hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
            temperature, softcap, logit_scale, has_entropy = ctx.settings
            if not has_entropy:
                grad_entropy = None
            need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
            grad_hidden = torch.zeros_like(hidden, dtype=torch.float32) if need_hidden else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
            rows = _chunk_rows(weight.shape[0])
            for start in range(0, hidden.shape[0], rows):
                end = start + rows
                h = hidden[start:end]
                y = torch.nn.functional.linear(h, weight, bias).float()
                z = _transform(y, logit_scale, softcap, temperature)
                log_p = z - log_z[start:end, None]
                p = log_p.exp()
                grad = torch.zeros_like(z)
                if grad_log_probs is not None:
                    # d log p_target / dz_j = 1[j = target] - p_j
                    g = grad_log_probs[start:end].float()
                    grad -= g[:, None] * p
                    grad.scatter_add_(1, targets[start:end, None], g[:, None])
                if grad_entropy is not None:
                    # d entropy / dz_j = -p_j (log p_j + entropy)
                    g = grad_entropy[start:end].float()
                    grad -= g[:, None] * p * (log_p + entropy[start:end, None])
                grad /= temperature
                if softcap is not None:
                    grad *= 1 - ((y * logit_scale) / softcap).tanh() ** 2
                grad *= logit_scale
                if grad_hidden is not None:
                    grad_hidden[start:end] = grad @ weight.float()
                if grad_weight is not None:
                    grad_weight += grad.t() @ h.float()
                if grad_bias is not None:
                    grad_bias += grad.sum(0)
            return (
                None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None, None, None, None, None,
            )

    return TorchChunkedLogProb


_TORCH_CHUNKED = None


def torch_chunked_logprob():
    """The plain-torch chunked log-prob autograd Function (built on first use: torch imports late)."""
    global _TORCH_CHUNKED
    if _TORCH_CHUNKED is None:
        _TORCH_CHUNKED = _make_torch_chunked_logprob()
    return _TORCH_CHUNKED


def install_torch_fused_head() -> bool:
    """Let TRL's fused LM head run where its Triton kernel can't: CPU tensors, or no Triton at all.

    TRL looks its kernel up as a module global at every call; this puts a dispatcher there that keeps
    TRL's kernel for CUDA tensors. Returns False when this TRL has no such hook (the model's own loss
    is then the fallback: build the trainer with fused_loss=False).
    """
    import trl.trainer.utils as trl_utils

    if not hasattr(trl_utils, "_ChunkedLogProbFunction"):
        return False
    current = trl_utils._ChunkedLogProbFunction
    if getattr(current, "handles_cpu", False):
        return True
    triton_kernel = current
    fallback = torch_chunked_logprob()

    class ChunkedLogProbDispatch:
        handles_cpu = True

        @staticmethod
        def apply(hidden, *args):
            if triton_kernel is not None and hidden.device.type in ("cuda", "xpu"):
                return triton_kernel.apply(hidden, *args)
            return fallback.apply(hidden, *args)

    trl_utils._ChunkedLogProbFunction = ChunkedLogProbDispatch
    return True


# ---------------------------------------------------------------------------------------------
# Varlen attention from PyTorch's own flash kernel (torch >= 2.10), for packed documents


def register_varlen_attention(check_device=None) -> str | None:
    """Register VARLEN with transformers; on a CUDA device, first check the kernel against SDPA there.

    Returns None when usable, else why not.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    if check_device is not None and getattr(check_device, "type", "cpu") == "cuda":
        problem = _check_varlen_kernel(check_device)
        if problem:
            return problem
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    # Like FlashAttention: no 4D mask; a 2D padding mask only when a batch is padded.
    AttentionMaskInterface.register(VARLEN, flash_attention_mask)
    return None


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             position_ids=None, **kwargs):
    """transformers attention interface: causal attention within each document of a packed or padded batch.

    query (batch, heads, seq, dim); key/value (batch, kv_heads, seq, dim); returns (batch, seq, heads, dim).
    """

    batch, heads, seq, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5
    if key.shape[2] != seq:
        return _cached_decode_attention(query, key, value, attention_mask, scale), None
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], dim)
    keep = None
    if attention_mask is not None and attention_mask.dim() == 2:
        keep = attention_mask.reshape(-1).bool()
        q, k, v = q[keep], k[keep], v[keep]
    cu_seqlens, max_len = _document_bounds(position_ids, attention_mask, batch, seq, q.device)
    out = _varlen_kernel(q, k, v, cu_seqlens, max_len, scale)
    if keep is not None:
        full = out.new_zeros(batch * seq, heads, dim)
        full[keep] = out
        out = full
    return out.reshape(batch, seq, heads, dim), None


def _cached_decode_attention(query, key, value, attention_mask, scale: float):
    """Generation with a KV cache (queries fewer than keys): SDPA, causal with the cache's offset."""
    import torch

    q_len, k_len = query.shape[2], key.shape[2]
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)[None, None]
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = mask & attention_mask.bool()[:, None, None, -k_len:]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                                           enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2)


def _document_bounds(position_ids, attention_mask, batch: int, seq: int, device):
    """cu_seqlens (int32) and the longest document, cached on position_ids: every layer asks again."""
    import torch

    if attention_mask is not None and attention_mask.dim() == 2:
        # Padded rows, one document each (padding on the right or the left).
        lengths = attention_mask.sum(-1).to(torch.int32)
    elif position_ids is not None:
        cached = getattr(position_ids, "_lt_document_bounds", None)
        if cached is not None:
            return cached
        flat = position_ids.reshape(-1)
        starts = (flat == 0).nonzero().reshape(-1)
        row_starts = torch.arange(0, batch * seq, seq, device=flat.device)
        starts = torch.unique(torch.cat([starts, row_starts]))
        ends = torch.cat([starts[1:], torch.tensor([batch * seq], device=flat.device)])
        lengths = (ends - starts).to(torch.int32)
    else:
        lengths = torch.full((batch,), seq, dtype=torch.int32, device=device)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0)).to(device)
    bounds = (cu_seqlens, int(lengths.max()))
    if attention_mask is None and position_ids is not None:
        position_ids._lt_document_bounds = bounds
    return bounds


def _varlen_kernel(q, k, v, cu_seqlens, max_len: int, scale: float):
    """(tokens, heads, dim) causal attention per document: PyTorch's flash varlen kernel on CUDA,
    SDPA one document at a time elsewhere (a reference for tests, not a fast path)."""
    import torch

    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        params = _varlen_parameters()
        kwargs = {"scale": scale}
        # torch 2.10 takes is_causal; 2.11+ a (left, right) window where (-1, 0) is causal.
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)
        else:
            kwargs["is_causal"] = True
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                kwargs["enable_gqa"] = True
            else:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **kwargs)

    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        doc = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*doc, is_causal=True, scale=scale,
                                                               enable_gqa=q.shape[1] != k.shape[1])
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs)


@functools.cache
def _varlen_parameters() -> frozenset[str]:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _check_varlen_kernel(device) -> str | None:
    """Two documents through the varlen kernel, forward and backward, against SDPA per document."""
    import torch

    try:
        generator = torch.Generator(device="cpu").manual_seed(0)
        heads, kv_heads, dim, lengths = 8, 2, 128, (37, 91)
        total = sum(lengths)

        def rand(h):
            return torch.randn(total, h, dim, generator=generator).to(device, torch.bfloat16).requires_grad_()

        q, k, v = rand(heads), rand(kv_heads), rand(kv_heads)
        cu = torch.tensor([0, lengths[0], total], dtype=torch.int32, device=device)
        out = _varlen_kernel(q, k, v, cu, max(lengths), dim**-0.5)
        out.float().square().sum().backward()
        reference = []
        for start, end in ((0, lengths[0]), (lengths[0], total)):
            doc = [t.detach()[start:end].transpose(0, 1)[None].float() for t in (q, k, v)]
            ref = torch.nn.functional.scaled_dot_product_attention(*doc, is_causal=True, enable_gqa=True)
            reference.append(ref[0].transpose(0, 1))
        error = (out.float() - torch.cat(reference)).abs().max().item()
        if not math.isfinite(error) or error > 5e-2 or q.grad is None or not torch.isfinite(q.grad).all():
            return f"max error {error:.3g} against SDPA"
    except Exception as exc:  # any failure means: don't use it
        return f"{type(exc).__name__}: {exc}"
    return None
