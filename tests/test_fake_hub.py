"""The real huggingface_hub / datasets / transformers clients push to and pull from the fake Hub.

Client code runs in subprocesses: the clients read HF_ENDPOINT when they are imported.
"""

import http.client
import json
import os
from urllib.parse import urlsplit

import pytest

from tests.hub_support import (  # noqa: F401  (the *_fixture imports register fixtures)
    HUB_TOKEN,
    client_env,
    fake_hub_fixture,
    hub_env_fixture,
    hub_process,
    inject_failure,
    last_json_line,
    run_python,
)
from trainjob.tiny import write_tiny_base_model

CHECKPOINT_STATE = {"global_step": 20, "epoch": 1.0, "log_history": [{"loss": 2.5, "step": 10}]}


def _request(hub, method, path, headers=None):
    """One raw HTTP request (no redirects followed): (status, headers, body)."""
    split = urlsplit(hub.url)
    conn = http.client.HTTPConnection(split.hostname, split.port, timeout=10)
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, response.headers, body


def test_tiny_model_round_trips_through_a_private_repo(fake_hub, hub_env, tmp_path):
    model_dir = write_tiny_base_model(tmp_path / "model")
    result = last_json_line(run_python(
        """
        import json, os, sys
        from huggingface_hub import HfApi, snapshot_download
        from transformers import AutoModelForCausalLM, AutoTokenizer

        api = HfApi()
        api.create_repo("tester/tiny-llama", private=True)
        commit = api.upload_folder(folder_path=sys.argv[1], repo_id="tester/tiny-llama",
                                   commit_message="Add tiny model")
        snapshot = snapshot_download("tester/tiny-llama")

        tokenizer = AutoTokenizer.from_pretrained("tester/tiny-llama")
        model = AutoModelForCausalLM.from_pretrained("tester/tiny-llama")
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        try:
            AutoTokenizer.from_pretrained("tester/tiny-llama", token=False, force_download=True)
            anonymous = "loaded"
        except OSError as error:
            anonymous = type(error).__name__
        print(json.dumps({"commit": commit.oid, "snapshot_files": sorted(os.listdir(snapshot)),
                          "new_tokens": generated.shape[1] - inputs["input_ids"].shape[1],
                          "eos": tokenizer.eos_token, "anonymous": anonymous}))
        """,
        hub_env, model_dir,
    ))

    repo = fake_hub.repos[("model", "tester/tiny-llama")]
    assert repo.private
    assert result["commit"] == repo.branches["main"]
    assert [c.title for c in fake_hub.commits("tester/tiny-llama")] == ["Add tiny model", "initial commit"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(
        result["snapshot_files"])
    assert result["new_tokens"] == 3
    assert result["eos"] == "<|eot_id|>"
    assert result["anonymous"] == "OSError"  # private: no token, no model
    # Weights went through LFS (batch + presigned PUT) and came back from the redirect target.
    assert repo.head().files["model.safetensors"].lfs
    assert fake_hub.requests_to("lfs_upload") and fake_hub.requests_to("cdn")
    pushed = fake_hub.checkout_dir("tester/tiny-llama") / "model.safetensors"
    assert pushed.read_bytes() == (model_dir / "model.safetensors").read_bytes()


def test_create_repo_twice(fake_hub, hub_env):
    result = last_json_line(run_python(
        """
        import json
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi()
        first = api.create_repo("tester/twice")
        again = api.create_repo("tester/twice", exist_ok=True)
        try:
            api.create_repo("tester/twice")
            status = None
        except HfHubHTTPError as error:
            status = error.response.status_code
        bare = api.create_repo("no-namespace", repo_type="dataset", private=True)
        print(json.dumps({"first": str(first), "again": str(again), "status": status, "bare": bare.repo_id}))
        """,
        hub_env,
    ))
    assert result["first"] == result["again"] == f"{fake_hub.url}/tester/twice"
    assert result["status"] == 409
    assert result["bare"] == "tester/no-namespace"
    assert fake_hub.repos[("dataset", "tester/no-namespace")].private
    assert not fake_hub.repos[("model", "tester/twice")].private
    assert len(fake_hub.commits("tester/twice")) == 1


def test_dataset_repo_loads_its_three_splits(fake_hub, hub_env, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, rows in (("train", 5), ("validation", 2), ("test", 3)):
        lines = [json.dumps({"chats": [{"role": "user", "content": f"{split} question {i}"},
                                       {"role": "assistant", "content": f"answer {i}"}]}) for i in range(rows)]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    fake_hub.tree_page_size = 2  # make the listing paginate

    result = last_json_line(run_python(
        """
        import json, sys
        import datasets
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo("tester/chats", repo_type="dataset", private=True)
        api.upload_folder(folder_path=sys.argv[1], repo_id="tester/chats", repo_type="dataset",
                          commit_message="Add splits")
        loaded = datasets.load_dataset("tester/chats")
        print(json.dumps({"rows": {name: split.num_rows for name, split in loaded.items()},
                          "first": loaded["validation"][0]["chats"][0]["content"]}))
        """,
        hub_env, data,
    ))

    assert result["rows"] == {"train": 5, "validation": 2, "test": 3}
    assert result["first"] == "validation question 0"
    assert any("cursor=" in r.path for r in fake_hub.requests_to("tree"))
    assert fake_hub.list_files("tester/chats", repo_type="dataset") == [
        ".gitattributes", "test.jsonl", "train.jsonl", "validation.jsonl"]


def test_checkpoint_subfolder_download_and_listings(fake_hub, hub_env):
    fake_hub.add_repo("tester/run", {
        "README.md": "---\nlicense: llama3\n---\n# run\n",
        "adapter/adapter_config.json": json.dumps({"r": 16}),
        "last-checkpoint/trainer_state.json": json.dumps(CHECKPOINT_STATE),
        "last-checkpoint/optimizer.pt": b"\x00\x01binary optimizer state",
    })
    result = last_json_line(run_python(
        """
        import json, os
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.errors import (EntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)

        api = HfApi()
        state_path = hf_hub_download("tester/run", "last-checkpoint/trainer_state.json")
        resume = snapshot_download("tester/run", allow_patterns=["last-checkpoint/*"])
        top = {e.path: type(e).__name__ for e in api.list_repo_tree("tester/run")}
        everything = sorted(e.path for e in api.list_repo_tree("tester/run", recursive=True)
                            if type(e).__name__ == "RepoFile")
        inside = sorted(e.path for e in api.list_repo_tree("tester/run", path_in_repo="last-checkpoint"))
        lfs = {e.path: e.lfs is not None for e in api.list_repo_tree("tester/run", recursive=True)
               if type(e).__name__ == "RepoFile"}
        errors = {}
        for name, call in {
            "missing_file": lambda: hf_hub_download("tester/run", "last-checkpoint/nope.json"),
            "missing_repo": lambda: api.model_info("tester/absent"),
            "missing_revision": lambda: api.model_info("tester/run", revision="no-such-branch"),
        }.items():
            try:
                call()
                errors[name] = None
            except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as error:
                errors[name] = type(error).__name__
        print(json.dumps({"state": json.load(open(state_path)), "resume": sorted(os.listdir(
            os.path.join(resume, "last-checkpoint"))), "top_level": sorted(os.listdir(resume)), "top": top,
            "everything": everything, "inside": inside, "lfs": lfs, "errors": errors}))
        """,
        hub_env,
    ))
    assert result["state"] == CHECKPOINT_STATE
    assert result["resume"] == ["optimizer.pt", "trainer_state.json"]
    assert result["top_level"] == ["last-checkpoint"]
    assert result["top"] == {"adapter": "RepoFolder", "last-checkpoint": "RepoFolder",
                             ".gitattributes": "RepoFile", "README.md": "RepoFile"}
    assert result["everything"] == [".gitattributes", "README.md", "adapter/adapter_config.json",
                                    "last-checkpoint/optimizer.pt", "last-checkpoint/trainer_state.json"]
    assert result["inside"] == ["last-checkpoint/optimizer.pt", "last-checkpoint/trainer_state.json"]
    assert result["lfs"]["last-checkpoint/optimizer.pt"] and not result["lfs"]["README.md"]
    assert result["errors"] == {"missing_file": "RemoteEntryNotFoundError", "missing_repo": "RepositoryNotFoundError",
                                "missing_revision": "RevisionNotFoundError"}


def test_writes_need_the_right_token(fake_hub, hub_env):
    fake_hub.add_repo("tester/guarded", {"config.json": "{}"})
    result = last_json_line(run_python(
        """
        import json
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        outcomes = {}
        for label, token in (("wrong", "hf_wrong_token"), ("none", False)):
            api = HfApi(token=token)
            for name, call in {
                "create": lambda: api.create_repo("tester/new-repo"),
                "upload": lambda: api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt",
                                                  repo_id="tester/guarded"),
            }.items():
                try:
                    call()
                    outcomes[f"{label}_{name}"] = "ok"
                except HfHubHTTPError as error:
                    outcomes[f"{label}_{name}"] = error.response.status_code
        print(json.dumps(outcomes))
        """,
        hub_env,
    ))
    assert result == {"wrong_create": 401, "wrong_upload": 401, "none_create": 401, "none_upload": 401}
    assert ("model", "tester/new-repo") not in fake_hub.repos
    assert fake_hub.list_files("tester/guarded") == [".gitattributes", "config.json"]


def test_injected_server_errors(fake_hub, hub_env):
    fake_hub.add_repo("tester/flaky", {"config.json": "{}"})
    fake_hub.fail_next("commit", 504)
    fake_hub.fail_next("preupload", 503)  # the client retries preupload itself
    result = last_json_line(run_python(
        """
        import json
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError

        api = HfApi()
        def push(content):
            return api.upload_file(path_or_fileobj=content, path_in_repo="notes.txt", repo_id="tester/flaky")
        try:
            push(b"first try")
            first = "ok"
        except HfHubHTTPError as error:
            first = error.response.status_code
        second = push(b"second try").oid
        print(json.dumps({"first": first, "second": second}))
        """,
        hub_env,
    ))
    assert result["first"] == 504
    assert result["second"] == fake_hub.repos[("model", "tester/flaky")].branches["main"]
    assert fake_hub.read_file("tester/flaky", "notes.txt") == b"second try"
    assert [r.status for r in fake_hub.requests_to("commit")] == [504, 200]
    assert [r.status for r in fake_hub.requests_to("preupload")][:2] == [503, 200]


def test_resolve_headers_ranges_and_errors(fake_hub):
    fake_hub.add_repo("tester/raw", {"config.json": "0123456789", "model.safetensors": b"\x00" * 64})
    fake_hub.add_repo("tester/secret", {"config.json": "{}"}, private=True)
    sha = fake_hub.repos[("model", "tester/raw")].branches["main"]

    status, headers, _ = _request(fake_hub, "HEAD", "/tester/raw/resolve/main/config.json")
    assert (status, headers["X-Repo-Commit"], headers["Content-Length"]) == (200, sha, "10")
    assert headers["ETag"].strip('"') == fake_hub.repos[("model", "tester/raw")].head().files["config.json"].git_oid

    status, headers, body = _request(fake_hub, "GET", f"/tester/raw/resolve/{sha}/config.json",
                                     {"Range": "bytes=2-5"})
    assert (status, body, headers["Content-Range"]) == (206, b"2345", "bytes 2-5/10")
    status, _, _ = _request(fake_hub, "GET", "/tester/raw/resolve/main/config.json", {"Range": "bytes=10-"})
    assert status == 416

    status, headers, _ = _request(fake_hub, "HEAD", "/tester/raw/resolve/main/model.safetensors")
    assert status == 302 and headers["X-Linked-Size"] == "64"
    assert headers["Location"].startswith(f"http://localhost:{fake_hub.port}/")

    status, headers, _ = _request(fake_hub, "HEAD", "/tester/raw/resolve/main/absent.json")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound", sha)
    status, headers, _ = _request(fake_hub, "GET", "/api/models/tester/secret")
    assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")
    status, _, body = _request(fake_hub, "GET", "/api/models/tester/secret",
                               {"Authorization": f"Bearer {HUB_TOKEN}"})
    assert status == 200 and json.loads(body)["private"] is True


def test_hub_as_a_process_keeps_pushes_on_disk(tmp_path):
    with hub_process(tmp_path / "hub") as (url, root):
        inject_failure(url, "commit", 500)
        env = {**os.environ, **client_env(url, tmp_path / "hf-home")}
        result = last_json_line(run_python(
            """
            import json
            from huggingface_hub import HfApi
            from huggingface_hub.errors import HfHubHTTPError

            api = HfApi()
            api.create_repo("tester/from-process")
            card = b"---\\nlicense: llama3\\nbase_model: meta-llama/Meta-Llama-3-8B-Instruct\\n---\\n# Model\\n"
            outcomes = []
            for _ in range(2):
                try:
                    api.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id="tester/from-process")
                    outcomes.append("ok")
                except HfHubHTTPError as error:
                    outcomes.append(error.response.status_code)
            try:
                api.upload_file(path_or_fileobj=b"---\\n[broken\\n---\\n", path_in_repo="README.md",
                                repo_id="tester/from-process")
                outcomes.append("ok")
            except ValueError as error:
                outcomes.append("invalid card" if "Invalid metadata" in str(error) else str(error))
            print(json.dumps(outcomes))
            """,
            env,
        ))
        assert result == [500, "ok", "invalid card"]
        pushed = root / "checkouts" / "models" / "tester" / "from-process" / "README.md"
        assert "base_model: meta-llama/Meta-Llama-3-8B-Instruct" in pushed.read_text()


def test_fail_next_rejects_an_unknown_route(fake_hub):
    with pytest.raises(ValueError, match="unknown route"):
        fake_hub.fail_next("comit", 500)


@pytest.mark.slow
def test_trainer_checkpoint_pushes_resume_from_the_hub(fake_hub, hub_env, tmp_path):
    fake_hub.add_repo("meta-llama/Meta-Llama-3-8B-Instruct", write_tiny_base_model(tmp_path / "base"))
    result = last_json_line(run_python(
        """
        import json, os, sys
        from datasets import Dataset
        from huggingface_hub import snapshot_download
        from peft import LoraConfig, get_peft_model
        from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer,
                                  TrainingArguments)

        base = "meta-llama/Meta-Llama-3-8B-Instruct"
        tokenizer = AutoTokenizer.from_pretrained(base)
        data = Dataset.from_dict({"text": ["the quick brown fox jumps over the lazy dog"] * 8})
        data = data.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])

        def trainer(max_steps, output_dir):
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                   LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
            args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, save_steps=1,
                                     per_device_train_batch_size=4, report_to="none", use_cpu=True,
                                     push_to_hub=True, hub_model_id="tester/ft", hub_strategy="checkpoint",
                                     hub_private_repo=True,
                                     # otherwise a save during a running push is not pushed at all
                                     hub_always_push=True)
            return Trainer(model=model, args=args, train_dataset=data,
                           data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))

        first = trainer(2, os.path.join(sys.argv[1], "first"))
        first.train()
        first.push_to_hub()
        # A new machine: only the Hub has the checkpoint.
        kept = snapshot_download("tester/ft", allow_patterns=["last-checkpoint/*"])
        second = trainer(3, os.path.join(sys.argv[1], "second"))
        second.train(resume_from_checkpoint=os.path.join(kept, "last-checkpoint"))
        second.push_to_hub()  # waits for the checkpoint pushes still running
        print(json.dumps({"resumed_at": json.load(open(os.path.join(kept, "last-checkpoint", "trainer_state.json")))
                          ["global_step"], "final_step": second.state.global_step}))
        """,
        hub_env, tmp_path / "runs", timeout=300,
    ))
    assert result == {"resumed_at": 2, "final_step": 3}
    files = fake_hub.list_files("tester/ft")
    assert {"adapter_model.safetensors", "last-checkpoint/optimizer.pt", "last-checkpoint/trainer_state.json"} <= set(
        files)
    assert fake_hub.repos[("model", "tester/ft")].private
    state = json.loads(fake_hub.read_file("tester/ft", "last-checkpoint/trainer_state.json"))
    assert state["global_step"] == 3
