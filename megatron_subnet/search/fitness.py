"""Fitness of a sub-network: validation loss of the masked parent on a fixed set of batches.

The parent is loaded once (``load_parent``) and every candidate runs on its weights through
``GPTModel.forward(tokens, subnet=...)``: no reload, no copy. Every candidate sees the same validation
batches (``load_batches`` from the valid split), so losses compare directly.

The loss is ``evaluation.evaluate``'s: the cross-entropy summed over every label token of every batch,
divided by their number (the one evaluation definition; vocab-parallel under tensor parallelism).

With ``train_steps = k > 0`` the candidate is first distilled briefly: its dense student is extracted
(``extract_shard``: a copy of the student's weights), trained ``k`` AdamW steps on fixed train
batches with ``distillation_loss`` against the parent's logits, and then its validation loss is taken.
Cost per candidate: about ``k`` x (student forward + backward, ~3 student forwards) plus the parent's
forward on each train batch (computed once and cached when the logits fit ``teacher_cache_bytes``),
plus the extraction copy and the ``N`` validation forwards; without training a candidate costs only
``N`` masked forwards, so ``k = N`` is roughly a 4-5x slower search.

With several data-parallel ranks (torchrun; gloo on CPU, nccl on GPU) the candidates of one call are
split round-robin over the ranks, evaluated at once, and all-gathered back in candidate order; each
loss is computed exactly as on one rank, so the search is the same at any data-parallel size.

Under tensor parallelism (TP ranks of one data-parallel replica evaluate the same candidates together)
the parent is this rank's shard and the masked candidates take global selections as they are. A
distilled candidate's student is cut shard by shard through ``read`` (a ``CheckpointReader`` on the
parent's checkpoint: each rank reads only its student shard's rows and columns, never the whole parent),
trained sharded with the vocab-parallel ``distillation_loss``; the student must split into the TP size
(the search keeps it so with ``--divisible-by``).

Under pipeline parallelism the parent is this rank's stage (TP shard of it) and a masked candidate's
validation forward runs through the stages in the forward-only schedule (``evaluation.evaluate_model``):
the TP x PP ranks of one data-parallel replica evaluate the same candidates together, and the last
stage's loss is broadcast to every stage. The distilled fitness (``train_steps > 0``) runs through the
pipeline stages too: the student's kept layers are split evenly over the stages, cut stage by stage from the
parent's checkpoint, and each training step runs through the stages in the 1F1B schedule (one micro-batch),
the parent's stage beside the student's, as the trainer's step does; the result is a single process's.

Every evaluation also reports the FLOPs it ran (``model/flops.py``'s count, all ranks of a replica together):
the candidate's validation forwards cost ``forward_flops_per_token(student) x tokens`` (the masked forward
computes only the kept units, exactly the extracted student's matmuls); a distilled candidate adds its
``train_steps`` training steps (``training_flops_per_token(student) x tokens``) and the parent's forwards on
the train batches, counted when they run: the parent's logits are cached (``teacher_cache_bytes``), so on
each rank only the candidates that compute them pay for them.

Held-out re-scoring (``load_heldout_batches``, ``SubnetFitness.on_batches``) scores the same way on samples
the selection never saw: the test split, or, when it has no documents, the valid split's samples that follow
the selection's in its shuffled order.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_subnet.data.batches import load_batches
from megatron_subnet.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets
from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.evaluation import evaluate, evaluate_model
from megatron_subnet.model.extract import extract_shard
from megatron_subnet.model.flops import forward_flops_per_token, training_flops_per_token
from megatron_subnet.model.gpt import GPTModel
from megatron_subnet.model.subnet import SubnetConfig, subnet_indices
from megatron_subnet.model.weights import TensorSource, load_model, state_source
from megatron_subnet.parallel import state as parallel_state
from megatron_subnet.parallel.distill_step import KDConfig, distillation_forward, distillation_messages
from megatron_subnet.parallel.losses import distillation_loss
from megatron_subnet.parallel.pipeline import current_stage, sync_tied_embedding
from megatron_subnet.parallel.pipeline_executor import forward_backward


def load_parent(path: str | os.PathLike, device: torch.device | str = "cpu") -> GPTModel:
    """The parent from our checkpoint directory (consolidated or sharded), frozen and in eval mode: this
    rank's tensor-parallel shard of its pipeline stage only, through the one loader (``weights.load_model``).

    Raises ``CheckpointError`` (a ValueError) naming a missing file or weights that do not fit the config.
    """
    model = load_model(path, device)
    model.requires_grad_(False)
    return model


@dataclass
class FitnessConfig:
    train_steps: int = 0  # short distillation before the validation loss (0: masked parent, no training)
    lr: float = 1e-4
    kd_alpha: float = 0.5  # loss = (1 - alpha) * CE + alpha * T^2 * KL(parent || student)
    kd_loss: str = "forward_kl"
    temperature: float = 1.0
    teacher_cache_bytes: int = 2**30  # cache the parent's logits on the train batches up to this size


class SubnetFitness:
    """Callable fitness: ``fitness(subnets) -> [(validation loss, seconds, FLOPs)]`` on one loaded parent."""

    def __init__(
        self,
        parent: GPTModel,
        valid_batches: list[torch.Tensor],
        train_batches: list[torch.Tensor] | None = None,
        config: FitnessConfig | None = None,
        read: TensorSource | None = None,
    ):
        """``read(name, rows, cols)``: the parent's tensors in global numbering (a ``CheckpointReader``'s
        ``read``), which a distilled fitness under tensor parallelism cuts its student shards from; with one
        TP rank the parent's own weights serve when it is None."""
        self.parent, self.config = parent, config or FitnessConfig()
        self.device = next(parent.parameters()).device
        self.valid = [b.to(self.device) for b in valid_batches]
        self.train = [b.to(self.device) for b in train_batches or []]
        self.read = read
        if self.config.train_steps > 0 and not self.train:
            raise ValueError("--fitness-train-steps needs train batches")
        split = parent.shard.size > 1 or not (parent.stage.first and parent.stage.last)
        if self.config.train_steps > 0 and split and read is None:
            raise ValueError(
                "--fitness-train-steps with tensor or pipeline parallelism cuts each student from the parent's "
                "checkpoint: pass read=CheckpointReader(load).read"
            )
        self._teacher_logits: dict[int, torch.Tensor] = {}
        self._cpu_state: dict[str, torch.Tensor] | None = None
        self.teacher_flops = 0  # the parent's forwards on train batches run so far (by this process)

    def __call__(self, subnets: list[SubnetConfig]) -> list[tuple[float, float, int]]:
        return evaluate_split(self.timed_loss, subnets)

    def on_batches(self, batches: list[torch.Tensor]) -> SubnetFitness:
        """The same fitness (same parent, train batches and cached parent logits) scored on ``batches``."""
        other = copy.copy(self)  # shares the parent, the train batches and the teacher-logit cache
        other.valid = [b.to(self.device) for b in batches]
        return other

    def timed_loss(self, subnet: SubnetConfig) -> tuple[float, float, int]:
        """(validation loss, seconds, FLOPs run for it)."""
        start = time.perf_counter()
        teacher_before = self.teacher_flops
        loss = self.loss(subnet)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return loss, time.perf_counter() - start, self.flops(subnet) + self.teacher_flops - teacher_before

    def flops(self, subnet: SubnetConfig) -> int:
        """FLOPs of evaluating ``subnet`` besides the parent's forwards: its validation forwards, and with
        ``train_steps`` its training steps (the module docstring)."""
        student = subnet.student_config(self.parent.config)
        total = batches_flops(student, self.valid)
        if self.config.train_steps > 0:
            steps = [self.train[step % len(self.train)] for step in range(self.config.train_steps)]
            total += batches_flops(student, steps, training=True)
        return total

    def loss(self, subnet: SubnetConfig) -> float:
        if self.config.train_steps > 0:
            return self.distilled_loss(subnet)
        index = subnet_indices(self.parent.config, subnet, self.device, self.parent.shard)
        return evaluate_model(self.parent, self.valid, self.device, index, progress=False).loss

    def _valid_loss(self, forward) -> float:
        return evaluate(forward, self.valid, self.device, progress=False).loss

    def distilled_loss(self, subnet: SubnetConfig) -> float:
        """Validation loss of the extracted student after ``train_steps`` of distillation from the parent. Under
        pipeline parallelism the student's kept layers are split evenly over the stages and each step runs
        through them (one micro-batch), the parent's stage beside the student's."""
        cfg, shard = self.config, self.parent.shard
        read = self.read if self.read is not None else state_source(self._parent_state())
        stage = current_stage(len(subnet.layers))
        student_config, weights = extract_shard(self.parent.config, read, subnet, shard, stage)
        with torch.device("meta"):
            student = GPTModel(student_config, shard, stage)
        student.load_state_dict(weights, assign=True)
        student = student.to(self.device).train()
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
        staged = parallel_state.get_pipeline_model_parallel_world_size() > 1
        for step in range(cfg.train_steps):
            optimizer.zero_grad(set_to_none=True)
            if staged:
                self._staged_backward(student, step % len(self.train))
            else:
                i = step % len(self.train)
                batch = self.train[i]
                loss, _, _ = distillation_loss(
                    student(batch[:, :-1]), batch[:, 1:], self._teacher(i), cfg.kd_alpha, cfg.kd_loss, cfg.temperature
                )
                loss.backward()
            optimizer.step()
        student.eval()
        if staged:
            return evaluate_model(student, self.valid, self.device, progress=False).loss
        return self._valid_loss(student)

    def _staged_backward(self, student: GPTModel, i: int) -> None:
        """The distillation loss's gradients on train batch ``i`` through the stages (``distill_step``: the
        parent's stage beside the student's); the tied embedding's copies get one summed gradient."""
        cfg, batch = self.config, self.train[i]
        teacher = self.parent if cfg.kd_alpha > 0 else None
        kd = KDConfig(cfg.kd_alpha, cfg.kd_loss, cfg.temperature)
        forward = distillation_forward(student, student.stage, teacher, [batch], kd)

        def backward(chunk: int, microbatch: int, scalar: torch.Tensor) -> None:
            scalar.backward()

        spec = None
        if teacher is not None:  # the parent's forward on the batch, all stages together (not cached: each step)
            spec = (teacher.config.hidden_size, next(teacher.parameters()).dtype)
            self.teacher_flops += batches_flops(self.parent.config, [batch])
        student_spec = (student.config.hidden_size, next(student.parameters()).dtype)
        forward_backward(1, 1, forward, backward, distillation_messages(batch, student_spec, spec), self.device)
        sync_tied_embedding(student, gradients=True)

    def _parent_state(self) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return self.parent.state_dict()  # views, no copy
        if self._cpu_state is None:  # extract_shard indexes on the CPU
            self._cpu_state = {k: v.cpu() for k, v in self.parent.state_dict().items()}
        return self._cpu_state

    @torch.no_grad()
    def _teacher(self, i: int) -> torch.Tensor | None:
        if self.config.kd_alpha == 0.0:
            return None
        if i in self._teacher_logits:
            return self._teacher_logits[i]
        logits = self.parent(self.train[i][:, :-1])
        self.teacher_flops += batches_flops(self.parent.config, [self.train[i]])
        if (len(self._teacher_logits) + 1) * logits.numel() * logits.element_size() <= self.config.teacher_cache_bytes:
            self._teacher_logits[i] = logits
        return logits


def batches_flops(config: ModelConfig, batches: Sequence[torch.Tensor], training: bool = False) -> int:
    """FLOPs of ``config``'s forward (``training``: forward and backward) over the inputs of token ``batches``
    ``[batch, seq + 1]``: per-token FLOPs (``model/flops.py``) times the tokens, exact integers."""
    count = training_flops_per_token if training else forward_flops_per_token
    return sum(int(count(config, b.shape[1] - 1)) * b[:, :-1].numel() for b in batches)


def load_heldout_batches(
    data_path: Sequence[str] | str,
    split: str,
    seq_length: int,
    micro_batch_size: int,
    num_batches: int,
    seed: int,
    selection_samples: int,
) -> tuple[list[torch.Tensor], dict]:
    """Batches the selection (the first ``selection_samples`` samples of the valid split with ``seed``) never
    saw, and a description of them: the test split's first ``num_batches``; or, when the test split has no
    documents, the valid split's samples ``selection_samples ..`` in the same shuffled order (the data order
    does not depend on the number of samples, so the selection is this order's first ``selection_samples``;
    within one epoch no two positions hold the same sample). ValueError when one epoch of the valid split
    cannot hold both, or it is a blend (its components' samples cannot be split so)."""
    n = num_batches * micro_batch_size
    try:
        batches = load_batches(data_path, split, "test", seq_length, micro_batch_size, num_batches, seed)
    except ValueError as e:
        if "no test documents" not in str(e):
            raise
    else:
        info = {"split": "test", "data_seed": seed, "samples": n, "tokens": n * seq_length,
                "which": f"the first {n} samples of the test split"}  # fmt: skip
        return batches, info
    prefixes = [data_path] if isinstance(data_path, str) else list(data_path)
    hint = "give --split a test share, fewer --rescore-batches, or --rescore-top 0"
    total = selection_samples + n
    dataset = build_train_valid_test_datasets(prefixes, split, seq_length, seed, [0, total, 0])[1]
    if not isinstance(dataset, GPTDataset):
        raise ValueError(
            f"--split {split}: no test documents for the held-out re-scoring, and the valid split of a blended "
            f"--data-path cannot be divided into selection and held-out samples; {hint}"
        )
    tokens = int(dataset.indexed.sequence_lengths[dataset.document_ids].sum(dtype=np.int64))
    if total * seq_length + 1 > tokens:
        raise ValueError(
            f"--split {split}: no test documents for the held-out re-scoring, and the valid split's "
            f"{(tokens - 1) // seq_length} samples of {seq_length} tokens cannot hold the {selection_samples} "
            f"selection samples and {n} held-out ones apart; {hint}"
        )
    samples = [torch.from_numpy(dataset[k]["tokens"]) for k in range(selection_samples, total)]
    batches = [torch.stack(samples[k : k + micro_batch_size]) for k in range(0, n, micro_batch_size)]
    info = {"split": "valid", "data_seed": seed, "samples": n, "tokens": n * seq_length,
            "which": f"the valid split's samples {selection_samples}..{total - 1} in shuffled order (the "
                     f"selection used 0..{selection_samples - 1}; the test split has no documents)"}  # fmt: skip
    return batches, info


def evaluate_split(fn, items: list) -> list:
    """``[fn(x) for x in items]``, with the items split round-robin over the data-parallel ranks."""
    if not parallel_state.is_initialized():
        return [fn(x) for x in items]
    group = parallel_state.get_data_parallel_group()
    rank, world = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    mine = [(i, fn(items[i])) for i in range(rank, len(items), world)]
    if world == 1:
        return [r for _, r in mine]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    results = dict(pair for part in gathered for pair in part)
    return [results[i] for i in range(len(items))]
