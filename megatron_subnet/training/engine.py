"""The student in a DeepSpeed engine (ZeRO 0-3), the frozen co-resident teacher, and one training step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.parallel import state
from megatron_subnet.parallel.losses import distillation_loss
from megatron_subnet.parallel.mappings import all_reduce


@dataclass(frozen=True)
class KDConfig:
    """The training objective: ``(1 - alpha) * CE + alpha * T^2 * KL`` (``alpha`` 0: CE alone, no teacher)."""

    alpha: float = 0.5
    kind: str = "forward_kl"
    temperature: float = 1.0
    topk: int = 64


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its update when any rank holds a NaN/Inf gradient: every rank (every tensor- and
    data-parallel shard) takes the same decision, so the shards of one model never drift apart.

    DeepSpeed calls ``step`` on every rank's partition; ZeRO-1/2 already skip on a non-finite norm and
    never call it then.
    """

    skipped_last = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()))
        flag = torch.tensor([0.0 if finite else 1.0])
        if state.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self.skipped_last = True
            return None
        return super().step(closure)


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


def initialize_student(model: GPTModel, optimizer: torch.optim.Optimizer, ds_config: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=_mpu())
    if engine.zero_optimization_stage() == 0 and state.get_data_parallel_world_size() == 1:
        engine.enable_backward_allreduce = False  # one replica: nothing to average, skip the bucket copies
    return engine


class Teacher:
    """Frozen, eval-mode teacher: never in the optimizer, no gradients, sharded as the student is over the
    tensor-parallel group. Under ZeRO-3 its parameters are also partitioned across the data-parallel ranks
    by an optimizer-less DeepSpeed engine."""

    def __init__(self, model: GPTModel, student_ds_config: dict, device: str):
        model.eval().requires_grad_(False)
        self.config: ModelConfig = model.config
        stage = student_ds_config.get("zero_optimization", {}).get("stage", 0)
        bf16 = student_ds_config.get("bf16", {}).get("enabled", False)
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
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.module(tokens)


@dataclass
class StepResult:
    loss: float
    ce: float
    kd: float | None
    grad_norm: float
    skipped: bool


def _sum_over_data_parallel(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if state.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, group=state.get_data_parallel_group())
    return t.tolist()


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    # Plain data parallelism in fp32: gradients are already averaged across replicas after the last backward.
    # A tensor-parallel shard's squares are summed over the TP group; a replicated tensor is counted once.
    split, replicated = [], []
    for p in engine.module.parameters():
        if p.grad is not None:
            (split if getattr(p, "tensor_model_parallel", False) else replicated).append(p.grad.detach().float())
    squares = torch.zeros(2, dtype=torch.float64)
    for i, grads in enumerate((split, replicated)):
        if grads:
            squares[i] = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
    all_reduce(squares[:1])
    return float(squares.sum().sqrt())


def forward_step(
    model, teacher: Teacher | None, batch: torch.Tensor, kd: KDConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One micro-batch ``[b, seq + 1]``: the student's (and teacher's) vocab-sharded logits and the loss;
    returns (loss, CE, KL or None). What a pipeline schedule runs on its last stage."""
    tokens, labels = batch[:, :-1], batch[:, 1:]
    teacher_logits = teacher(tokens) if teacher is not None else None
    logits = model(tokens)
    return distillation_loss(logits, labels, teacher_logits, kd.alpha, kd.kind, kd.temperature, kd.topk)


def train_step(
    engine, teacher: Teacher | None, micro_batches: list[torch.Tensor], lr: float, kd: KDConfig
) -> StepResult:
    """One optimizer step over this rank's micro-batches (gradient accumulation); losses are global means."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    optimizer = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    if isinstance(optimizer, GuardedAdamW):
        optimizer.skipped_last = False
    totals = [0.0, 0.0, 0.0]
    grad_norm = 0.0
    for i, batch in enumerate(micro_batches):
        loss, ce, kl = forward_step(engine, teacher, batch.to(engine.device), kd)
        engine.backward(loss)
        totals[0] += loss.item()
        totals[1] += ce.item()
        totals[2] += kl.item() if kl is not None else 0.0
        if i == len(micro_batches) - 1 and engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled():
            grad_norm = _grad_norm(engine)
        engine.step()
    if engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled():
        grad_norm = _grad_norm(engine)
    dp = state.get_data_parallel_world_size()
    loss, ce, kl = (t / dp for t in _sum_over_data_parallel([t / len(micro_batches) for t in totals]))
    skipped = bool(getattr(optimizer, "skipped_last", False)) or not math.isfinite(grad_norm) or not math.isfinite(loss)
    return StepResult(loss, ce, kl if teacher is not None else None, grad_norm, skipped)


def evaluate(engine, batches: list[torch.Tensor], device) -> float:
    """Cross-entropy per label token over this rank's batches and every data-parallel replica's."""
    from megatron_subnet.model.evaluation import evaluate as evaluate_lm

    was_training = engine.module.training
    engine.module.eval()
    result = evaluate_lm(engine, batches, device, progress=False) if batches else None
    engine.module.train(was_training)
    total, tokens = _sum_over_data_parallel([result.loss * result.tokens, result.tokens] if result else [0.0, 0.0])
    return total / max(tokens, 1.0)
