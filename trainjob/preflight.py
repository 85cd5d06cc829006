"""Check a training job's data and template before any GPU time is spent, with the tokenizer only.

    python3 -m trainjob.preflight --config job.json
    python3 -m trainjob.preflight --dataset data/ --tokenizer meta-llama/Meta-Llama-3-8B-Instruct --max-seq-length 2048

Runs every check the job itself runs before training (schema, roles, turn order, the chat template,
`<|eot_id|>` as eos and inside the loss, pad != eos, lengths against max_seq_length, no example with
an empty loss), without loading model weights. Prints per-split counts, token statistics, the
number of tokens the loss trains on and one conversation with its trained span marked.

Exit status: 0 ready to train, 2 the data or settings can't train (each problem listed as
`path:line: field: message`). `--json` prints one JSON object instead (`"event": "preflight"`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

from trainjob.data import MAX_LISTED_PROBLEMS, Problem, format_problems, load_chats
from trainjob.template import (
    POLICIES,
    BuildStats,
    TemplateError,
    TemplateInfo,
    prepare_tokenizer,
    render_masked_sample,
    tokenize_split,
)

EXIT_OK = 0
EXIT_INVALID = 2


@dataclass
class PreflightReport:
    dataset: str
    tokenizer: str
    max_seq_length: int
    policy: str
    template: TemplateInfo | None = None
    files: dict[str, list[str]] = field(default_factory=dict)
    conversations: dict[str, int] = field(default_factory=dict)  # valid ones per split
    splits: dict[str, BuildStats] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    sample_where: str | None = None
    sample: str | None = None  # plain text, trained span in [[...]]
    sample_ansi: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def loss_tokens(self) -> int:
        train = self.splits.get("train")
        return train.loss_tokens if train else 0

    def to_dict(self) -> dict:
        template = self.template
        return {
            "event": "preflight",
            "ok": self.ok,
            "dataset": self.dataset,
            "tokenizer": self.tokenizer,
            "max_seq_length": self.max_seq_length,
            "long_conversations": self.policy,
            "template": None
            if template is None
            else {
                "family": template.family,
                "source": template.template_source,
                "bos_id": template.bos_id,
                "eos_id": template.eos_id,
                "pad_id": template.pad_id,
                "pad_token": template.pad_token,
            },
            "splits": {
                name: {**stats.as_dict(), "files": self.files.get(name, [])}
                for name, stats in self.splits.items()
            },
            "loss_tokens": self.loss_tokens,
            "problem_count": len(self.problems),
            "problems": [_problem_dict(p) for p in self.problems[:MAX_LISTED_PROBLEMS]],
            "warnings": [_problem_dict(w) for w in self.warnings[:MAX_LISTED_PROBLEMS]],
            "sample": None if self.sample is None else {"where": self.sample_where, "text": self.sample},
        }

    def format(self, color: bool = False) -> str:
        """The report for people: counts, token table, the sample, then warnings and problems."""
        lines = [f"Dataset: {self.dataset}"]
        for name, files in self.files.items():
            count = self.conversations.get(name, 0)
            lines.append(f"  {name:<11}{count:>6} conversations  {', '.join(files)}")
        if self.template:
            t = self.template
            source = (
                "the model's own template" if t.template_source == "tokenizer" else "the official template"
            )
            lines.append(
                f"Tokenizer: {self.tokenizer} ({t.family}, {source}; eos <|eot_id|> = {t.eos_id}, "
                f"pad {t.pad_token} = {t.pad_id})"
            )
        if self.splits:
            lines.append(
                f"Tokens (max_seq_length {self.max_seq_length:,}, long conversations: {self.policy}):"
            )
            lines.append(
                f"  {'split':<11}{'total':>9}{'mean':>8}{'max':>7}{'over max':>10}{'dropped':>9}{'kept':>7}"
                f"{'in loss':>9}"
            )
            for name, stats in self.splits.items():
                lines.append(
                    f"  {name:<11}{sum(stats.token_counts):>9,}{stats.mean_tokens:>8.1f}{stats.max_tokens:>7,}"
                    f"{stats.over_length:>10,}{len(stats.dropped):>9,}{stats.kept:>7,}{stats.loss_tokens:>9,}"
                )
            train = self.splits.get("train")
            if train and train.total_tokens:
                share = 100 * train.loss_tokens / train.total_tokens
                lines.append(
                    f"Training tokens in the loss: {train.loss_tokens:,} of {train.total_tokens:,} ({share:.1f}%)"
                )
        if self.sample is not None:
            marks = "green" if color else "[[...]]"
            lines.append(f"Sample ({self.sample_where}); the loss trains on the {marks} part:")
            lines.append(self.sample_ansi if color else self.sample)
        if self.warnings:
            lines.append(f"Warnings ({len(self.warnings)}):")
            lines.append(format_problems(self.warnings, 10))
        if self.ok:
            lines.append("OK: ready to train.")
        else:
            lines.append(f"{len(self.problems)} problem(s); fix them and run again:")
            lines.append(format_problems(self.problems))
        return "\n".join(lines)


def _problem_dict(problem: Problem) -> dict:
    return {
        "path": problem.path,
        "line": problem.line,
        "field": problem.field,
        "message": problem.message,
        "text": str(problem),
    }


def run_preflight(
    dataset: str,
    tokenizer_source,
    max_seq_length: int,
    policy: str = "drop",
    *,
    chat_template: str = "auto",
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | None = None,
) -> PreflightReport:
    """Every pre-training check on `dataset` with the tokenizer of `tokenizer_source` (a local dir,
    a Hub model id or a tokenizer object). Problems are collected in the report, never raised."""
    tokenizer_name = tokenizer_source if isinstance(tokenizer_source, str) else _name_of(tokenizer_source)
    report = PreflightReport(str(dataset), tokenizer_name, max_seq_length, policy)
    if policy not in POLICIES:
        report.problems.append(
            Problem(
                "job config", None, "long_conversations", f"{policy!r} is not one of {', '.join(POLICIES)}"
            )
        )
        return report

    chats = load_chats(
        dataset, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir, strict=False
    )
    report.files = dict(chats.files)
    report.conversations = {name: len(conversations) for name, conversations in chats.items()}
    report.problems.extend(chats.problems)
    report.warnings.extend(chats.warnings)
    if "train" in chats and "validation" not in chats:
        report.warnings.append(
            Problem(
                str(dataset),
                None,
                "validation",
                "no validation split: the job holds out a few train conversations to evaluate on",
            )
        )

    tokenizer = _load_tokenizer(tokenizer_source, token, report)
    if tokenizer is None:
        return report
    try:
        report.template = prepare_tokenizer(tokenizer, chat_template)
    except TemplateError as error:
        report.problems.append(Problem(tokenizer_name, None, "chat_template", str(error)))
        return report

    samples = []
    for name, conversations in chats.items():
        try:
            examples, stats, problems = tokenize_split(
                tokenizer, conversations, max_seq_length, policy, split=name
            )
        except TemplateError as error:
            report.problems.append(Problem(tokenizer_name, None, "chat_template", str(error)))
            return report
        report.splits[name] = stats
        report.problems.extend(problems)
        if name == "train":
            samples = examples
    _pick_sample(report, tokenizer, samples)
    return report


def _load_tokenizer(source, token, report: PreflightReport):
    if not isinstance(source, str):
        return source
    from transformers import AutoTokenizer

    try:
        # Tokenizer files only: no model weights are downloaded or read.
        return AutoTokenizer.from_pretrained(source, token=token)
    except Exception as error:  # transformers raises many kinds (OSError, ValueError, HTTP errors)
        report.problems.append(
            Problem(source, None, "base_model", f"can't load its tokenizer: {str(error).splitlines()[0]}")
        )
        return None


def _pick_sample(report: PreflightReport, tokenizer, examples: list[dict]) -> None:
    """Show a multi-turn example when there is one: it shows both kinds of turn boundary."""
    if not examples:
        return

    def turns(example):
        masks = example["assistant_masks"]
        return sum(1 for i, m in enumerate(masks) if m and (i == 0 or not masks[i - 1]))

    best = max(range(len(examples)), key=lambda i: (min(turns(examples[i]), 2), -i))
    example = examples[best]
    report.sample_where = example.get("where")
    report.sample = render_masked_sample(tokenizer, example, "plain")
    report.sample_ansi = render_masked_sample(tokenizer, example, "ansi")


def _name_of(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


# ---------------------------------------------------------------------------------------------
# Command line


def _settings_from_args(args) -> dict:
    """The job config's keys (trainjob.config), overridden by any flag given."""
    settings = {
        "dataset": None,
        "dataset_revision": None,
        "base_model": None,
        "chat_template": "auto",
        "max_seq_length": 2048,
        "long_conversations": "drop",
    }
    if args.config:
        from trainjob.config import load_job_config

        config = load_job_config(args.config)
        settings.update({key: getattr(config, key) for key in settings})
    overrides = {
        "dataset": args.dataset,
        "dataset_revision": args.revision,
        "base_model": args.tokenizer,
        "chat_template": args.chat_template,
        "max_seq_length": args.max_seq_length,
        "long_conversations": args.long_conversations,
    }
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m trainjob.preflight",
        description="Check a training job's data, chat template and lengths with the tokenizer only.",
    )
    parser.add_argument("--config", help="job config (JSON, trainjob.config keys)")
    parser.add_argument("--dataset", help="a .jsonl file, a directory or a Hub dataset repo id")
    parser.add_argument("--revision", help="dataset revision on the Hub")
    parser.add_argument(
        "--tokenizer", help="tokenizer directory or Hub model id (default: the config's base_model)"
    )
    parser.add_argument("--max-seq-length", type=int)
    parser.add_argument("--long-conversations", choices=POLICIES)
    parser.add_argument("--chat-template", choices=("auto", "llama-3", "llama-3.1"))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument(
        "--color", choices=("auto", "always", "never"), default="auto", help="mark the trained span in green"
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_from_args(args)
    except ValueError as error:  # JobConfigError: names the file and the key
        print(f"preflight: {error}", file=sys.stderr)
        return EXIT_INVALID
    missing = [
        flag for flag, key in (("--dataset", "dataset"), ("--tokenizer", "base_model")) if not settings[key]
    ]
    if missing:
        print(f"preflight: give {' and '.join(missing)} (or --config job.json)", file=sys.stderr)
        return EXIT_INVALID

    report = run_preflight(
        settings["dataset"],
        settings["base_model"],
        settings["max_seq_length"],
        settings["long_conversations"],
        chat_template=settings["chat_template"],
        revision=settings["dataset_revision"],
        token=os.environ.get("HF_TOKEN") or None,
    )
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        print(report.format(color=color))
    return EXIT_OK if report.ok else EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
