"""Fine-tune a Llama 3 Instruct model with LoRA on chat data, then save, merge and publish it.

    python -m trainjob.train --config job.json [--resume]

The recipe, top to bottom:
    validate  read the job config and choose the backend (before transformers is imported)
    setup     data -> tokenizer and template -> tokenized splits -> base model + LoRA -> W&B -> trainer
    train     train with evaluation and checkpoints (pushed to the Hub), then the test loss
    save      adapter, 16-bit merge, sample generations, loss curve, model card, exports
    publish   push everything to the Hub (private by default), with retries
    cleanup   result.json, W&B finished, checkpoint uploads drained: on every exit path

stdout carries one JSON event per line (see trainjob/progress.py); people read stderr.
Secrets come from the environment only: HF_TOKEN, WANDB_API_KEY.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import outputs, progress, publish, speed
from .backend import CPU, TRANSFORMERS_CUDA, Backend, BackendError, choose_backend
from .config import JobConfig, JobConfigError, load_job_config
from .data import DataValidationError
from .template import TemplateError
from .tracking import Tracker, start_tracking

log = logging.getLogger("trainjob")

CHECKPOINTS_DIR = "checkpoints"
HUB_CHECKPOINT_DIR = "hub-checkpoint"
EXPORT_DIR = "export"
SAMPLE_COUNT = 3
# With no validation split, this share of train (at most MAX_HELD_OUT conversations) is held out.
HELD_OUT_SHARE = 0.05
MAX_HELD_OUT = 200
# Exit codes: bad input (config, data) differs from a run that broke.
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_TERMINATED = 143


class Terminated(Exception):
    """SIGTERM: stop like any failure, so W&B is finished and checkpoint uploads complete."""


class GracefulStop:
    """SIGTERM during training ends it at the next step boundary with a checkpoint (pushed when
    there is a repo), so the run can resume; anywhere else, or a second time, it stops at once."""

    def __init__(self) -> None:
        self.training = False
        self.requested = False

    def handle(self, signum, frame) -> None:
        if self.training and not self.requested:
            self.requested = True
            log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
            return
        raise Terminated("terminated (SIGTERM)")

    def callback(self):
        from transformers import TrainerCallback

        stop = self

        class StopAtStepEnd(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if stop.requested:
                    control.should_training_stop = True
                    control.should_save = True

        return StopAtStepEnd()


GRACEFUL_STOP = GracefulStop()


@dataclass
class Splits:
    train: Any
    validation: Any | None
    test: Any | None
    stats: dict[str, Any]
    sample_prompts: list[str]


@dataclass
class Job:
    """What setup builds and the later stages use."""

    config: JobConfig
    backend: Backend
    output_dir: Path
    tokenizer: Any = None
    template: Any = None
    splits: Splits | None = None
    model: Any = None
    trainer: Any = None
    tracker: Tracker = field(default_factory=Tracker)
    pusher: publish.CheckpointPusher | None = None
    resume_from: Path | None = None
    resumed_from_step: int | None = None
    speed_plan: speed.SpeedPlan | None = None


@dataclass
class Trained:
    steps: int
    max_steps: int
    train_loss: float | None
    eval_loss: float | None
    test_loss: float | None
    log_history: list[dict[str, Any]]
    train_seconds: float
    tokens_seen: int


@dataclass
class Saved:
    adapter_dir: Path
    merged_dir: Path
    card: Path
    loss_plot: Path | None
    samples: list[dict[str, Any]]
    exports: list[Path]


@dataclass
class RunRecord:
    """Becomes result.json."""

    run_id: str
    status: str = "running"
    stage: str = "validate"
    error: str | None = None
    backend: dict[str, Any] | None = None
    speed: dict[str, Any] | None = None
    resumed_from_step: int | None = None
    steps: int | None = None
    max_steps: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    test_loss: float | None = None
    tokens_seen: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    hub: dict[str, Any] = field(default_factory=dict)
    wandb: dict[str, Any] = field(default_factory=dict)
    paths: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    _stage_started: float = field(default_factory=time.monotonic, repr=False)

    def enter(self, stage: str) -> None:
        """Start a stage: announce it and book the time spent in the one before."""
        now = time.monotonic()
        self.timings[self.stage] = round(self.timings.get(self.stage, 0.0) + now - self._stage_started, 2)
        self.stage, self._stage_started = stage, now
        progress.emit("stage", stage=stage)
        log.info("== %s", stage)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------------
# validate


def validate(config_path: Path) -> tuple[JobConfig, Backend]:
    """Read the config and pick the backend; Unsloth must be imported before transformers is."""
    config = load_job_config(config_path)
    if config.export and _has_export_stage():
        from .export import parse_formats

        try:
            parse_formats(config.export)
        except ValueError as exc:  # found now, not after hours of training
            raise JobConfigError(f"{config_path}: 'export': {exc}") from exc
    backend = choose_backend(load_in_4bit=config.load_in_4bit, optim=config.optim)
    return config, backend


def _has_export_stage() -> bool:
    return importlib.util.find_spec(f"{__package__}.export") is not None


# ---------------------------------------------------------------------------------------------
# setup


def setup_data(config: JobConfig, tokenizer) -> Splits:
    """Load and check the chats, render them with the template, and tokenize every split."""
    from . import template
    from .data import load_chats

    chats = load_chats(config.dataset, revision=config.dataset_revision)
    for warning in chats.warnings[:20]:
        log.warning("data: %s", warning)
    train_chats = list(chats["train"])
    validation_chats = list(chats.get("validation") or [])
    if not validation_chats and len(train_chats) > 1:
        # Without held-out data there is no eval loss to watch; take a seeded sample of train.
        count = max(1, min(MAX_HELD_OUT, int(len(train_chats) * HELD_OUT_SHARE)))
        shuffled = list(train_chats)
        random.Random(config.seed).shuffle(shuffled)
        validation_chats, train_chats = shuffled[:count], shuffled[count:]
        log.info("no validation split: holding out %d of %d train conversations", count, len(shuffled))
    test_chats = list(chats.get("test") or [])

    stats: dict[str, Any] = {"source": config.dataset, "files": chats.files}
    built = {}
    for name, conversations in (("train", train_chats), ("validation", validation_chats), ("test", test_chats)):
        if not conversations:
            built[name] = None
            continue
        data = template.build_training_dataset(
            tokenizer, conversations, config.max_seq_length, config.long_conversations, split=name
        )
        built[name] = data.dataset
        stats[name] = data.stats.as_dict()
        log.info("%s: %d conversations -> %d examples, %d tokens (%d in the loss); %d dropped as too long",
                 name, len(conversations), len(data.dataset), data.stats.total_tokens, data.stats.loss_tokens,
                 len(data.stats.dropped))
    if built["train"] is None or len(built["train"]) == 0:
        raise DataError(f"{config.dataset}: no training examples are left after tokenization")

    # None: a few prompts from the data; an empty list: no sample generations (they cost time on CPU).
    prompts = (config.sample_prompts if config.sample_prompts is not None
               else _first_user_prompts(test_chats or validation_chats or train_chats))
    return Splits(built["train"], built["validation"], built["test"], stats, prompts)


class DataError(ValueError):
    pass


def _first_user_prompts(conversations, count: int = SAMPLE_COUNT) -> list[str]:
    prompts = []
    for conversation in conversations:
        first_user = next((m["content"] for m in conversation if m["role"] == "user"), None)
        if first_user:
            prompts.append(first_user)
        if len(prompts) == count:
            break
    return prompts


def setup_tokenizer(config: JobConfig):
    """The base's tokenizer, set up for Llama 3 chat: template, <|eot_id|> as eos, pad != eos."""
    from . import template
    from .model import load_tokenizer

    tokenizer = load_tokenizer(config.base_model)
    info = template.prepare_tokenizer(tokenizer, family=config.chat_template)
    return tokenizer, info


def setup_model(config: JobConfig, backend: Backend, tokenizer):
    from .model import add_lora, load_base_model

    model, _ = load_base_model(config, backend)
    # The data was tokenized with our tokenizer: the model must agree on its pad token.
    model.config.pad_token_id = tokenizer.pad_token_id
    return add_lora(model, config, backend)


def find_resume_checkpoint(config: JobConfig, output_dir: Path) -> Path | None:
    """The newest checkpoint here, or else the one kept on the Hub (a new instance has none here)."""
    from transformers.trainer_utils import get_last_checkpoint

    local_dir = output_dir / CHECKPOINTS_DIR
    if local_dir.is_dir():
        last = get_last_checkpoint(str(local_dir))
        if last is not None:
            log.info("resuming from the local checkpoint %s", last)
            return Path(last)
    if config.hub_repo:
        checkpoint = publish.download_last_checkpoint(config.hub_repo, output_dir / HUB_CHECKPOINT_DIR)
        if checkpoint is not None:
            log.info("resuming from %s/last-checkpoint", config.hub_repo)
            return checkpoint
    log.warning("--resume: no checkpoint found here or on the Hub; training starts at step 0")
    return None


def checkpoint_step(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])


def build_sft_config(config: JobConfig, backend: Backend, output_dir: Path, *, report_to: str = "none",
                     has_validation: bool = True, eval_on_start: bool = False, **overrides):
    """Training arguments from the job config: one place, so tests train exactly as the job does.

    `overrides` replace single arguments (e.g. a speed plan's activation checkpointing).
    """
    from trl import SFTConfig

    # Ratios of the run's length when unset: five evaluations, a checkpoint at each.
    eval_steps = config.eval_steps or 0.2
    save_steps = config.save_steps or eval_steps
    arguments = dict(
        output_dir=str(output_dir / CHECKPOINTS_DIR),
        run_name=config.wandb_run_name,
        report_to=report_to,
        seed=config.seed,
        data_seed=config.seed,
        # Data: already tokenized with assistant masks, which TRL folds into labels. TRL's own
        # assistant_only_loss is for untokenized chats and rejects tokenized ones.
        max_length=config.max_seq_length,
        packing=config.packing,
        packing_strategy="bfd",
        dataset_num_proc=None,
        # Schedule
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler,
        optim=backend.optim,
        # Precision and memory
        bf16=backend.bf16,
        fp16=backend.fp16,
        use_cpu=backend.use_cpu,
        # Unsloth checkpoints activations its own way (use_gradient_checkpointing="unsloth").
        gradient_checkpointing=backend.name == TRANSFORMERS_CUDA,
        # Logging, evaluation, checkpoints
        logging_steps=config.logging_steps,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=eval_steps if has_validation else None,
        eval_on_start=eval_on_start and has_validation,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
    )
    return SFTConfig(**{**arguments, **overrides})


def build_trainer(model, tokenizer, sft_config, train_dataset, eval_dataset=None, callbacks=(),
                  fused_loss: bool = False):
    # The KV cache makes packed documents see each other: training never uses it.
    model.config.use_cache = False
    return _trainer_class(fused_loss)(
        model=model,
        args=sft_config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def _trainer_class(fused_loss: bool):
    from trl import SFTTrainer

    if fused_loss:
        return SFTTrainer
    from transformers import Trainer

    class ModelLossSFTTrainer(SFTTrainer):
        """SFTTrainer scoring with the model's own cross-entropy.

        TRL's default loss projects hidden states through a fused LM head built on Triton kernels,
        which need CUDA; on CPU the model computes the loss from its logits as usual.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, {**inputs, "use_cache": False},
                                        return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return ModelLossSFTTrainer


def setup_speed(config: JobConfig, backend: Backend, model, *, overrides=None,
                memory_budget: int | None = None) -> speed.SpeedPlan:
    """The fast path for this machine, chosen once the weights are loaded (free memory is what they leave)."""
    plan = speed.choose_speed_plan(
        speed.probe_device(), model.config, max_seq_length=config.max_seq_length, batch_size=config.batch_size,
        load_in_4bit=backend.load_in_4bit, backend=backend.name, lora_rank=config.lora_r, packing=config.packing,
        overrides=overrides, memory_budget=memory_budget)
    return speed.apply_speed_plan(model, plan)


def setup(config: JobConfig, backend: Backend, resume: bool, record: RunRecord) -> Job:
    output_dir = Path(config.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    job = Job(config=config, backend=backend, output_dir=output_dir)
    _seed_everything(config.seed)

    record.enter("data")
    job.tokenizer, job.template = setup_tokenizer(config)
    job.splits = setup_data(config, job.tokenizer)
    record.data = job.splits.stats

    if resume:
        job.resume_from = find_resume_checkpoint(config, output_dir)
        if job.resume_from is not None:
            job.resumed_from_step = record.resumed_from_step = checkpoint_step(job.resume_from)

    record.enter("model")
    job.model = setup_model(config, backend, job.tokenizer)
    job.speed_plan = setup_speed(config, backend, job.model)
    record.speed = job.speed_plan.describe()

    job.tracker = start_tracking(config.wandb_project, config.wandb_run_name, config.run_id,
                                 {**config.to_dict(), "backend": backend.name, "data": job.splits.stats})
    record.wandb = {"mode": job.tracker.mode, "url": job.tracker.url, "dir": job.tracker.directory}
    if config.hub_repo and config.push_checkpoints:
        job.pusher = publish.CheckpointPusher(config.hub_repo, config.hub_private)
    else:
        job.pusher = publish.CheckpointPusher(None)

    sft_config = build_sft_config(
        config, backend, output_dir, report_to=job.tracker.report_to,
        has_validation=job.splits.validation is not None,
        # A baseline eval loss before the first step; a resumed run already has one.
        eval_on_start=job.resume_from is None,
        **job.speed_plan.trainer_kwargs(),
    )
    start_fields = {
        "run_id": config.run_id,
        "backend": backend.name,
        "base_model": config.base_model,
        "dataset": config.dataset,
        "resumed_from_step": job.resumed_from_step,
        "output_dir": str(output_dir),
        "hub_repo": config.hub_repo,
        "wandb": job.tracker.mode,
        "speed": job.speed_plan.describe(),
    }
    callbacks = [progress.progress_callback(start_fields, on_step=job.tracker.log_step),
                 publish.checkpoint_push_callback(job.pusher), GRACEFUL_STOP.callback()]
    job.trainer = build_trainer(job.model, job.tokenizer, sft_config, job.splits.train, job.splits.validation,
                                callbacks, fused_loss=job.speed_plan.uses_fused_loss)
    return job


def _seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


# ---------------------------------------------------------------------------------------------
# train


def train(job: Job) -> Trained:
    trainer = job.trainer
    started = time.monotonic()
    GRACEFUL_STOP.training = True
    try:
        result = trainer.train(resume_from_checkpoint=str(job.resume_from) if job.resume_from else None)
    finally:
        GRACEFUL_STOP.training = False
    train_seconds = time.monotonic() - started
    if GRACEFUL_STOP.requested:
        job.pusher.wait()
        raise Terminated(f"terminated (SIGTERM) at step {trainer.state.global_step}; "
                         "the checkpoint there lets --resume continue")
    history = list(trainer.state.log_history)

    test_loss = None
    if job.splits.test is not None:
        metrics = trainer.evaluate(eval_dataset=job.splits.test, metric_key_prefix="test")
        test_loss = metrics.get("test_loss")
    train_losses = [row["loss"] for row in history if "loss" in row]
    eval_losses = [row["eval_loss"] for row in history if "eval_loss" in row]
    job.pusher.wait()
    return Trained(
        steps=trainer.state.global_step,
        max_steps=trainer.state.max_steps,
        train_loss=train_losses[-1] if train_losses else result.training_loss,
        eval_loss=eval_losses[-1] if eval_losses else None,
        test_loss=test_loss,
        log_history=history,
        train_seconds=train_seconds,
        tokens_seen=trainer.state.num_input_tokens_seen,
    )


# ---------------------------------------------------------------------------------------------
# save


def save(job: Job, trained: Trained, record: RunRecord) -> Saved:
    config, out = job.config, job.output_dir
    adapter_dir = outputs.save_adapter(job.trainer.model, job.tokenizer, out / outputs.ADAPTER_DIR,
                                       config.merge_base_model)
    _free_training_memory(job)

    record.enter("merge")
    # CPU bf16 is slow but fine for merging; a GPU without bf16 gets fp16.
    merge_dtype = "bfloat16" if job.backend.name == CPU else job.backend.dtype
    merged = outputs.merge_adapter(config.merge_base_model, adapter_dir, out / outputs.MERGED_DIR, job.tokenizer,
                                   merge_dtype, device="cpu" if job.backend.name == CPU else "cuda")

    record.enter("samples")
    samples = outputs.generate_samples(merged, job.tokenizer, job.splits.sample_prompts)
    for sample in samples:
        log.info("sample: %r -> %r%s", sample["prompt"], sample["reply"][:200],
                 "" if sample["stopped"] else " (no <|eot_id|>)")
    del merged
    _free_cuda()

    if config.export:
        record.enter("export")
    exports = export_formats(config, out)

    record.enter("card")
    loss_plot = outputs.plot_loss(trained.log_history, out / outputs.LOSS_PLOT, f"{config.run_id}: loss")
    card = outputs.write_model_card(out / outputs.CARD, outputs.CardFacts(
        run_id=config.run_id,
        base_model=config.merge_base_model,
        dataset=config.dataset,
        hub_repo=config.hub_repo,
        backend=job.backend.name,
        settings=_card_settings(config, trained),
        steps=trained.steps,
        train_loss=trained.train_loss,
        eval_loss=trained.eval_loss,
        test_loss=trained.test_loss,
        log_history=trained.log_history,
        samples=samples,
        has_loss_plot=loss_plot is not None,
        exports=[path.name for path in exports],
    ))
    return Saved(adapter_dir, out / outputs.MERGED_DIR, card, loss_plot, samples, exports)


def export_formats(config: JobConfig, out: Path) -> list[Path]:
    """GGUF and friends, when asked for and when the export stage is shipped with the job."""
    if not config.export:
        return []
    if not _has_export_stage():
        log.warning("export %s requested, but this job has no export stage; skipped", config.export)
        return []
    from .export import export_model

    # The Ollama model is named after the Hub repo (or the run), not after the "merged" folder.
    name = (config.hub_repo or config.run_id).split("/")[-1]
    paths = export_model(out / outputs.MERGED_DIR, out / EXPORT_DIR, list(config.export), model_name=name)
    return [Path(p) for p in paths]


def _card_settings(config: JobConfig, trained: Trained) -> dict[str, Any]:
    return {
        "LoRA r / alpha / dropout": f"{config.lora_r} / {config.lora_alpha} / {config.lora_dropout}",
        "LoRA modules": config.lora_target_modules,
        "max sequence length": config.max_seq_length,
        "packing": config.packing,
        "steps": f"{trained.steps} of {trained.max_steps}",
        "batch size x accumulation": f"{config.batch_size} x {config.gradient_accumulation_steps}",
        "learning rate": f"{config.learning_rate} ({config.lr_scheduler}, {config.warmup_steps} warmup steps)",
        "weight decay": config.weight_decay,
        "seed": config.seed,
        "tokens trained on": trained.tokens_seen,
    }


def _free_training_memory(job: Job) -> None:
    # The merge loads a second, 16-bit copy of the base: give back what training held first.
    job.trainer = None
    job.model = None
    _free_cuda()


def _free_cuda() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# publish


def publish_outputs(job: Job, saved: Saved) -> dict[str, Any]:
    """Merged model at the repo root, adapter under adapter/, card, loss curve and exports."""
    config = job.config
    files = publish.files_under(saved.merged_dir)
    files.update(publish.files_under(saved.adapter_dir, outputs.ADAPTER_DIR))
    files[outputs.CARD] = saved.card
    if saved.loss_plot is not None:
        files[outputs.LOSS_PLOT] = saved.loss_plot
    for path in saved.exports:
        files.update(publish.files_under(path) if path.is_dir() else {path.name: path})
    pushed = publish.push_files(config.hub_repo, files, f"Fine-tuned model from run {config.run_id}",
                                private=config.hub_private)
    return {"repo": pushed.repo_id, "url": publish.repo_url(pushed.repo_id), "private": config.hub_private,
            "commit": pushed.commit_oid, "commit_url": pushed.commit_url, "files": len(pushed.files),
            "confirmed": True}


# ---------------------------------------------------------------------------------------------
# the job


def run(config_path: Path, resume: bool) -> int:
    record = RunRecord(run_id="?")
    job: Job | None = None
    output_dir: Path | None = None
    exit_code = 0
    try:
        progress.emit("stage", stage="validate")
        config, backend = validate(config_path)
        record.run_id, record.backend = config.run_id, backend.describe()
        output_dir = Path(config.output_dir).resolve()
        job = setup(config, backend, resume, record)

        record.enter("train")
        trained = train(job)
        record.steps, record.max_steps = trained.steps, trained.max_steps
        record.train_loss, record.eval_loss, record.test_loss = trained.train_loss, trained.eval_loss, trained.test_loss
        record.tokens_seen = trained.tokens_seen
        job.tracker.summarize({"test/loss": trained.test_loss, "final/eval_loss": trained.eval_loss})

        record.enter("save")
        saved = save(job, trained, record)
        record.samples = saved.samples
        record.paths = {
            "adapter": str(saved.adapter_dir), "merged": str(saved.merged_dir), "card": str(saved.card),
            "loss_plot": str(saved.loss_plot) if saved.loss_plot else None,
            "exports": [str(p) for p in saved.exports], "checkpoints": str(output_dir / CHECKPOINTS_DIR),
        }
        if config.hub_repo:
            record.enter("push")
            record.hub.update(publish_outputs(job, saved))
        record.status = "succeeded"
    except (JobConfigError, BackendError, DataError, DataValidationError, TemplateError) as exc:
        exit_code = _fail(record, exc, EXIT_BAD_INPUT)
    except Terminated as exc:
        exit_code = _fail(record, exc, EXIT_TERMINATED)
    except KeyboardInterrupt:
        exit_code = _fail(record, Terminated("interrupted"), EXIT_TERMINATED)
    except Exception as exc:
        log.exception("run failed during %s", record.stage)
        exit_code = _fail(record, exc, EXIT_FAILED)
    finally:
        cleanup(job, record, output_dir, exit_code)
    return exit_code


def _fail(record: RunRecord, exc: BaseException, code: int) -> int:
    record.status = "failed"
    record.error = str(exc) if isinstance(exc, ValueError | Terminated) else f"{type(exc).__name__}: {exc}"
    log.error("%s failed: %s", record.stage, record.error)
    progress.emit("error", stage=record.stage, message=record.error)
    return code


def cleanup(job: Job | None, record: RunRecord, output_dir: Path | None, exit_code: int) -> None:
    """Drain checkpoint uploads, finish W&B and write result.json, whatever happened before."""
    last_stage = record.stage
    record.enter("cleanup")
    if job is not None and job.pusher is not None:
        try:
            job.pusher.close()
        except Exception as exc:
            log.warning("checkpoint upload did not finish: %s", exc)
        record.hub["checkpoints_pushed"] = job.pusher.pushed_steps
    if job is not None and job.trainer is not None and record.steps is None:
        record.steps, record.max_steps = job.trainer.state.global_step, job.trainer.state.max_steps
    if job is not None:
        job.tracker.finish(exit_code=exit_code)
    # result.json names the stage that failed, or "done".
    record.stage = "done" if record.status == "succeeded" else last_stage
    if output_dir is None:  # the config never loaded: there is nowhere to write
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    result_path = outputs.write_result(output_dir / outputs.RESULT, record.to_dict())
    progress.emit("done", result=str(result_path), status=record.status)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainjob.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="job config (JSON)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint (here, or downloaded from the Hub repo)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Progress bars are for terminals; the job's log is a file.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    progress.claim_stdout()
    signal.signal(signal.SIGTERM, GRACEFUL_STOP.handle)
    return run(args.config, args.resume)


if __name__ == "__main__":
    sys.exit(main())
