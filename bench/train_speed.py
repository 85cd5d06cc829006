"""Training speed: the plain HF + PEFT padded baseline against the training job's own path, in one process.

    python3 bench/train_speed.py --shape tiny --steps 6 --json tiny.json          # CPU, seconds
    python3 bench/train_speed.py --shape llama3-8b --steps 8 --json 8b.json       # one big GPU, minutes

Both sides train LoRA (r=16 on all seven projections) on the same synthetic chat-shaped data, from the
same saved weights, with the same LoRA values. The baseline is a plain loop: transformers + PEFT,
batches of 8 padded to their longest conversation, gradient checkpointing, AdamW. "Ours" is what
trainjob/train.py runs: trainjob.model loading + LoRA, the trainjob.speed plan, train.py's SFTConfig and
trainer (TRL SFTTrainer with padding-free packing). Reported per row: real (non-padding) tokens/s,
MFU at 4N FLOPs per token against a matmul rate measured in the same run, peak memory, and the loss of
one fixed batch before training next to the baseline's (loss parity). See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 1024**3
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASELINE_BATCH = 8
FIXED_BATCH = 8


@dataclass(frozen=True)
class Shape:
    name: str
    model: dict[str, int]
    vocab: str  # "tiny" (trainjob.tiny's byte-level BPE) or "llama3" (128,256 ids laid out like Llama 3's)
    median_tokens: int
    sigma: float
    min_tokens: int
    max_tokens: int
    max_seq_length: int
    batch_size: int  # packed rows per micro-step for "ours"


SHAPES = {
    "tiny": Shape("tiny", dict(hidden_size=128, layers=2, heads=4, kv_heads=2, intermediate=256,
                               max_position_embeddings=1024),
                  "tiny", median_tokens=48, sigma=0.8, min_tokens=12, max_tokens=256, max_seq_length=512,
                  batch_size=1),
    # The 8B path on a CPU: Llama 3's vocabulary and tokenizer layout, two small layers.
    "llama3-mini": Shape("llama3-mini", dict(hidden_size=128, layers=2, heads=4, kv_heads=2, intermediate=256,
                                             max_position_embeddings=2048),
                         "llama3", median_tokens=64, sigma=0.8, min_tokens=16, max_tokens=256,
                         max_seq_length=512, batch_size=1),
    "llama3-8b": Shape("llama3-8b", dict(hidden_size=4096, layers=32, heads=32, kv_heads=8, intermediate=14336,
                                         max_position_embeddings=8192),
                       "llama3", median_tokens=330, sigma=0.9, min_tokens=32, max_tokens=2048,
                       max_seq_length=4096, batch_size=2),
}

@dataclass(frozen=True)
class RowSpec:
    overrides: dict[str, str]
    memory_cap_gib: float | None = None
    load_in_4bit: bool = False


# Rows after the baseline. Each of the first five adds one step to the row before it, so their
# differences measure that step; "ours" is the plan chosen for the machine as it is.
# Order matters: Liger patches transformers' Llama module for every model built after it.
LADDER = {
    "packed": RowSpec({"attention": "sdpa", "liger": "off", "checkpointing": "full", "fused_loss": "model"}),
    "+fused-loss": RowSpec({"attention": "sdpa", "liger": "off", "checkpointing": "full"}),
    "+liger": RowSpec({"attention": "sdpa", "checkpointing": "full"}),
    "+varlen": RowSpec({"checkpointing": "full"}),
    "ours": RowSpec({}),
    "ours-24g": RowSpec({}, memory_cap_gib=24),
    "qlora-12g": RowSpec({}, memory_cap_gib=12, load_in_4bit=True),
    "ours+compile": RowSpec({"compile": "on"}),
}
DEFAULT_ROWS = {"cpu": ["baseline", "ours"],
                "cuda": ["baseline", "packed", "+fused-loss", "+liger", "+varlen", "ours", "ours-24g", "qlora-12g",
                         "ours+compile"]}


@dataclass
class Row:
    name: str
    tokens_per_s: float = 0.0
    mfu: float = 0.0
    peak_memory_gib: float = 0.0
    step_s: float = 0.0
    steps_timed: int = 0
    real_tokens: int = 0
    computed_tokens: int = 0
    loss_fixed_batch: float | None = None
    loss_parity: float | None = None  # |loss - baseline's| on the fixed batch
    first_loss: float | None = None
    last_loss: float | None = None
    speedup: float | None = None
    seconds: float = 0.0
    plan: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class Bench:
    shape: Shape
    steps: int
    warmup: int
    seed: int
    workdir: Path
    device: str
    peak_flops: float
    flops_per_token: int
    model_dir: Path = field(init=False)
    examples: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, data


def llama3_layout_tokenizer():
    """A word-level tokenizer with Llama 3's 128,256 ids: 128,000 ordinary tokens, then its special tokens
    in Llama 3's order, its chat template, <|eot_id|> as eos. Speed does not depend on which ids are drawn."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from trainjob.tiny import BEGIN_OF_TEXT, EOT, LLAMA3_CHAT_TEMPLATE, PAD, SPECIAL_TOKENS

    vocab = {f"w{i}": i for i in range(128000)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = list(SPECIAL_TOKENS) + [f"<|reserved_special_token_{i}|>" for i in range(6, 250)]
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BEGIN_OF_TEXT, eos_token=EOT,
                                        pad_token=PAD, model_max_length=131072)
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def write_base_model(shape: Shape, out: Path, device: str) -> Path:
    """Random weights saved where from_pretrained finds them (what train.py loads a base from)."""
    import torch

    from trainjob.tiny import build_llama3_style_tokenizer, build_tiny_llama

    tokenizer = build_llama3_style_tokenizer() if shape.vocab == "tiny" else llama3_layout_tokenizer()
    spec = shape.model
    on_gpu = device == "cuda" and spec["hidden_size"] >= 1024
    # Building 8B parameters on the GPU in bf16 takes seconds; on the CPU, minutes.
    with torch.device("cuda" if on_gpu else "cpu"):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if on_gpu else torch.float32)
        try:
            model = build_tiny_llama(tokenizer, hidden_size=spec["hidden_size"], layers=spec["layers"],
                                     heads=spec["heads"], kv_heads=spec["kv_heads"],
                                     intermediate=spec["intermediate"],
                                     max_position_embeddings=spec["max_position_embeddings"])
        finally:
            torch.set_default_dtype(previous)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    _free()
    return out


def synthetic_chats(tokenizer, count: int, shape: Shape, seed: int) -> list[dict]:
    """Token-level chats in the shape train.py's template stage produces (`input_ids`, `assistant_masks`).

    Lengths are log-normal (median `shape.median_tokens`), clipped; each chat is <|begin_of_text|>, an
    optional system turn, then 1-3 user/assistant exchanges, every turn a header and content closed by
    <|eot_id|>; the loss covers each assistant reply and its <|eot_id|>.
    """
    from trainjob.tiny import BEGIN_OF_TEXT, END_HEADER, EOT, START_HEADER

    rng = random.Random(seed)
    special = {name: tokenizer.convert_tokens_to_ids(name) for name in (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT)}
    first_special = min([*tokenizer.all_special_ids, len(tokenizer)])
    ordinary = max(2, min(first_special, len(tokenizer)) - 1)

    def header(role_id: int) -> list[int]:
        return [special[START_HEADER], role_id, special[END_HEADER], newline]

    newline, system_id, user_id, assistant_id = (rng.randrange(ordinary) for _ in range(4))
    chats = []
    for _ in range(count):
        length = round(shape.median_tokens * math.exp(rng.gauss(0.0, shape.sigma)))
        length = max(shape.min_tokens, min(shape.max_tokens, length))
        exchanges = rng.choice((1, 1, 2, 3))
        system = rng.random() < 0.3
        overhead = 1 + 5 * (2 * exchanges + system)
        content = max(2 * exchanges + system, length - overhead)
        ids, mask = [special[BEGIN_OF_TEXT]], [0]
        turns = ([("system", 0.1)] if system else []) + [("user", 0.35), ("assistant", 0.65)] * exchanges
        total_weight = sum(weight for _, weight in turns)
        for role, weight in turns:
            size = max(1, int(content * weight / total_weight))
            role_id = {"system": system_id, "user": user_id, "assistant": assistant_id}[role]
            body = [rng.randrange(ordinary) for _ in range(size)] + [special[EOT]]
            trained = 1 if role == "assistant" else 0
            ids += header(role_id) + body
            mask += [0] * 4 + [trained] * len(body)
        chats.append({"input_ids": ids[: shape.max_tokens], "assistant_masks": mask[: shape.max_tokens]})
    return chats


def _labels(example: dict) -> list[int]:
    return [t if m else -100 for t, m in zip(example["input_ids"], example["assistant_masks"], strict=True)]


def seed_lora(model, seed: int) -> None:
    """Give every LoRA matrix the same non-zero values in both runs (PEFT starts B at zero), so the
    parity check covers the adapters too."""
    import torch

    for name, param in model.named_parameters():
        if "lora_" not in name:
            continue
        generator = torch.Generator().manual_seed(seed + sum(map(ord, name)) * 7919 % (2**31))
        fan_in = param.shape[1]
        values = torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)
        with torch.no_grad():
            param.copy_(values * (0.5 if "lora_B" in name else 1.0))


# ---------------------------------------------------------------------------------------------
# Measuring


def measure_matmul_flops(device: str) -> float:
    """Dense matmul FLOP/s here (bf16 on a GPU, fp32 on a CPU), the best of three tries: the MFU
    denominator, measured in this run on this machine."""
    import torch

    if device == "cuda":
        n, dtype, repeats = 8192, torch.bfloat16, 10
    else:
        n, dtype, repeats = 1024, torch.float32, 4
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        _sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started))
    return best


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class MemoryMeter:
    """Peak device memory (CUDA's allocator) or, on a CPU, the process's RSS sampled at each step."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0
        if device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def sample(self) -> None:
        if self.device == "cpu":
            import psutil

            self.peak = max(self.peak, psutil.Process().memory_info().rss)

    def peak_gib(self) -> float:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / GIB
        return self.peak / GIB


@dataclass
class StepClock:
    """Per-step wall times and token counts; the first `warmup` steps are left out of the rates."""

    device: str
    warmup: int
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    computed: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def record(self, seconds: float, tokens: int, computed: int, loss: float | None) -> None:
        self.times.append(seconds)
        self.tokens.append(tokens)
        self.computed.append(computed)
        if loss is not None:
            self.losses.append(loss)

    def fill(self, row: Row, bench: Bench) -> None:
        timed = slice(self.warmup, None)
        seconds = sum(self.times[timed])
        row.steps_timed = len(self.times[timed])
        row.real_tokens = sum(self.tokens[timed])
        row.computed_tokens = sum(self.computed[timed])
        row.tokens_per_s = row.real_tokens / seconds if seconds > 0 else 0.0
        row.step_s = statistics.median(self.times[timed]) if row.steps_timed else 0.0
        row.mfu = row.tokens_per_s * bench.flops_per_token / bench.peak_flops
        if self.losses:
            row.first_loss, row.last_loss = self.losses[0], self.losses[-1]


# ---------------------------------------------------------------------------------------------
# The baseline: plain transformers + PEFT, padded batches


def run_baseline(bench: Bench, fixed: list[dict]) -> Row:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    row = Row("baseline")
    started = time.perf_counter()
    meter = MemoryMeter(bench.device)
    cuda = bench.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(
        bench.model_dir, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa",
        **({"device_map": {"": 0}} if cuda else {}))
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                             target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"))
    seed_lora(model, bench.seed)
    pad_id = model.config.pad_token_id
    row.loss_fixed_batch = fixed_batch_loss_baseline(model, fixed, pad_id, bench.device)

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.001)
    clock = StepClock(bench.device, bench.warmup)
    for step in range(bench.warmup + bench.steps):
        chunk = bench.examples[step * BASELINE_BATCH:(step + 1) * BASELINE_BATCH]
        batch = pad_batch(chunk, pad_id, bench.device)
        _sync(bench.device)
        step_started = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        _sync(bench.device)
        clock.record(time.perf_counter() - step_started, int(batch["attention_mask"].sum()),
                     batch["input_ids"].numel(), loss_value)
        meter.sample()
    clock.fill(row, bench)
    row.peak_memory_gib = meter.peak_gib()
    row.seconds = time.perf_counter() - started
    del model, optimizer
    _free()
    return row


def pad_batch(examples: list[dict], pad_id: int, device: str) -> dict:
    """Right-padded to the longest example: input_ids, attention_mask, labels (-100 off the loss)."""
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(_labels(ex))
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def fixed_batch_loss_baseline(model, fixed: list[dict], pad_id: int, device: str) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        loss = model(**pad_batch(fixed, pad_id, device)).loss.item()
    model.train()
    return loss


# ---------------------------------------------------------------------------------------------
# Ours: the training job's own functions


def run_ours(bench: Bench, fixed: list[dict], name: str, spec: RowSpec) -> Row:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from trainjob import speed, train
    from trainjob.backend import choose_backend
    from trainjob.config import JobConfig

    row = Row(name)
    started = time.perf_counter()
    meter = MemoryMeter(bench.device)
    shape = bench.shape
    out = bench.workdir / f"run-{name.strip('+')}"
    config = JobConfig(
        run_id=f"bench-{name.strip('+')}", dataset="synthetic", base_model=str(bench.model_dir),
        max_seq_length=shape.max_seq_length, batch_size=shape.batch_size, gradient_accumulation_steps=1,
        max_steps=bench.warmup + bench.steps, learning_rate=2e-4, warmup_steps=0, logging_steps=1,
        save_steps=10**6, wandb_project=None, output_dir=str(out), seed=bench.seed, load_in_4bit=spec.load_in_4bit,
    )
    backend = choose_backend(load_in_4bit=config.load_in_4bit, optim=config.optim)
    tokenizer, _ = train.setup_tokenizer(config)
    model = train.setup_model(config, backend, tokenizer)
    seed_lora(model, bench.seed)

    memory_budget = None if spec.memory_cap_gib is None else int(spec.memory_cap_gib * GIB)
    if hasattr(train, "setup_speed"):
        plan = train.setup_speed(config, backend, model, overrides=dict(spec.overrides), memory_budget=memory_budget)
    else:  # until train.py calls the speed plan itself: the same two calls
        plan = speed.apply_speed_plan(model, speed.choose_speed_plan(
            speed.probe_device(), model.config, max_seq_length=config.max_seq_length,
            batch_size=config.batch_size, load_in_4bit=backend.load_in_4bit, backend=backend.name,
            lora_rank=config.lora_r, packing=config.packing, overrides=dict(spec.overrides),
            memory_budget=memory_budget))
    row.plan = plan.describe()

    # The plan's training arguments (activation checkpointing) as train.py passes them.
    sft_config = train.build_sft_config(config, backend, out, report_to="none", has_validation=False,
                                        **plan.trainer_kwargs())
    dataset = Dataset.from_dict({"input_ids": [ex["input_ids"] for ex in bench.examples],
                                 "assistant_masks": [ex["assistant_masks"] for ex in bench.examples]})

    clock = StepClock(bench.device, bench.warmup)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            _sync(bench.device)
            self.started, self.seen = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            _sync(bench.device)
            tokens = state.num_input_tokens_seen - self.seen
            clock.record(time.perf_counter() - self.started, tokens, tokens, None)
            meter.sample()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    trainer = train.build_trainer(model, tokenizer, sft_config, dataset, None, callbacks=[Timer()],
                                  fused_loss=plan.uses_fused_loss)
    row.loss_fixed_batch = fixed_batch_loss_ours(trainer, fixed)
    if bench.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    clock.fill(row, bench)
    row.peak_memory_gib = meter.peak_gib()
    row.seconds = time.perf_counter() - started
    del trainer, model
    _free()
    return row


def fixed_batch_loss_ours(trainer, fixed: list[dict]) -> float:
    """The loss training computes (trainer.compute_loss on the trainer's own collated, packed batch)."""
    import torch

    batch = trainer.data_collator([{"input_ids": ex["input_ids"], "labels": _labels(ex)} for ex in fixed])
    inputs = trainer._prepare_inputs(batch)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs).item()
    trainer.model.train()
    return loss


# ---------------------------------------------------------------------------------------------
# The run


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel", "triton",
                 "flash-attn", "unsloth", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    import torch

    found["cuda"] = torch.version.cuda
    return found


def run(shape_name: str, steps: int, warmup: int, rows: list[str] | None, seed: int, json_path: Path | None,
        time_budget_s: float | None, workdir: Path | None, markdown_path: Path | None = None) -> dict[str, Any]:
    """Measure each row in turn; the JSON (and markdown) are rewritten after every row, so a run cut
    short still leaves the rows it finished."""
    import torch

    from trainjob.speed import ModelShape, training_flops_per_token

    started = time.perf_counter()
    shape = SHAPES[shape_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = rows or DEFAULT_ROWS[device]
    unknown = [name for name in rows if name != "baseline" and name not in LADDER]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; rows: baseline, {', '.join(LADDER)}")
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="lt-bench-", dir=workdir) as tmp:
        bench = Bench(shape, steps, warmup, seed, Path(tmp), device, measure_matmul_flops(device), 0)
        bench.model_dir = write_base_model(shape, Path(tmp) / "base", device)
        from transformers import AutoConfig, AutoTokenizer

        model_config = AutoConfig.from_pretrained(bench.model_dir)
        bench.flops_per_token = training_flops_per_token(ModelShape.of(model_config))
        tokenizer = AutoTokenizer.from_pretrained(bench.model_dir)
        mean_tokens = shape.median_tokens * math.exp(shape.sigma**2 / 2)
        per_step = shape.batch_size * shape.max_seq_length / mean_tokens
        count = max(BASELINE_BATCH * (steps + warmup), int((steps + warmup) * per_step * 1.5) + FIXED_BATCH)
        bench.examples = synthetic_chats(tokenizer, count, shape, seed)
        fixed = synthetic_chats(tokenizer, FIXED_BATCH, shape, seed + 1)
        context = {
            "shape": shape_name,
            "model": shape.model | {"vocab": model_config.vocab_size},
            "data": {"median_tokens": shape.median_tokens, "sigma": shape.sigma,
                     "clip": [shape.min_tokens, shape.max_tokens], "max_seq_length": shape.max_seq_length,
                     "baseline_batch": BASELINE_BATCH, "ours_rows_per_step": shape.batch_size,
                     "conversations": len(bench.examples)},
            "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "versions": versions(),
            "steps": steps,
            "warmup_steps": warmup,
            "matmul_tflops_measured": bench.peak_flops / 1e12,
            "flops_per_token": bench.flops_per_token,
            "setup_s": round(time.perf_counter() - started, 1),
        }

        results: list[Row] = []
        skipped: list[str] = []
        report = make_report(context, results, skipped, started)
        for name in rows:
            if time_budget_s is not None and results and time.perf_counter() - started > time_budget_s:
                skipped.append(f"{name} (time budget)")
                continue
            spec = LADDER.get(name)
            if spec is not None and spec.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
                skipped.append(f"{name} (bitsandbytes is not installed)")
                continue
            try:
                row = run_baseline(bench, fixed) if name == "baseline" else run_ours(bench, fixed, name, spec)
            except Exception as exc:  # one failed row must not lose the others' numbers
                row = Row(name, error=f"{type(exc).__name__}: {exc}")
            # Out here, the failed row's traceback (and the model it holds) is gone.
            _free()
            results.append(row)
            print(f"  {name}: {row.tokens_per_s:,.0f} tokens/s, {row.peak_memory_gib:.2f} GiB"
                  f"{'  ERROR ' + row.error if row.error else ''}", file=sys.stderr, flush=True)
            report = make_report(context, results, skipped, started)
            write_outputs(report, json_path, markdown_path)
    report = make_report(context, results, skipped, started)
    write_outputs(report, json_path, markdown_path)
    return report


def make_report(context: dict[str, Any], results: list[Row], skipped: list[str], started: float) -> dict[str, Any]:
    baseline = next((r for r in results if r.name == "baseline" and not r.error), None)
    for row in results:
        if baseline and row.tokens_per_s and baseline.tokens_per_s:
            row.speedup = row.tokens_per_s / baseline.tokens_per_s
        if baseline and row.loss_fixed_batch is not None and baseline.loss_fixed_batch is not None:
            row.loss_parity = abs(row.loss_fixed_batch - baseline.loss_fixed_batch)
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **context,
            "total_s": round(time.perf_counter() - started, 1),
            "rows": [dataclasses.asdict(row) for row in results], "skipped_rows": list(skipped)}


def write_outputs(report: dict[str, Any], json_path: Path | None, markdown_path: Path | None) -> None:
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if markdown_path is not None:
        markdown_path.write_text(format_markdown(report))


def format_markdown(report: dict[str, Any]) -> str:
    """The table with what it was measured on: ready to paste into bench/RESULTS.md."""
    v = report["versions"]
    stack = ", ".join(f"{name} {v[name]}" for name in ("torch", "transformers", "trl", "peft", "liger-kernel",
                                                        "triton", "flash-attn", "bitsandbytes") if v.get(name))
    lines = [
        f"### {report['shape']} on {report['device']} ({report['date']})",
        "",
        f"Python {v['python']}, CUDA {v.get('cuda')}; {stack}. {report['steps']} timed steps per row after "
        f"{report['warmup_steps']} warm-up; matmul rate measured in the run: "
        f"{report['matmul_tflops_measured']:.3g} TFLOP/s (the MFU denominator); 4N = "
        f"{report['flops_per_token'] / 1e9:.3g} GFLOP/token.",
        "",
        format_table(report),
        "",
    ]
    if report["skipped_rows"]:
        lines += [f"Not measured: {', '.join(report['skipped_rows'])}.", ""]
    return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
    head = ("| row | real tokens/s | vs baseline | MFU (4N) | peak GiB | s/step | padding | loss (fixed batch) "
            "| parity | plan |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in report["rows"]:
        if row["error"]:
            lines.append(f"| {row['name']} | failed: {row['error'][:120]} | | | | | | | | |")
            continue
        padding = 1 - row["real_tokens"] / row["computed_tokens"] if row["computed_tokens"] else 0.0
        plan = row["plan"] or {}
        plan_text = (f"{plan.get('attention')}, loss {plan.get('fused_loss')}, liger {'on' if plan.get('liger') else 'off'}, "
                     f"ckpt {plan.get('checkpointing')}{' /' + str(plan.get('every_n_layers')) if plan.get('checkpointing') == 'selective' else ''}"
                     f"{', compiled' if plan.get('compile_layers') else ''}") if plan else "plain HF+PEFT, padded, ckpt"
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] else ""
        parity = f"{row['loss_parity']:.1e}" if row["loss_parity"] is not None else ""
        loss = f"{row['loss_fixed_batch']:.4f}" if row["loss_fixed_batch"] is not None else ""
        lines.append(f"| {row['name']} | {row['tokens_per_s']:,.0f} | {speedup} | {100 * row['mfu']:.1f}% "
                     f"| {row['peak_memory_gib']:.2f} | {row['step_s']:.3f} | {100 * padding:.0f}% | {loss} "
                     f"| {parity} | {plan_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, per row")
    parser.add_argument("--rows", help=f"comma-separated, from: baseline, {', '.join(LADDER)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write the table, with versions, here")
    parser.add_argument("--time-budget", type=float, help="start no new row after this many seconds")
    parser.add_argument("--workdir", type=Path, help="where the random base model is saved (default: $TMPDIR)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    rows = [r.strip() for r in args.rows.split(",")] if args.rows else None
    report = run(args.shape, args.steps, args.warmup, rows, args.seed, args.json, args.time_budget, args.workdir,
                 args.markdown)
    print(f"\n{report['shape']} on {report['device']}, {report['steps']} timed steps per row "
          f"(+{report['warmup_steps']} warm-up), matmul peak measured {report['matmul_tflops_measured']:.3g} TFLOP/s\n")
    print(format_table(report))
    return 0 if all(not row["error"] for row in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
