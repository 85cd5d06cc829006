"""The training job end to end on CPU: pull a tiny base model and a chats dataset from the (fake)
Hub, train, evaluate, merge, push, and use what was pushed the way a user would."""

from __future__ import annotations

import json
import math

import pytest

from tests.hub_support import fake_hub_fixture, hub_env_fixture, last_json_line, run_python  # noqa: F401
from tests.train_support import BASE_REPO, DATASET_REPO, run_job, upload_base_and_chats, write_job_config
from tests.wandb_reader import find_run_files, read_run

pytest.importorskip("trl")

MODEL_REPO = "tester/tiny-chats-lora"
MAX_STEPS = 16

# Loads what was pushed, like a user would, and reports what a user would check.
CHECK_PUSHED_MODEL = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

repo, base_repo = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(repo)
merged = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32)
generation = GenerationConfig.from_pretrained(repo)
eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]

# The adapter, applied to the 16-bit base it names, must give what the merged model gives.
adapter_config = json.load(open(__import__("huggingface_hub").hf_hub_download(repo, "adapter/adapter_config.json")))
base = AutoModelForCausalLM.from_pretrained(base_repo, dtype=torch.float32)
base_q = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
with_adapter = PeftModel.from_pretrained(base, repo, subfolder="adapter")
ids = tokenizer.apply_chat_template([{"role": "user", "content": "What colour is the cat?"}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    merged_logits = merged(input_ids=ids).logits
    adapter_logits = with_adapter(input_ids=ids).logits
    out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
new = out[0, ids.shape[1]:].tolist()
print(json.dumps({
    "architecture": merged.config.architectures,
    "dtype": str(next(merged.parameters()).dtype),
    "eos": eos, "eot": eot, "pad": generation.pad_token_id, "tokenizer_eos": tokenizer.eos_token,
    "tokenizer_pad": tokenizer.pad_token,
    "merged_differs_from_base": not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base_q),
    "adapter_vs_merged_max_diff": (merged_logits - adapter_logits).abs().max().item(),
    "adapter_base": adapter_config["base_model_name_or_path"],
    "stopped": eot in new,
    "reply": tokenizer.decode(new, skip_special_tokens=True),
}))
"""


@pytest.mark.slow
def test_job_trains_merges_and_pushes_a_model_users_can_load(fake_hub, hub_env, tmp_path):
    upload_base_and_chats(fake_hub, tmp_path)
    config = write_job_config(tmp_path, run_id="tiny-e2e", hub_repo=MODEL_REPO, max_steps=MAX_STEPS,
                              eval_steps=4, save_steps=4)
    env = {**hub_env, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    # A Hub hiccup on the first commit (a checkpoint push): retried, nothing lost.
    fake_hub.fail_next("commit", 503, times=1)

    job = run_job(config, env, tmp_path)
    print(f"job took {job.seconds:.1f} s")

    # The job ran to the end, and stdout held nothing but events.
    assert job.returncode == 0, job.stderr[-6000:]
    assert job.non_json == [], job.non_json[:5]
    start = job.one("start")
    assert (start["backend"], start["base_model"], start["max_steps"]) == ("cpu", BASE_REPO, MAX_STEPS)
    steps = job.of("step")
    assert [e["step"] for e in steps] == list(range(1, MAX_STEPS + 1))
    for event in steps:
        assert set(event) >= {"step", "max_steps", "epoch", "loss", "lr", "tokens_per_s", "eta_s"}
        assert event["tokens_per_s"] > 0 and math.isfinite(event["loss"])
    assert steps[-1]["eta_s"] == 0
    stages = [e["stage"] for e in job.of("stage")]
    assert stages == ["validate", "data", "model", "train", "save", "merge", "samples", "card", "push", "cleanup"]
    done = job.one("done")
    assert done["status"] == "succeeded"

    # Both base model and data really came through the Hub clients.
    resolved = [r.path for r in fake_hub.requests_to("resolve")]
    assert any(BASE_REPO in p and p.endswith("model.safetensors") for p in resolved), resolved
    assert any(DATASET_REPO in p and p.endswith("train.jsonl") for p in resolved), resolved
    assert fake_hub.requests_to("cdn", "GET")  # the weights themselves, from the LFS storage host

    # The loss went down: the baseline eval (before step 1) against the last, and train early against late.
    evals = job.of("eval")
    assert [e["step"] for e in evals] == [0, 4, 8, 12, 16]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1, evals
    losses = [e["loss"] for e in steps]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1, losses

    result = json.loads((tmp_path / "outputs" / "result.json").read_text())
    assert result["status"] == "succeeded" and result["steps"] == MAX_STEPS
    assert result["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], abs=1e-5)
    assert result["test_loss"] == pytest.approx(job.one("test")["test_loss"], abs=1e-5)
    assert result["hub"]["repo"] == MODEL_REPO and result["hub"]["confirmed"] is True
    assert result["hub"]["url"] == f"{fake_hub.url}/{MODEL_REPO}"
    assert result["hub"]["checkpoints_pushed"] == [4, 8, 12, 16]
    assert [r.status for r in fake_hub.requests_to("commit")].count(503) == 1
    assert result["backend"]["name"] == "cpu"

    # Everything stays in the output dir as well.
    out = tmp_path / "outputs"
    for name in ("adapter/adapter_model.safetensors", "merged/model.safetensors", "README.md", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")

    # The Hub repo: private, merged model at the root, adapter beside it, card, curve, last checkpoint.
    assert fake_hub.repos[("model", MODEL_REPO)].private is True
    files = set(fake_hub.list_files(MODEL_REPO))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "loss.png", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
            "last-checkpoint/trainer_state.json", "last-checkpoint/optimizer.pt"} <= files, sorted(files)
    assert "adapter_config.json" not in files  # at the root it would make transformers load it as an adapter
    assert b"[More Information Needed]" not in fake_hub.read_file(MODEL_REPO, "adapter/README.md")
    pushed_state = json.loads(fake_hub.read_file(MODEL_REPO, "last-checkpoint/trainer_state.json"))
    assert pushed_state["global_step"] == MAX_STEPS

    card = fake_hub.read_file(MODEL_REPO, "README.md").decode()
    metadata = card.split("---")[1]
    assert f"base_model: {BASE_REPO}" in metadata
    assert f"- {DATASET_REPO}" in metadata
    assert "library_name: transformers" in metadata and "- lora" in metadata
    assert "![train and eval loss](loss.png)" in card
    assert f"| test | {result['test_loss']:.4f} |" in card
    assert "## Sample generations" in card and "**User:** What colour is the" in card

    # What a user downloads: a Llama that stops at <|eot_id|>, equal to base + adapter.
    pushed = last_json_line(run_python(CHECK_PUSHED_MODEL, hub_env, MODEL_REPO, BASE_REPO))
    assert pushed["architecture"] == ["LlamaForCausalLM"]
    assert pushed["dtype"] == "torch.float32"  # loaded as asked; stored in bf16
    assert pushed["eot"] in pushed["eos"], pushed
    assert pushed["tokenizer_eos"] == "<|eot_id|>"
    assert pushed["pad"] not in pushed["eos"] and pushed["tokenizer_pad"] != "<|eot_id|>"
    assert pushed["adapter_base"] == BASE_REPO
    assert pushed["merged_differs_from_base"]
    assert pushed["adapter_vs_merged_max_diff"] < 0.1, pushed  # bf16 storage of the merged weights
    assert pushed["stopped"], pushed

    # W&B: one offline run named after the run id, holding the losses the job printed.
    [run_file] = find_run_files(tmp_path / "wandb")
    run = read_run(run_file)
    assert run.name == "tiny-e2e" and run.run_id == "tiny-e2e" and run.project == "llama-trainer-tests"
    assert run.exit_code == 0
    assert run.config["learning_rate"] == 0.01 and run.config["backend"] == "cpu"
    logged = {row["train/global_step"]: row["train/loss"] for row in run.history if "train/loss" in row}
    assert sorted(logged) == list(range(1, MAX_STEPS + 1))
    for event in steps:
        assert logged[event["step"]] == pytest.approx(event["loss"], abs=1e-5)
    assert len(run.series("train/tokens_per_s")) == MAX_STEPS
    assert run.series("eval/loss")[-1] == pytest.approx(evals[-1]["eval_loss"], abs=1e-5)
    assert run.summary["test/loss"] == pytest.approx(result["test_loss"], abs=1e-5)


def test_a_missing_dataset_fails_before_training_and_says_so(fake_hub, hub_env, tmp_path):
    upload_base_and_chats(fake_hub, tmp_path)
    config = write_job_config(tmp_path, dataset="tester/no-such-chats", hub_repo=MODEL_REPO)
    env = {**hub_env, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}

    job = run_job(config, env, tmp_path)

    assert job.returncode == 2, job.stderr[-4000:]  # bad input, not a crash
    error = job.one("error")
    assert error["stage"] == "data" and "tester/no-such-chats" in error["message"]
    assert not job.of("step") and job.one("done")["status"] == "failed"
    result = json.loads((tmp_path / "outputs" / "result.json").read_text())
    assert (result["status"], result["stage"]) == ("failed", "data")
    assert "tester/no-such-chats" in result["error"]
    assert ("model", MODEL_REPO) not in fake_hub.repos  # nothing was pushed
