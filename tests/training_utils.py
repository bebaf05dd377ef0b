"""Helpers for tests/test_training.py: a tiny teacher/sub-network/dataset workspace, launcher command lines,
subprocess runs that cannot hang, metrics readers, and (run as a script) an instrumented ``pretrain_slm.py``.

Run as ``python tests/training_utils.py <pretrain_slm.py flags>`` (directly, under torchrun or mpirun) this
file is ``pretrain_slm.py`` plus test hooks chosen by the JSON in ``$MEGATRON_SUBNET_TEST_HOOKS``: faults are
injected into the components they break, everything else is observed through a trainer ``Callback``:

``record_dir``      each rank appends ``{"iteration", "batch"}`` (a hash of its micro-batches) per step
``nan_steps``       iterations whose student forward returns NaN logits (``nan_from``: that one and all later;
                    ``nan_ranks``: only on these ranks)
``nan_loss_steps``  iterations whose loss value is NaN while its gradient stays finite (``nan_ranks`` applies)
``param_trace``     per step: did the student's parameters / Adam step count change (bit-exact), are they finite
``stop_after_save`` the job ends (exit 0) right after the checkpoint of that iteration is complete
``kill_before_rename`` rank 0 is SIGKILLed after every rank wrote that iteration's checkpoint, before its rename
``kill_in_step``    ``{"iteration": k, "rank": r}``: rank r is SIGKILLed in the middle of step k (after its first
                    micro-batch's forward), the other ranks left waiting on it
``state_dump``      after training, every rank saves its student module's tensors (its TP shard of its pipeline
                    stage) to ``state_dump/rank_R.safetensors``
``device_trace``    each rank writes, in order, where the student was moved (``to``; the run's device, on a
                    CPU, is spelled ``cpu:0``), the device of every tensor broadcast before training and the
                    engine's device, to ``device_trace/rank_R.json``
``tied_trace``      after every step, each stage holding a copy of the tied embedding (the first and the
                    last) appends a hash of its shard and the copy's dtype to ``tied_trace/rank_R.jsonl``
``callback_log``    rank 0 appends each trainer callback (``setup_end``, ``step_start``, ``step_end``,
                    ``evaluation``, ``checkpoint_saved``) with its iteration, in the order they came
``optimizer_dump``  after setup (a resumed run: what it loaded), every rank gathers each student parameter's
                    fp32 weight and Adam moments (DeepSpeed's ``safe_get_full_*``, collective over the
                    data-parallel group) and writes them with the Adam step to ``optimizer_dump/rank_R.safetensors``
``teacher_report``  after training: the teacher's tensors vs its safetensors file, and that none of them is
                    a student parameter, in the optimizer, trainable, or has a gradient
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRETRAIN = REPO / "pretrain_slm.py"
WRAPPER = Path(__file__).resolve()
EXAMPLES = REPO / "examples"
HOOKS_ENV = "MEGATRON_SUBNET_TEST_HOOKS"

# The tiny run every test shares: 4 micro-batches of 33 tokens per step.
MICRO, GLOBAL, SEQ = 1, 4, 32


# ----------------------------------------------------------------------------- workspace


def build_workspace(root: Path) -> Path:
    """Teacher checkpoint, sub-network JSONs, a student ModelConfig, ds_configs and an indexed dataset."""
    import numpy as np
    import torch

    from megatron_subnet.data.indexed import IndexedDatasetBuilder
    from megatron_subnet.model.config import ModelConfig
    from megatron_subnet.model.gpt import GPTModel
    from megatron_subnet.model.subnet import SubnetConfig
    from megatron_subnet.model.weights import save_checkpoint
    from tests.tiny_models import tiny

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = ModelConfig(**tiny(
        "llama", vocab_size=128, hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2,
        head_dim=16, ffn_hidden_size=128, tie_word_embeddings=True,
    ))
    save_checkpoint(root / "teacher", config, GPTModel(config).state_dict())
    subnet = SubnetConfig.from_counts(
        config, num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=64
    )
    subnet.save(root / "subnet.json")
    SubnetConfig.full(config).save(root / "full_subnet.json")
    # a student that splits over 2 tensor-parallel ranks: 2 query groups of 1 head, MLP 64, vocab 128
    SubnetConfig.from_counts(
        config, num_layers=2, hidden_size=32, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=64
    ).save(root / "subnet_tp2.json")
    subnet.student_config(config).save(root / "student_config.json")
    rng = np.random.default_rng(0)
    with IndexedDatasetBuilder(root / "data", np.uint16) as builder:
        for _ in range(300):
            builder.add_document(rng.integers(0, 127, rng.integers(5, 100)))
    for stage in range(4):
        ds_config = {"zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "bf16": {"enabled": False}}
        (root / f"zero{stage}.json").write_text(json.dumps(ds_config))
    return root


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- running jobs


@dataclasses.dataclass
class Result:
    cmd: list[str]
    returncode: int | None  # None: killed on timeout
    stdout: str
    stderr: str
    seconds: float

    def tail(self, n: int = 40) -> str:
        lines = (self.stdout + "\n" + self.stderr).replace("\r", "\n").splitlines()
        lines = [line for line in lines if line.strip() and not line.startswith("training:")]
        return f"$ {' '.join(self.cmd)}\nexit {self.returncode} after {self.seconds:.0f}s\n" + "\n".join(lines[-n:])

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error: ")]


def torch_extensions_dir() -> str:
    """DeepSpeed JIT-builds its CPU shm comm op at every start, with ninja, into ``$TORCH_EXTENSIONS_DIR``
    (default ~/.cache/torch_extensions/py311_cpu, shared by every venv on the machine). A start whose ninja
    (pip's in the venv vs /usr/bin's: they hash command lines differently) or venv path differs from the
    last build's finds it stale and recompiles it: 20-80 s, under a lock that stalls every other starting
    process. Our jobs always run with this venv's bin first on PATH, and build into a directory of their own."""
    ninja = shutil.which("ninja", path=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]))
    digest = hashlib.sha1(f"{sys.prefix}:{ninja}".encode()).hexdigest()[:10]
    return str(Path.home() / ".cache" / "torch_extensions" / f"env-{digest}")


def base_env(extra: dict | None = None) -> dict[str, str]:
    """The environment of a launched job: one thread per process, this venv first on PATH, no inherited
    distributed/launcher variables, no test hooks unless asked for, a per-venv torch extensions dir."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
        and k != HOOKS_ENV
        and not k.startswith(("OMPI_", "PMIX_", "TORCHELASTIC_"))
    }
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
        MPLBACKEND="Agg",
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    env.update(extra or {})
    return env


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 180, hooks: dict | None = None) -> Result:
    """Run a job in its own session; on timeout the whole process group (launcher and workers) is killed."""
    extra = dict(env or {})
    if hooks is not None:
        extra[HOOKS_ENV] = json.dumps(hooks)
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd,
        env=base_env(extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
        out, err = "", ""
    finally:
        # Whatever the outcome, nothing of the job outlives it (torchrun's workers, mpirun's daemons).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if code is None:
            out, err = proc.communicate()
    return Result([str(c) for c in cmd], code, out, err, time.monotonic() - start)


def ok(result: Result) -> Result:
    """``result``, after asserting the job succeeded (its output's tail otherwise)."""
    assert result.returncode == 0, result.tail()
    return result


def assert_one_line_error(result: Result, *needles: str) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line on stderr that names every needle."""
    assert result.returncode == 2, result.tail()
    assert "Traceback" not in result.stderr, result.tail()
    lines = result.error_lines()
    assert len(lines) == 1, result.tail()
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def deepspeed_shm_files(port: int | str) -> list[Path]:
    """The /dev/shm buffers DeepSpeed's CPU shm all-reduce creates (and never removes) for a job on ``port``."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def run_many(jobs: list[tuple], workers: int = 2) -> list[Result]:
    """``run(*job)`` for each job, ``workers`` at a time (independent single-process jobs)."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: run(*job), jobs))


def python_cmd(args: list[str], script: Path = WRAPPER) -> list[str]:
    return [sys.executable, str(script), *args]


def torchrun_cmd(nproc: int, args: list[str], script: Path = WRAPPER) -> list[str]:
    # --standalone: c10d rendezvous on a free localhost port (`--master-port 0` hangs in torch 2.13).
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), str(script), *args]


def spawn_cmd(nproc: int, args: list[str], script: Path = WRAPPER) -> list[str]:
    """``nproc`` workers started by ``tests/spawn.py`` (torchrun's environment without torchrun's start-up):
    for the runs whose point is the numbers, not the launcher."""
    return [sys.executable, str(Path(__file__).with_name("spawn.py")), str(nproc), str(script), *args]


def launch_cmd(nproc: int, args: list[str], script: Path = WRAPPER) -> list[str]:
    return python_cmd(args, script) if nproc == 1 else spawn_cmd(nproc, args, script)


# ----------------------------------------------------------------------------- reading results


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_records(log_dir: Path) -> dict[int, dict]:
    """Training records of metrics.jsonl by iteration (the last one wins when a resumed run repeats one)."""
    return {r["iteration"]: r for r in read_jsonl(Path(log_dir) / "metrics.jsonl") if "loss" in r}


def batch_records(record_dir: Path) -> dict[int, dict[int, str]]:
    """``{rank: {iteration: hash of that rank's micro-batches}}`` written by the ``record_dir`` hook."""
    out: dict[int, dict[int, str]] = {}
    for path in sorted(Path(record_dir).glob("rank_*.jsonl")):
        rank = int(path.stem.split("_")[1])
        out[rank] = {r["iteration"]: r["batch"] for r in read_jsonl(path)}
    return out


def latest_tag(save: Path) -> str:
    return (Path(save) / "latest").read_text().strip()


# ----------------------------------------------------------------------------- hooks (script mode)


def _install_faults(hooks: dict, captured: dict) -> None:
    """The faults ``hooks`` asks for, injected into the components they break (the model's forward, the loss,
    a checkpoint's rename); ``captured["iteration"]`` is the step being taken."""
    import torch
    import torch.distributed as dist

    from megatron_subnet.model.gpt import GPTModel
    from megatron_subnet.parallel import distill_step
    from megatron_subnet.training import checkpoint

    def rank() -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    nan_steps, nan_from, nan_ranks = set(hooks.get("nan_steps", [])), hooks.get("nan_from"), hooks.get("nan_ranks")
    kill_in_step, kill = hooks.get("kill_in_step"), hooks.get("kill_before_rename")
    nan_loss_steps = set(hooks.get("nan_loss_steps", []))

    def nan_now() -> bool:
        it = captured["iteration"]
        if nan_ranks is not None and rank() not in nan_ranks:
            return False
        return it in nan_steps or (nan_from is not None and it >= nan_from)

    forward, loss_fn, publish = GPTModel.forward, distill_step.distillation_loss, checkpoint.publish

    def faulty_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        # Only the student's training forward: the teacher runs in eval mode, so does evaluation.
        dies = kill_in_step is not None and (kill_in_step["iteration"], kill_in_step["rank"]) == (
            captured["iteration"], rank()
        )
        if self.training and dies:
            os.kill(os.getpid(), signal.SIGKILL)
        return out * float("nan") if self.training and nan_now() else out

    def nan_valued_loss(*args, **kwargs):
        loss, ce, kl = loss_fn(*args, **kwargs)
        if captured["iteration"] in nan_loss_steps and (nan_ranks is None or rank() in nan_ranks):
            loss = loss + torch.tensor(float("nan"), device=loss.device)  # a constant: no gradient
        return loss, ce, kl

    def publish_hook(save, tmp_tag, tag):
        if tag == checkpoint.tag_for(kill):
            os.kill(os.getpid(), signal.SIGKILL)
        publish(save, tmp_tag, tag)

    if nan_steps or nan_from is not None or kill_in_step is not None:
        GPTModel.forward = faulty_forward
    if nan_loss_steps:
        distill_step.distillation_loss = nan_valued_loss
    if kill is not None:
        checkpoint.publish = publish_hook


def _adam_steps(engine) -> list[float]:
    opt = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    return [float(s["step"]) for s in opt.state.values() if "step" in s]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def recording_callback(hooks: dict, captured: dict):
    """The trainer callback that records what ``hooks`` asks for into files and ``captured``."""
    import torch

    from megatron_subnet.training.trainer import Callback

    def log(event: str, iteration: int, **extra) -> None:
        if hooks.get("callback_log") and _rank() == 0:
            with open(hooks["callback_log"], "a") as f:
                f.write(json.dumps({"event": event, "iteration": iteration, **extra}) + "\n")

    class Recorder(Callback):
        def on_setup_end(self, trainer) -> None:
            log("setup_end", trainer.progress.iteration)
            captured["iteration"] = trainer.progress.iteration
            captured["student"], captured["optimizer"], captured["engine"] = (
                trainer.student,
                trainer.optimizer,
                trainer.engine,
            )
            if trainer.teacher is not None:
                module = trainer.teacher.module
                captured["teacher_model"] = getattr(module, "module", module)  # under ZeRO-3 a DeepSpeed engine
            captured.setdefault("events", []).append(["engine", str(trainer.engine.device)])
            if hooks.get("optimizer_dump"):
                _dump_optimizer(trainer.engine, Path(hooks["optimizer_dump"]))

        def on_step_start(self, trainer, iteration, micro_batches) -> None:
            log("step_start", iteration, micro_batches=len(micro_batches))
            captured["iteration"] = iteration
            if hooks.get("record_dir"):
                digest = hashlib.sha1(b"".join(b.numpy().tobytes() for b in micro_batches)).hexdigest()
                Path(hooks["record_dir"]).mkdir(parents=True, exist_ok=True)
                with open(Path(hooks["record_dir"]) / f"rank_{_rank()}.jsonl", "a") as f:
                    f.write(json.dumps({"iteration": iteration, "batch": digest}) + "\n")
            if hooks.get("param_trace"):
                captured["before"] = [p.detach().clone() for p in trainer.engine.module.parameters()]
                captured["adam_before"] = _adam_steps(trainer.engine)

        def on_step_end(self, trainer, iteration, result) -> None:
            log("step_end", iteration, loss=result.loss)
            if hooks.get("tied_trace"):
                _record_tied_copy(trainer.student, iteration, Path(hooks["tied_trace"]))
            if not hooks.get("param_trace") or _rank() != 0:
                return
            after = list(trainer.engine.module.parameters())
            record = {
                "iteration": iteration,
                "skipped": result.skipped,
                "params_changed": any(not torch.equal(a, b) for a, b in zip(captured["before"], after)),
                "params_finite": all(bool(torch.isfinite(p).all()) for p in after),
                "adam_steps_before": captured["adam_before"],
                "adam_steps_after": _adam_steps(trainer.engine),
            }
            with open(hooks["param_trace"], "a") as f:
                f.write(json.dumps(record) + "\n")

        def on_evaluation(self, trainer, record) -> None:
            log("evaluation", record["iteration"], valid_loss=record["valid_loss"])

        def on_checkpoint_saved(self, trainer, iteration, path) -> None:
            log("checkpoint_saved", iteration, path=str(path))
            if iteration == hooks.get("stop_after_save"):  # every rank's part is written (a barrier)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)  # a job that ran out of time right after its checkpoint

    return Recorder()


def _dump_optimizer(engine, out: Path) -> None:
    """This rank's student parameters as DeepSpeed's optimizer holds them, gathered whole over the data-parallel
    group: ``NAME/fp32``, ``NAME/exp_avg``, ``NAME/exp_avg_sq``, and ``step`` (Adam's step count)."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    tensors = {}
    for name, param in engine.module.named_parameters():
        tensors[f"{name}/fp32"] = safe_get_full_fp32_param(param)
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key)
    tensors["step"] = torch.tensor(_adam_steps(engine))
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, out / f"rank_{_rank()}.safetensors")


def _record_tied_copy(model, iteration: int, out: Path) -> None:
    """A stage holding a copy of the tied embedding (the first or the last) appends a hash of its shard."""
    from megatron_subnet.parallel import state

    if not model.config.tie_word_embeddings or not (model.stage.first or model.stage.last):
        return
    weight = model.embedding.weight.detach()
    record = {
        "iteration": iteration,
        "pp": state.get_pipeline_model_parallel_rank(),
        "tp": state.get_tensor_model_parallel_rank(),
        "dp": state.get_data_parallel_rank(),
        "dtype": str(weight.dtype),
        "weight": hashlib.sha1(weight.float().cpu().numpy().tobytes()).hexdigest(),
    }
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"rank_{_rank()}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _trace_devices(captured: dict) -> None:
    """Record in ``captured["events"]`` where the student is moved to (a model in training mode: the teacher is
    in eval mode before it moves) and every broadcast until the trainer's setup ends (the engine is built,
    and resumed when --load). On a CPU the run's device is
    renamed ``cpu:0`` (the same device), so that a move to it is told apart from a move to the default."""
    import torch.distributed as dist

    from megatron_subnet import initialize
    from megatron_subnet.model.gpt import GPTModel

    events = captured.setdefault("events", [])
    move, broadcast, initialize_distributed = GPTModel.to, dist.broadcast, initialize.initialize_distributed

    def initialize_hook(*args, **kwargs):
        device = initialize_distributed(*args, **kwargs)
        return "cpu:0" if device == "cpu" else device

    def to_hook(self, *args, **kwargs):
        if self.training:
            events.append(["to", str(args[0] if args else kwargs.get("device"))])
        return move(self, *args, **kwargs)

    def broadcast_hook(tensor, *args, **kwargs):
        if "engine" not in captured:
            events.append(["broadcast", str(tensor.device)])
        return broadcast(tensor, *args, **kwargs)

    initialize.initialize_distributed, GPTModel.to, dist.broadcast = initialize_hook, to_hook, broadcast_hook


def _teacher_report(captured: dict, hooks: dict, teacher_dir: str) -> None:
    """Compare the co-resident teacher with its checkpoint after training (collective under ZeRO-3)."""
    import contextlib

    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    model = captured["teacher_model"]
    params = list(model.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    reference = load_file(Path(teacher_dir) / "model.safetensors")
    with gather:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    teacher_ids = {id(p) for p in params}
    student_ids = {id(p) for p in captured["student"].parameters()}
    engine = captured["engine"]
    optimizers = [captured["optimizer"], engine.optimizer, getattr(engine.optimizer, "optimizer", None)]
    in_optimizer = {id(p) for o in optimizers if o is not None for g in o.param_groups for p in g["params"]}
    report = {
        "zero_stage": engine.zero_optimization_stage(),
        "names_match": sorted(state) == sorted(reference),
        "bit_identical": all(torch.equal(state[k], reference[k]) for k in reference if k in state),
        "shared_with_student": len(teacher_ids & student_ids),
        "in_optimizer": len(teacher_ids & in_optimizer),
        "requires_grad": sum(p.requires_grad for p in params),
        "has_grad": sum(p.grad is not None for p in params),
        "teacher_training_mode": model.training,
    }
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = Path(hooks["teacher_report"])
    path.mkdir(parents=True, exist_ok=True)
    (path / f"rank_{rank}.json").write_text(json.dumps(report))


def _main(argv: list[str]) -> int:
    hooks = json.loads(os.environ.get(HOOKS_ENV) or "{}")
    sys.path.insert(0, str(REPO))
    captured: dict = {"iteration": 0}
    _install_faults(hooks, captured)
    if hooks.get("device_trace"):
        _trace_devices(captured)
    from megatron_subnet.pretrain import main

    code = main(argv, [recording_callback(hooks, captured)])
    if code == 0 and hooks.get("teacher_report"):
        teacher_dir = argv[argv.index("--teacher-load") + 1]
        _teacher_report(captured, hooks, teacher_dir)
    if code == 0 and hooks.get("device_trace"):
        import torch.distributed as dist

        out = Path(hooks["device_trace"])
        out.mkdir(parents=True, exist_ok=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        (out / f"rank_{rank}.json").write_text(json.dumps(captured["events"]))
    if code == 0 and hooks.get("state_dump"):
        import torch.distributed as dist
        from safetensors.torch import save_file

        rank = dist.get_rank() if dist.is_initialized() else 0
        out = Path(hooks["state_dump"])
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous().clone() for k, v in captured["engine"].module.state_dict().items()}
        save_file(state, out / f"rank_{rank}.safetensors")
    return code


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
