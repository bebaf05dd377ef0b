"""The student in a DeepSpeed engine (ZeRO 0-3), the frozen co-resident teacher, and one training step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.evaluation import loss_sum
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.parallel import state
from megatron_subnet.parallel.distill_step import KDConfig, distillation_forward, distillation_messages
from megatron_subnet.parallel.pipeline import sync_tied_embedding
from megatron_subnet.parallel.pipeline_executor import broadcast_from_last_stage, forward_backward


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its update when any rank holds a NaN/Inf gradient: every rank (every tensor- and
    data-parallel shard) takes the same decision, so the shards of one model never drift apart.

    The decision stays on the device: the fused kernel skips the update (and its step count) where
    ``found_inf`` is set, as under torch.amp's GradScaler, so no rank waits on the host; ``skipped`` keeps it
    for the step's report. DeepSpeed calls ``step`` on every rank's partition; ZeRO-1/2 already skip on a
    non-finite norm and never call it then.
    """

    skipped: torch.Tensor | None = None  # 1.0 where any call since the last reset (to None) skipped
    veto: torch.Tensor | None = None  # 1.0: skip whatever the gradients (the step's loss was not finite)
    max_grad_norm: float = 0.0  # > 0: the trainer clips (``clip_coefficient``), not DeepSpeed
    clip_coefficient: torch.Tensor | None = None  # the next step's gradients are scaled by it, then it is reset

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.defaults.get("fused"):
            raise ValueError("GuardedAdamW: needs fused=True (only the fused kernel honours found_inf)")

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        flag = torch.zeros((), device=params[0].device if params else _collective_device())
        if grads:
            flag = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()).logical_not().float()
        if self.veto is not None:
            flag = torch.maximum(flag, self.veto.to(flag))
        if state.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.found_inf = flag
        self.skipped = flag if self.skipped is None else torch.maximum(self.skipped, flag)  # ZeRO-3: per sub-group
        if self.clip_coefficient is not None and grads:
            torch._foreach_mul_(grads, self.clip_coefficient.to(grads[0]))
        self.clip_coefficient = None
        return super().step(closure)


def _collective_device() -> torch.device:
    """Where a tensor for a collective must live: NCCL reduces accelerator tensors only."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> GuardedAdamW:
    """AdamW with Megatron's grouping: no weight decay on biases and norm weights (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop; same math.
    return GuardedAdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)


def _mpu():
    """DeepSpeed's view of our groups when the model is split (ZeRO then works over the data-parallel group)."""
    return state.mpu if state.DeepSpeedMPU.get_model_parallel_world_size() > 1 else None


def initialize_student(model: GPTModel, optimizer: GuardedAdamW, ds_config: dict):
    """The student's DeepSpeed engine. In bf16 at ZeRO-0 DeepSpeed's (unfused) bf16 optimizer counts tensors
    replicated over tensor-parallel ranks, and the tied embedding's second copy, again in its gradient norm;
    there the step takes the norm itself (as in fp32 at ZeRO-0) and clips through the optimizer."""
    import deepspeed

    if ds_config.get("bf16", {}).get("enabled") and ds_config.get("zero_optimization", {}).get("stage", 0) == 0:
        optimizer.max_grad_norm = ds_config.get("gradient_clipping", 0.0)
        ds_config = {**ds_config, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=_mpu())
    if state.get_pipeline_model_parallel_world_size() > 1:
        engine.enable_backward_allreduce = False  # the pipeline schedule reduces once, after the last backward
    elif engine.zero_optimization_stage() == 0 and state.get_data_parallel_world_size() == 1:
        engine.enable_backward_allreduce = False  # one replica: nothing to average, skip the bucket copies
    return engine


class Teacher:
    """Frozen, eval-mode teacher: never in the optimizer, no gradients, sharded as the student is over the
    tensor-parallel group, in its own ``dtype`` (fp32 or bf16, whatever the student's). Under ZeRO-3 its
    parameters are also partitioned across the data-parallel ranks by an optimizer-less DeepSpeed engine."""

    def __init__(self, model: GPTModel, student_ds_config: dict, device: str, dtype: torch.dtype = torch.float32):
        model.eval().requires_grad_(False)
        self.config: ModelConfig = model.config
        stage = student_ds_config.get("zero_optimization", {}).get("stage", 0)
        bf16 = dtype == torch.bfloat16
        if stage == 3:
            import deepspeed

            config = {
                "train_micro_batch_size_per_gpu": student_ds_config["train_micro_batch_size_per_gpu"],
                "gradient_accumulation_steps": student_ds_config["gradient_accumulation_steps"],
                "train_batch_size": student_ds_config["train_batch_size"],
                "zero_optimization": {
                    "stage": 3,
                    **{k: v for k, v in student_ds_config["zero_optimization"].items() if k.startswith("stage3_")},
                },
                "bf16": {"enabled": bf16},
            }
            self.module, _, _, _ = deepspeed.initialize(model=model, config=config, mpu=_mpu())
            self.module.eval()
        else:
            self.module = model.to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        return self.module(tokens, chunk=chunk)


@dataclass
class StepResult:
    loss: float
    ce: float
    kd: float | None
    grad_norm: float
    skipped: bool


def _sum_over_data_parallel(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the data-parallel replicas (in place)."""
    if state.get_data_parallel_world_size() > 1:
        dist.all_reduce(values, group=state.get_data_parallel_group())
    return values


def _deepspeed_grad_norm(engine) -> torch.Tensor:
    """The global gradient norm DeepSpeed's optimizer took in its step (ZeRO 1-3), a float64 scalar."""
    return torch.as_tensor(engine.get_global_grad_norm(), dtype=torch.float64, device=engine.device)


def _grad_norm(engine) -> torch.Tensor:
    """The global gradient norm of the gradients the engine holds, a float64 scalar on the engine's device (no
    host sync)."""
    # ZeRO-0 (fp32, or bf16's gradients before DeepSpeed copies them to fp32): gradients are already averaged
    # across replicas after the last backward.
    # Squares are summed over the model-parallel (TP x PP) group; a tensor replicated over TP is counted on TP
    # rank 0 only, and the last stage's copy of a tied embedding not at all (as DeepSpeed counts them).
    grads = []
    for p in engine.module.parameters():
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        if getattr(p, "tensor_model_parallel", False) or state.get_tensor_model_parallel_rank() == 0:
            grads.append(p.grad.detach().float())
    squares = torch.zeros(1, dtype=torch.float64, device=engine.device)
    if grads:
        squares[0] = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
    if state.DeepSpeedMPU.get_model_parallel_world_size() > 1:
        dist.all_reduce(squares, group=state.mpu.get_model_parallel_group())
    return squares.sqrt()[0]


def _loss_parts(loss: torch.Tensor, ce: torch.Tensor, kl: torch.Tensor | None) -> torch.Tensor:
    """``[loss, CE, KL or 0]`` of one micro-batch, float64, on the loss's device."""
    return torch.stack([loss.detach(), ce.detach(), kl.detach() if kl is not None else torch.zeros_like(ce)]).double()


def train_step(
    engine, teacher: Teacher | None, micro_batches: list[torch.Tensor], lr: float, kd: KDConfig
) -> StepResult:
    """One optimizer step over this rank's micro-batches, whatever the layout: the layout's schedule
    (``training_order``: gradient accumulation, 1F1B, or interleaved 1F1B) runs one forward and one backward
    callback; losses are global means. Each stage runs its layers of the student and of the teacher; both
    models' hidden states travel to the next stage in one message; the last stage computes the loss. The
    losses, the gradient norm and the skip decision stay on the device until the step's one host sync."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    optimizer = _guard(engine)
    if optimizer is not None:
        optimizer.skipped = optimizer.veto = None
    batches = [b.to(engine.device) for b in micro_batches]
    totals = torch.zeros(3, dtype=torch.float64, device=engine.device)
    stage, model = engine.module.stage, engine.module
    forward = distillation_forward(engine, stage, teacher, batches, kd, lambda *parts: totals.add_(_loss_parts(*parts)))

    def backward(chunk: int, i: int, scalar: torch.Tensor) -> None:
        # off the last stage the stand-in's gradient is the next stage's, already scaled for accumulation
        engine.backward(scalar, scale_wrt_gas=stage.holds_last(chunk))
        if chunk == 0 and i < len(batches) - 1:
            engine.step()  # within the accumulation: DeepSpeed only counts the micro-batch (once per micro-batch)

    spec = None if teacher is None else (teacher.config.hidden_size, next(teacher.module.parameters()).dtype)
    messages = distillation_messages(batches[0], (model.config.hidden_size, next(model.parameters()).dtype), spec)
    forward_backward(len(batches), stage.num_chunks, forward, backward, messages, engine.device)
    grad_norm = _reduce_and_step(engine, totals)
    totals = broadcast_from_last_stage(totals)
    means = _sum_over_data_parallel(totals / len(batches)) / state.get_data_parallel_world_size()
    skip = optimizer.skipped if optimizer is not None else None
    skip = torch.zeros((), dtype=torch.float64, device=means.device) if skip is None else skip.to(means)
    loss, ce, kl, norm, skipped = torch.cat([means, grad_norm.to(means).view(1), skip.view(1)]).tolist()
    # the guard skipped (gradients or losses not finite), or DeepSpeed did (its own overflow check of the norm)
    skipped = skipped > 0 or not all(map(math.isfinite, (loss, ce, kl, norm)))
    return StepResult(loss, ce, kl if teacher is not None else None, norm, skipped)


def _reduce_and_step(engine, totals: torch.Tensor) -> torch.Tensor:
    """Every stage is done with the schedule (no message in flight): the tied embedding's two copies get one
    summed gradient, the data-parallel reduction the engine leaves for after the last backward runs
    (DeepSpeed's own; under pipelining, and never twice), then the one gradient norm and skip decision, and
    the optimizer step. Returns the norm: ours at ZeRO-0 (taken before the step clears the gradients; in bf16
    it also sets the optimizer's clipping), DeepSpeed's at ZeRO 1-3."""
    sync_tied_embedding(engine.module, gradients=True)
    reduces = engine.zero_optimization_stage() > 0 or state.get_data_parallel_world_size() > 1
    if reduces and not engine.enable_backward_allreduce:
        engine.allreduce_gradients()
    norm = _grad_norm(engine) if engine.zero_optimization_stage() == 0 else None
    optimizer = _guard(engine)
    if norm is not None and optimizer is not None and optimizer.max_grad_norm > 0:
        optimizer.clip_coefficient = (optimizer.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
    _veto_nonfinite_losses(engine, totals)  # the last stage's losses; the guard's all-reduce tells every stage
    engine.step()
    return _deepspeed_grad_norm(engine) if norm is None else norm


def _guard(engine) -> GuardedAdamW | None:
    """The engine's GuardedAdamW (DeepSpeed may wrap it), or None."""
    optimizer = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    return optimizer if isinstance(optimizer, GuardedAdamW) else None


def _veto_nonfinite_losses(engine, totals: torch.Tensor) -> None:
    """One skip decision for the optimizer and the report: a step whose loss (or its CE or KL part) is not
    finite is skipped even where every gradient is finite, so a step reported skipped changes no weight."""
    optimizer = _guard(engine)
    if optimizer is not None:
        optimizer.veto = totals.isfinite().all().logical_not().float()


def evaluate(engine, batches: list[torch.Tensor], device) -> float:
    """Cross-entropy per label token over this rank's batches and every data-parallel replica's, through the
    stages in the forward-only schedule (``model.evaluation.loss_sum``, every layout's one loop)."""
    was_training = engine.module.training
    engine.module.eval()
    total, tokens = loss_sum(engine.module, batches, device, call=engine)
    engine.module.train(was_training)
    sums = broadcast_from_last_stage(torch.tensor([total, tokens], dtype=torch.float64, device=engine.device))
    total, tokens = _sum_over_data_parallel(sums).tolist()
    return total / max(tokens, 1.0)
