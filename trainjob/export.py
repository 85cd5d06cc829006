"""The export stage: a merged model becomes GGUF files plus an Ollama Modelfile.

    python3 -m trainjob.export --model outputs/merged --out outputs/gguf --formats gguf-q8_0,gguf-f16

writes `<name>-q8_0.gguf`, `<name>-f16.gguf`, a `Modelfile` for the first format (and
`Modelfile.<type>` for each other one), then prints the files and the `ollama` commands to use them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainjob.gguf_vocab import UnsupportedModelError, read_llama3_vocab
from trainjob.gguf_writer import QUANT_TYPES, read_llama_shape, write_gguf
from trainjob.modelfile import ollama_commands, ollama_model_name, write_modelfile

FORMAT_PREFIX = "gguf-"
FORMATS = tuple(FORMAT_PREFIX + q for q in QUANT_TYPES)

__all__ = ["FORMATS", "UnsupportedModelError", "export_model", "parse_formats"]


def parse_formats(formats) -> list[str]:
    """Check export format names ("gguf-q8_0", ...) and return the GGUF types, in order, once each."""
    if isinstance(formats, str):
        formats = formats.split(",")
    quants: list[str] = []
    for raw in formats:
        fmt = raw.strip().lower()
        if fmt not in FORMATS:
            raise ValueError(f"unknown export format {raw!r}; choose from {', '.join(FORMATS)}")
        if fmt[len(FORMAT_PREFIX) :] not in quants:
            quants.append(fmt[len(FORMAT_PREFIX) :])
    if not quants:
        raise ValueError(f"no export format given; choose from {', '.join(FORMATS)}")
    return quants


def export_model(merged_dir, out_dir, formats: list[str], model_name: str | None = None) -> list[Path]:
    """Write one GGUF per format and a Modelfile for each into `out_dir`; return the written paths
    (the GGUF files in `formats` order, then the Modelfiles, `Modelfile` first).

    Raises UnsupportedModelError, before writing anything, for a model the GGUF would not reproduce.
    """
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    quants = parse_formats(formats)
    name = ollama_model_name(model_name or merged_dir.name)
    # Check the whole checkpoint first: no partial export of a model that cannot be converted.
    shape = read_llama_shape(merged_dir)
    vocab = read_llama3_vocab(merged_dir, shape.vocab_size)

    out_dir.mkdir(parents=True, exist_ok=True)
    ggufs = [write_gguf(merged_dir, out_dir / f"{name}-{q}.gguf", q, name=name) for q in quants]
    llama31 = vocab.eom_id is not None
    modelfiles = [
        # The first format is the one `ollama create NAME -f Modelfile` uses.
        write_modelfile(
            out_dir, gguf_path, context_length=shape.context, llama31=llama31,
            filename="Modelfile" if i == 0 else f"Modelfile.{quant}",
        )
        for i, (gguf_path, quant) in enumerate(zip(ggufs, quants, strict=True))
    ]  # fmt: skip
    return [*ggufs, *modelfiles]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m trainjob.export",
        description="Export a merged Llama 3 model as GGUF + Ollama Modelfile.",
    )
    parser.add_argument("--model", required=True, help="merged model directory (config.json, *.safetensors)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--formats",
        default="gguf-q8_0",
        help=f"comma-separated, first is Ollama's (default gguf-q8_0): {','.join(FORMATS)}",
    )
    parser.add_argument(
        "--name", help="model name for the files and `ollama create` (default: the model directory's name)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)

    try:
        paths = export_model(args.model, args.out, args.formats.split(","), args.name)
    except (UnsupportedModelError, ValueError, FileNotFoundError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    name = ollama_model_name(args.name or Path(args.model).name)
    commands = ollama_commands(args.out, name)
    if args.json:
        print(
            json.dumps({"files": [str(p) for p in paths], "ollama_name": name, "ollama_commands": commands})
        )
    else:
        for path in paths:
            print(path)
        print("\nLoad and chat with it in Ollama:")
        for command in commands:
            print(f"  {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
