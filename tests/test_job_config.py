"""The job config file: defaults, derived values, and errors that name the file and the field."""

from __future__ import annotations

import json

import pytest

from trainjob.config import DEFAULT_TARGET_MODULES, JobConfig, JobConfigError, load_job_config


def write(tmp_path, data, name="job.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_minimal_config_gets_the_unsloth_recipe_defaults(tmp_path):
    config = load_job_config(write(tmp_path, {"run_id": "lt-1", "dataset": "me/chats"}))
    assert config.base_model == "unsloth/llama-3-8b-Instruct"
    assert config.merge_base_model == "unsloth/llama-3-8b-Instruct"
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (16, 16, 0.0)
    assert config.lora_target_modules == list(DEFAULT_TARGET_MODULES)
    assert (config.batch_size, config.gradient_accumulation_steps, config.learning_rate) == (2, 4, 2e-4)
    assert (config.warmup_steps, config.weight_decay, config.lr_scheduler, config.seed) == (5, 0.001, "linear", 3407)
    assert config.max_seq_length == 2048 and config.packing is True
    assert config.output_dir == "outputs/lt-1"
    assert config.wandb_project == "llama-trainer" and config.wandb_run_name == "lt-1"
    assert config.hub_repo is None and config.hub_private is True
    assert config.load_in_4bit is None and config.optim is None and config.export == []


def test_merge_base_drops_the_4bit_suffix(tmp_path):
    config = load_job_config(write(tmp_path, {
        "run_id": "r", "dataset": "d", "base_model": "unsloth/llama-3-8b-Instruct-bnb-4bit"}))
    assert config.merge_base_model == "unsloth/llama-3-8b-Instruct"


def test_every_field_round_trips_through_json(tmp_path):
    original = JobConfig(run_id="r", dataset="data/chats.jsonl", hub_repo="me/model", eval_steps=3,
                         export=["gguf-q8_0"], sample_prompts=["Hi"], load_in_4bit=False, optim="adamw_torch")
    again = load_job_config(write(tmp_path, original.to_dict()))
    assert again == original


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"run_id": "r", "dataset": "d", "learning_rte": 1e-4}, "unknown key 'learning_rte'; did you mean 'learning_rate'?"),
        ({"run_id": "r", "dataset": "d", "lora-r": 8}, "unknown key 'lora-r'; did you mean 'lora_r'?"),
        ({"run_id": "r", "dataset": "d", "zzz": 1}, "unknown key 'zzz'"),
        ({"dataset": "d"}, "'run_id' is required"),
        ({"run_id": "r"}, "'dataset' is required"),
        ({"run_id": "r", "dataset": "d", "batch_size": "2"}, "'batch_size' must be a whole number, got a string \"2\""),
        ({"run_id": "r", "dataset": "d", "batch_size": 0}, "'batch_size' must be at least 1, got 0"),
        ({"run_id": "r", "dataset": "d", "packing": 1}, "'packing' must be true or false"),
        ({"run_id": "r", "dataset": "d", "max_steps": True}, "'max_steps' must be a whole number, got true"),
        ({"run_id": "r", "dataset": "d", "max_steps": 0}, "'max_steps' must be a positive number of steps"),
        ({"run_id": "r", "dataset": "d", "learning_rate": 0}, "'learning_rate' must be greater than 0"),
        ({"run_id": "r", "dataset": "d", "chat_template": "llama-2"}, "'chat_template' must be one of auto, llama-3, llama-3.1"),
        ({"run_id": "r", "dataset": "d", "lora_r": None}, "'lora_r' cannot be null"),
        ({"run_id": "r", "dataset": "d", "hub_repo": "me/bad repo"}, "'hub_repo' must be a Hub repo id"),
        ({"run_id": "r", "dataset": "d", "export": ["onnx"]}, "'export': unknown format 'onnx'"),
        ({"run_id": "r", "dataset": "d", "lora_target_modules": []}, "'lora_target_modules' must name at least one"),
        ({"run_id": "a b", "dataset": "d"}, "'run_id' may hold only letters"),
        ({"run_id": "r", "dataset": "d", "merge_base_model": "x/y-bnb-4bit"}, "is a 4-bit checkpoint"),
    ],
)
def test_bad_values_are_named_with_the_file(tmp_path, data, expected):
    path = write(tmp_path, data)
    with pytest.raises(JobConfigError) as error:
        load_job_config(path)
    assert str(error.value).startswith(f"{path}: ")
    assert expected in str(error.value)


def test_broken_json_names_line_and_column(tmp_path):
    path = write(tmp_path, '{\n  "run_id": "r",\n  "dataset": "d",,\n}')
    with pytest.raises(JobConfigError, match=rf"^{path}:3:\d+: not valid JSON"):
        load_job_config(path)


def test_missing_file_and_non_object(tmp_path):
    with pytest.raises(JobConfigError, match="cannot read the job config"):
        load_job_config(tmp_path / "nope.json")
    with pytest.raises(JobConfigError, match="must be a JSON object of keys, not a list"):
        load_job_config(write(tmp_path, "[1, 2]"))
