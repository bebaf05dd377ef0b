"""Convert between Hugging Face / GGUF models and our checkpoints, and cut a dense student from a parent.

    python tools/convert_checkpoint.py import  --input HF_DIR_OR_GGUF --output ckpt/teacher \\
        [--tensor-model-parallel-size T] [--pipeline-model-parallel-size P]
    python tools/convert_checkpoint.py export  --input ckpt/student --output hf/student
    python tools/convert_checkpoint.py extract --input ckpt/teacher --subnet best_subnet.json \\
        [--importance importance.safetensors] --output ckpt/student [--tensor-model-parallel-size T] \\
        [--pipeline-model-parallel-size P]
    python tools/convert_checkpoint.py reshard --input ckpt/teacher --output ckpt/teacher_tp4 \\
        --tensor-model-parallel-size 4 [--pipeline-model-parallel-size 2]
    python tools/convert_checkpoint.py universal --input runs/save [--iteration N] --output runs/save_universal

``import`` reads a Hugging Face directory (llama, mistral, qwen2, gpt_neox) or a ``.gguf`` file (through
transformers) and writes ``model_config.json`` + ``model.safetensors`` + the tokenizer's files.
``export`` writes a directory that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load.
``extract`` copies a sub-network's rows and columns into a dense student checkpoint, with the sub-network
saved beside it (``subnet.json``); the sub-network JSON holds explicit indices or counts (see
``SubnetConfig.from_dict``), counts taking the most important units when ``"order": "importance"``.
It reads only the student's rows and columns of the parent's file(s).

Our checkpoints are consolidated (``model.safetensors``) or split into tensor-parallel shards
(``mp_rank_00.safetensors`` ...) and pipeline stages (``mp_rank_TT_PPP.safetensors``: TP rank TT of stage
PPP, the layers split evenly over the stages, earlier stages taking one more when they do not divide);
every command reads any layout. ``--tensor-model-parallel-size T`` and ``--pipeline-model-parallel-size P``
make ``import``, ``extract`` and ``reshard`` write T x P files (1 x 1: consolidated); ``reshard`` turns a
checkpoint saved at any TP x PP layout into one at any other (the tensors are bit-identical; a size it is
not given keeps the input's). A layout the model cannot take (heads, query groups, MLP width or vocabulary
not divisible by T; more stages than layers) is refused, naming the flag and the sizes.

``universal`` turns a training checkpoint of ``pretrain_slm.py`` (``--save``; ZeRO stage 1-2) into DeepSpeed's
universal checkpoint (weights, Adam moments and step as whole tensors, with our metadata and RNG states), from
which ``pretrain_slm.py --load OUTPUT --universal-checkpoint`` resumes at any TP x PP x DP layout.

Every output directory is written under a hidden temporary name and renamed into place: a failure leaves
nothing behind, and the temporary directory of a killed run is removed by the next write of the same
output. An existing non-empty ``--output`` is replaced only with ``--overwrite``, and never when it is,
holds or lies inside an input. Errors are one line on stderr (``error: ...``) and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_subnet.cli import ArgumentParser, nonnegative_int, positive_int, run_main  # noqa: E402
from megatron_subnet.model.config import ConfigError, ModelConfig  # noqa: E402
from megatron_subnet.model.weights import CheckpointError  # noqa: E402
from megatron_subnet.outputs import check_output  # noqa: E402

DTYPES = ("keep", "float32", "bfloat16", "float16")


class ConvertError(ValueError):
    """A failure to report as one line (already names the file or flag)."""


def _context(flag: str, path: str | os.PathLike, error: Exception) -> ConvertError:
    """``error`` as a ConvertError whose message names ``path`` (prefixed with the flag when it does not)."""
    msg = " ".join(str(error).split("\n")).strip() or type(error).__name__
    if str(path) not in msg:
        msg = f"{flag} {path}: {msg}"
    return ConvertError(msg)


def _check_output(args: argparse.Namespace) -> None:
    """Where ``--output`` goes, checked before anything is loaded: a directory that may be (re)placed, holding
    and lying inside none of the inputs (``--overwrite`` replaces a non-empty one, never an input)."""
    inputs = {"--input": args.input, "--subnet": getattr(args, "subnet", None),
              "--importance": getattr(args, "importance", None)}
    check_output(args.output, "--output", "dir", args.overwrite, inputs=inputs)


def _cast(state: dict, dtype: str) -> dict:
    if dtype == "keep":
        return state
    import torch

    target = getattr(torch, dtype)
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def _describe(config: ModelConfig) -> str:
    heads = config.num_attention_heads
    groups = config.num_query_groups
    ffn = config.ffn_hidden_size
    return (
        f"{config.arch}, {config.num_layers} layers, hidden {config.hidden_size}, heads {heads}, "
        f"query groups {groups}, ffn {ffn}, vocab {config.vocab_size}, "
        f"{config.num_parameters() / 1e6:.2f}M parameters ({config.num_parameters():,})"
    )


def _layout(tp: int, pp: int = 1) -> str:
    if tp == pp == 1:
        return "consolidated"
    if pp == 1:
        return f"{tp} tensor-parallel shards"
    if tp == 1:
        return f"{pp} pipeline stages"
    return f"{tp} tensor-parallel shards x {pp} pipeline stages"


def _shards_note(size: int, stages: int = 1) -> str:
    return "" if size == stages == 1 else f" ({_layout(size, stages)})"


def _check_splits(config: ModelConfig, size: int, what: str, stages: int = 1) -> None:
    """ConvertError naming the dimension when ``config`` does not split into ``size`` tensor-parallel shards, or
    the flag and the sizes when it has fewer layers than ``stages`` pipeline stages."""
    from megatron_subnet.model.shapes import check_divisible
    from megatron_subnet.parallel.pipeline import split_layers

    try:
        check_divisible(config, size)
    except ValueError as e:
        raise ConvertError(f"--tensor-model-parallel-size {size}: {what} cannot be split: {e}") from None
    try:
        split_layers(config.num_layers, stages)
    except ValueError:
        raise ConvertError(f"--pipeline-model-parallel-size {stages}: {what} cannot be split: more stages than its "
                           f"{config.num_layers} layers") from None


def _tokenizer_note(directory: str | os.PathLike) -> str:
    from megatron_subnet.model.weights import TOKENIZER_FILES

    names = [n for n in TOKENIZER_FILES if (Path(directory) / n).is_file()]
    return f"tokenizer files: {', '.join(names)}" if names else "no tokenizer files (none found in the input)"


def _load_checkpoint(path: str):
    from megatron_subnet.model.weights import load_checkpoint

    if not Path(path).exists():
        raise ConvertError(f"--input {path}: no such directory")
    try:
        return load_checkpoint(path)
    except (CheckpointError, ConfigError, OSError) as e:
        raise _context("--input", path, e) from None


def cmd_import(args: argparse.Namespace) -> str:
    from megatron_subnet.model.hf import load_hf, save_gguf_tokenizer
    from megatron_subnet.model.weights import save_checkpoint

    src = Path(args.input)
    if not src.exists():
        raise ConvertError(f"--input {src}: no such file or directory")
    if src.is_file() and src.suffix != ".gguf":
        raise ConvertError(f"--input {src}: expected a Hugging Face model directory or a .gguf file")
    try:
        config, state = load_hf(src)
    except (CheckpointError, ConfigError, OSError) as e:
        raise _context("--input", src, e) from None
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    _check_splits(config, tp, f"--input {src}", pp)
    state = _cast(state, args.dtype)
    with tempfile.TemporaryDirectory(prefix="convert-tokenizer-") as tmp:
        if src.suffix == ".gguf":
            try:
                save_gguf_tokenizer(src, tmp)
            except (CheckpointError, OSError) as e:
                raise _context("--input", src, e) from None
            tokenizer_from = tmp
        else:
            tokenizer_from = src
        save_checkpoint(args.output, config, state, tokenizer_from=tokenizer_from, tensor_parallel_size=tp,
                        pipeline_parallel_size=pp)
    shards = _shards_note(tp, pp)
    return f"wrote checkpoint {args.output}{shards}: {_describe(config)}; {_tokenizer_note(args.output)}"


def cmd_export(args: argparse.Namespace) -> str:
    from megatron_subnet.model.hf import save_hf

    config, state = _load_checkpoint(args.input)
    state = _cast(state, args.dtype)
    try:
        save_hf(args.output, config, state, tokenizer_from=args.input)
    except ConfigError as e:
        raise _context("--input", args.input, e) from None
    return f"wrote Hugging Face model {args.output}: {_describe(config)}; {_tokenizer_note(args.output)}"


def _load_importance(path: str, parent: ModelConfig):
    try:
        from megatron_subnet.model.importance import load_importance
    except ImportError:
        raise ConvertError(f"--importance {path}: importance scores are not supported in this build") from None
    if not Path(path).is_file():
        raise ConvertError(f"--importance {path}: no such file")
    try:
        return load_importance(path, parent=parent)
    except (ValueError, OSError) as e:
        raise _context("--importance", path, e) from None


def _open_checkpoint(path: str):
    """A CheckpointReader on ``--input`` (consolidated or sharded); ConvertError naming it otherwise."""
    from megatron_subnet.model.weights import CheckpointReader

    if not Path(path).exists():
        raise ConvertError(f"--input {path}: no such directory")
    try:
        return CheckpointReader(path)
    except (CheckpointError, ConfigError, OSError) as e:
        raise _context("--input", path, e) from None


def cmd_extract(args: argparse.Namespace) -> str:
    from megatron_subnet.model.extract import extract_shard
    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.model.weights import save_checkpoint
    from megatron_subnet.parallel.layers import WHOLE

    if not Path(args.subnet).is_file():
        raise ConvertError(f"--subnet {args.subnet}: no such file")
    with _open_checkpoint(args.input) as reader:
        parent = reader.config
        importance = _load_importance(args.importance, parent) if args.importance else None
        try:
            subnet = SubnetConfig.load(args.subnet, parent, importance)
            student = subnet.student_config(parent)
        except ConfigError as e:
            raise _context("--subnet", args.subnet, e) from None
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        _check_splits(student, tp, f"the student of --subnet {args.subnet}", pp)
        try:  # only the student's rows and columns are read
            _, student_state = extract_shard(parent, reader.read, subnet, WHOLE)
        except (CheckpointError, OSError) as e:
            raise _context("--input", args.input, e) from None
    student_state = _cast(student_state, args.dtype)
    save_checkpoint(args.output, student, student_state, tokenizer_from=args.input, subnet=subnet.to_dict(),
                    tensor_parallel_size=tp, pipeline_parallel_size=pp)
    share = student.num_parameters() / parent.num_parameters()
    shards = _shards_note(tp, pp)
    return (f"wrote student checkpoint {args.output}{shards}: {_describe(student)}; "
            f"{100 * share:.1f}% of the parent's")


def cmd_reshard(args: argparse.Namespace) -> str:
    import json

    from megatron_subnet.model.weights import SUBNET_NAME, save_checkpoint

    with _open_checkpoint(args.input) as reader:
        config, saved_at = reader.config, (reader.tp_size, reader.pp_size)
        # a size not given keeps the input's
        size = args.tensor_model_parallel_size or reader.tp_size
        stages = args.pipeline_model_parallel_size or reader.pp_size
        _check_splits(config, size, f"--input {args.input}", stages)
        try:
            state = reader.read_all()
        except (CheckpointError, OSError) as e:
            raise _context("--input", args.input, e) from None
    subnet = None
    subnet_file = Path(args.input) / SUBNET_NAME
    if subnet_file.is_file():  # the sub-network a student was cut by travels with it
        try:
            subnet = json.loads(subnet_file.read_text())
        except (OSError, ValueError) as e:
            raise _context("--input", subnet_file, e) from None
    state = _cast(state, args.dtype)
    save_checkpoint(args.output, config, state, tokenizer_from=args.input, subnet=subnet, tensor_parallel_size=size,
                    pipeline_parallel_size=stages)
    return f"wrote checkpoint {args.output} ({_layout(*saved_at)} -> {_layout(size, stages)}): {_describe(config)}"


def cmd_universal(args: argparse.Namespace) -> str:
    from megatron_subnet.training.universal import convert

    return convert(args.input, args.iteration, args.output, args.workers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{import,export,extract,reshard,universal}")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--output", required=True, help="output directory (written atomically)")
        sp.add_argument("--overwrite", action="store_true", help="replace --output when it exists and is not empty")
        sp.add_argument("--dtype", choices=DTYPES, default="keep", help="cast floating-point weights (default: keep)")

    def shards(sp: argparse.ArgumentParser, keep: bool = False) -> None:
        """``keep`` (reshard): an omitted size keeps the input's."""
        default = "the input's" if keep else "1"
        sp.add_argument("--tensor-model-parallel-size", type=positive_int, default=None if keep else 1,
                        help="write this many tensor-parallel shards (mp_rank_TT[_PPP].safetensors; "
                        f"default: {default})")
        sp.add_argument("--pipeline-model-parallel-size", type=positive_int, default=None if keep else 1,
                        help="split the layers evenly over this many pipeline stages (mp_rank_TT_PPP.safetensors; "
                        f"default: {default}; 1 x 1: model.safetensors)")

    sp = sub.add_parser("import", help="Hugging Face directory or .gguf file -> our checkpoint")
    sp.add_argument("--input", required=True, help="Hugging Face model directory or .gguf file")
    common(sp)
    shards(sp)
    sp.set_defaults(func=cmd_import)

    sp = sub.add_parser("export", help="our checkpoint -> Hugging Face directory (safetensors)")
    sp.add_argument("--input", required=True, help="checkpoint directory (consolidated or any TP x PP shards)")
    common(sp)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("extract", help="parent checkpoint + sub-network -> dense student checkpoint")
    sp.add_argument("--input", required=True, help="parent checkpoint directory (consolidated or shards)")
    sp.add_argument("--subnet", required=True, help="sub-network JSON (explicit indices, or counts)")
    sp.add_argument("--importance", help="importance scores (tools/compute_importance.py) for 'order': 'importance'")
    common(sp)
    shards(sp)
    sp.set_defaults(func=cmd_extract)

    sp = sub.add_parser("reshard", help="our checkpoint at any TP x PP layout -> the same at another")
    sp.add_argument("--input", required=True, help="checkpoint directory (consolidated or any TP x PP shards)")
    common(sp)
    shards(sp, keep=True)
    sp.set_defaults(func=cmd_reshard)
    sp = sub.add_parser("universal", help="pretrain_slm.py's checkpoint -> DeepSpeed universal checkpoint")
    sp.add_argument("--input", required=True, help="pretrain_slm.py's --save directory")
    sp.add_argument("--iteration", type=nonnegative_int, help="the checkpoint to convert (default: its 'latest')")
    sp.add_argument("--output", required=True, help="output directory (written atomically)")
    sp.add_argument("--overwrite", action="store_true", help="replace --output when it exists and is not empty")
    sp.add_argument("--workers", type=positive_int, default=1, help="processes of DeepSpeed's converter")
    sp.set_defaults(func=cmd_universal)
    args = p.parse_args(argv)
    if args.command == "reshard" and args.tensor_model_parallel_size is args.pipeline_model_parallel_size is None:
        sp.error("give --tensor-model-parallel-size and/or --pipeline-model-parallel-size (a size not given keeps "
                 "the input's)")
    return args


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    _check_output(args)  # before anything is loaded
    print(args.func(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Errors are one ``error:`` line and exit code 2 (bad flags too)."""
    return run_main(_main, argv, error_code=2)


if __name__ == "__main__":
    sys.exit(main())
