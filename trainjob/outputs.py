"""What a run leaves behind in its output_dir, ready to use and to push.

    adapter/      LoRA adapter + tokenizer (adapter_config names the 16-bit base)
    merged/       the adapter merged into the unquantized 16-bit base + tokenizer; generation stops
                  at <|eot_id|>
    README.md     model card: Hub metadata, settings, losses, loss curve, sample generations
    loss.png      train and eval loss
    result.json   what happened, for machines (the roles fetch it)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EOT = "<|eot_id|>"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CARD = "README.md"
LOSS_PLOT = "loss.png"
RESULT = "result.json"


def save_adapter(model, tokenizer, out_dir: Path, merge_base_model: str) -> Path:
    """Save the LoRA adapter; its config names the 16-bit base, the one it must be applied to."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # Trained on a 4-bit copy, the adapter records that repo; users load it onto the 16-bit base.
    config_path = out_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = merge_base_model
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    # PEFT leaves a blank template card here; say what the folder is instead.
    (out_dir / CARD).write_text(
        f"# LoRA adapter\n\nApply to [{merge_base_model}]({_hub_link(merge_base_model)}) with PEFT; "
        "the merged model and the full model card are one folder up.\n", encoding="utf-8")
    log.info("adapter saved to %s", out_dir)
    return out_dir


def merge_adapter(merge_base_model: str, adapter_dir: Path, out_dir: Path, tokenizer, dtype: str,
                  device: str = "cpu"):
    """Merge the adapter into a fresh unquantized copy of the base and save it in 16 bits.

    Merging into the 4-bit weights used for training would requantize and change the outputs.
    Returns the merged model, still loaded, for sample generations.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    log.info("merging %s into %s (%s)", adapter_dir, merge_base_model, dtype)
    base = AutoModelForCausalLM.from_pretrained(merge_base_model, dtype=torch_dtype, device_map={"": device})
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    stop_at_end_of_turn(merged, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log.info("merged model saved to %s", out_dir)
    return merged


def stop_at_end_of_turn(model, tokenizer) -> list[int]:
    """Make generation stop at <|eot_id|> (as well as the base's own eos) and pad with the pad token.

    Without this a chat model trained to end turns with <|eot_id|> keeps generating past them.
    """
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    if eot_id is None or eot_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {EOT} token; is this a Llama 3 tokenizer?")
    current = model.generation_config.eos_token_id
    eos_ids = [] if current is None else ([current] if isinstance(current, int) else list(current))
    if eot_id not in eos_ids:
        eos_ids.append(eot_id)
    model.generation_config.eos_token_id = eos_ids
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    return eos_ids


def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int = 128) -> list[dict[str, Any]]:
    """Greedy replies to a few prompts, cut at the first <|eot_id|>; `stopped` says if one came."""
    import torch

    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    samples = []
    model.eval()
    for prompt in prompts:
        input_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )["input_ids"].to(model.device)
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = output[0, input_ids.shape[1]:].tolist()
        stopped = eot_id in new_tokens
        if stopped:
            new_tokens = new_tokens[: new_tokens.index(eot_id)]
        reply = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        samples.append({"prompt": prompt, "reply": reply, "stopped": stopped, "tokens": len(new_tokens)})
    return samples


def loss_points(log_history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, eval loss) pairs from a Trainer's log history."""
    train = [(row["step"], row["loss"]) for row in log_history if "loss" in row and "step" in row]
    evals = [(row["step"], row["eval_loss"]) for row in log_history if "eval_loss" in row and "step" in row]
    return train, evals


def plot_loss(log_history: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    train, evals = loss_points(log_history)
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on a GPU instance
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass
class CardFacts:
    """Everything the model card says."""

    run_id: str
    base_model: str
    dataset: str
    hub_repo: str | None
    backend: str
    settings: dict[str, Any]
    steps: int
    train_loss: float | None
    eval_loss: float | None
    test_loss: float | None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    has_loss_plot: bool = False
    exports: list[str] = field(default_factory=list)


def write_model_card(path: Path, facts: CardFacts) -> Path:
    from huggingface_hub import ModelCardData

    metadata = ModelCardData(
        base_model=facts.base_model,
        # A local dataset has no Hub id to link to.
        datasets=None if _is_local(facts.dataset) else [facts.dataset],
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["llama-3", "lora", "sft", "trl", "llama-trainer"] + (["unsloth"] if facts.backend == "unsloth" else []),
    )
    repo = facts.hub_repo or f"<your-name>/{facts.run_id}"
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# {facts.hub_repo.split('/')[-1] if facts.hub_repo else facts.run_id}",
        "",
        f"A LoRA fine-tune of [{facts.base_model}]({_hub_link(facts.base_model)}) on "
        f"{_dataset_text(facts.dataset)}, trained with llama-trainer (run `{facts.run_id}`, "
        f"{facts.steps} steps, {facts.backend} backend).",
        "",
        "This repository holds the adapter merged into the 16-bit base (load it like any Llama 3 model); "
        "the LoRA adapter alone is in `adapter/`. Generation stops at `<|eot_id|>`.",
        "",
        "## Results",
        "",
        "| split | loss |",
        "| --- | --- |",
        f"| train (last logged) | {_fmt(facts.train_loss)} |",
        f"| validation | {_fmt(facts.eval_loss)} |",
        f"| test | {_fmt(facts.test_loss)} |",
        "",
    ]
    if facts.has_loss_plot:
        lines += [f"![train and eval loss]({LOSS_PLOT})", ""]
    lines += _loss_table(facts.log_history)
    lines += ["## Training settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in facts.settings.items()]
    lines.append("")
    if facts.samples:
        lines += ["## Sample generations", "", "Greedy decoding with the merged model.", ""]
        for sample in facts.samples:
            ending = "stopped at `<|eot_id|>`" if sample["stopped"] else "hit the token limit"
            lines += [f"**User:** {sample['prompt']}", "", f"**Assistant** ({ending}):", "", "```text",
                      sample["reply"], "```", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo}", dtype="auto", device_map="auto")',
        'messages = [{"role": "user", "content": "Hello!"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
        "                                       return_dict=True).to(model.device)",
        "output = model.generate(**inputs, max_new_tokens=256)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "The adapter alone, on the 16-bit base:",
        "",
        "```python",
        "from peft import PeftModel",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{facts.base_model}", dtype="auto", device_map="auto")',
        f'model = PeftModel.from_pretrained(base, "{repo}", subfolder="adapter")',
        "```",
        "",
    ]
    if facts.exports:
        lines += ["Also exported: " + ", ".join(f"`{name}`" for name in facts.exports) + ".", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _loss_table(log_history: list[dict[str, Any]], max_rows: int = 20) -> list[str]:
    train, evals = loss_points(log_history)
    if not train and not evals:
        return []
    by_step: dict[int, dict[str, float]] = {}
    for step, loss in train:
        by_step.setdefault(step, {})["train"] = loss
    for step, loss in evals:
        by_step.setdefault(step, {})["eval"] = loss
    steps = sorted(by_step)
    # Keep every eval row and thin the rest so the card stays readable on long runs.
    if len(steps) > max_rows:
        stride = len(steps) // max_rows + 1
        steps = [s for i, s in enumerate(steps) if "eval" in by_step[s] or i % stride == 0 or s == steps[-1]]
    lines = ["| step | train loss | eval loss |", "| --- | --- | --- |"]
    lines += [f"| {s} | {_fmt(by_step[s].get('train'))} | {_fmt(by_step[s].get('eval'))} |" for s in steps]
    return [*lines, ""]


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _cell(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return text.replace("|", "\\|")


def _is_local(name: str) -> bool:
    return os.path.exists(name) or name.startswith(("/", "./", "../", "~"))


def _hub_link(name: str) -> str:
    return name if _is_local(name) else f"https://huggingface.co/{name}"


def _dataset_text(dataset: str) -> str:
    if _is_local(dataset):
        return f"local data (`{Path(dataset).name}`)"
    return f"[{dataset}](https://huggingface.co/datasets/{dataset})"


def write_result(path: Path, result: dict[str, Any]) -> Path:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)  # readers never see half a file
    return path
