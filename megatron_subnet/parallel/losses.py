"""Language-model and distillation losses (fp32 math, mean over tokens), on full or vocab-parallel logits.

Under tensor parallelism the output layer is column-parallel over the vocabulary: TP rank ``r`` holds
the logits of vocabulary ids ``[r * v, (r + 1) * v)`` where ``v`` is the last dimension it sees.
``cross_entropy`` and ``distillation_loss`` take such slices (of the student and of the teacher) and
global label ids, return the same value on every TP rank, and give each rank the gradient of its own
slice; no rank ever builds a whole-vocabulary row. Only the per-token normalisers (max, then sum of
exponentials), the loss sums and, for ``topk_kl``, the teacher's top-k candidates and the student's
logits at the selected ids cross ranks (``mappings.all_reduce`` / ``mappings.all_gather_last_dim``).
With one TP rank every function computes exactly what it computed before tensor parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_subnet.parallel import mappings, state

KD_LOSSES = ("forward_kl", "reverse_kl", "topk_kl")
# Temperatures at which the fp32 loss stays finite and meaningful: T^2 <= 1e4, logits / T at most 10x the logits.
KD_TEMPERATURE_RANGE = (0.1, 100.0)

# Logits per token chunk of the fused losses, by device type: on a CPU about 8 MB of fp32, so a chunk's
# temporaries stay in cache; on an accelerator 256 MB (1,365 tokens of a 49,152-token vocabulary), a few large
# kernels per micro-batch instead of hundreds of small ones, within a bounded memory.
_CHUNK_ELEMENTS_BY_DEVICE = {"cpu": 1 << 21}
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 26


def _chunk_rows(vocab: int, device: torch.device) -> int:
    """Tokens per chunk for logits of ``vocab`` columns on ``device``."""
    return max(1, _CHUNK_ELEMENTS_BY_DEVICE.get(device.type, _ACCELERATOR_CHUNK_ELEMENTS) // vocab)


def _vocab_slice(vocab: int) -> tuple[int, int]:
    """(TP world size, first global vocabulary id of this rank's slice of ``vocab`` ids)."""
    return state.get_tensor_model_parallel_world_size(), state.get_tensor_model_parallel_rank() * vocab


def _local_labels(labels: torch.Tensor, first: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each global label in this rank's slice (clamped into it) and whether the rank owns it."""
    local = labels - first
    owned = (local >= 0) & (local < vocab)
    return local.clamp_(0, vocab - 1), owned


def _log_softmaxes(s, t, temperature, world):
    """Log-softmax of student ``s``, of ``s / T`` and of teacher ``t / T`` over the whole (sharded) vocabulary.

    ``t`` None: only the first. Returns (log_q, log_qt, log_p), log_qt is log_q when ``T == 1``.
    """
    T = temperature
    if world == 1:
        log_q = torch.log_softmax(s, dim=-1)
        if t is None:
            return log_q, None, None
        log_qt = log_q if T == 1.0 else torch.log_softmax(s / T, dim=-1)
        return log_q, log_qt, torch.log_softmax(t / T, dim=-1)
    # TP: global max (one MAX all-reduce), then every sum of exponentials (one SUM all-reduce)
    m = torch.stack([s.amax(-1)] if t is None else [s.amax(-1), t.amax(-1)], dim=-1)
    mappings.all_reduce(m, dist.ReduceOp.MAX)
    parts = [s - m[:, :1]]  # max(s / T) = max(s) / T for T > 0
    if t is not None:
        if T != 1.0:
            parts.append(parts[0] / T)
        parts.append((t - m[:, 1:]).div_(T))
    lse = torch.stack([x.exp().sum(-1) for x in parts], dim=-1)
    mappings.all_reduce(lse)
    lse.log_()
    for i, x in enumerate(parts):
        x.sub_(lse[:, i : i + 1])
    if t is None:
        return parts[0], None, None
    return parts[0], parts[1] if T != 1.0 else parts[0], parts[-1]


def _vocab_parallel_topk(s, t, k, first):
    """The teacher's global top-``k`` ids per token from vocab-parallel slices ``s``/``t`` (fp32).

    Each rank offers its local top-k (values and global ids), all ranks gather the ``TP * k``
    candidates and pick the same ``k``: by value, descending, ties to the smaller global id (so for
    distinct values the selection and its order are those of ``torch.topk`` on the whole row). Returns
    (column in this slice, owned by this rank, student logits at the ids, teacher logits at the ids),
    the logits ``[tokens, k]`` identical on every rank.
    """
    n, vocab = t.shape
    local_k = min(k, vocab)
    values, index = t.topk(local_k, dim=-1)
    # one gather of values and ids: fp32 values and integer ids below 2**53 are exact in fp64
    packed = torch.cat([values.double(), (index + first).double()], dim=-1)
    gathered = mappings.all_gather_last_dim(packed).view(n, -1, 2, local_k)
    cand_v, cand_i = gathered[:, :, 0].flatten(1), gathered[:, :, 1].flatten(1)
    by_id = cand_i.argsort(dim=-1)
    cand_v, cand_i = cand_v.gather(1, by_id), cand_i.gather(1, by_id)
    top = cand_v.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    t_k = cand_v.gather(1, top).to(t.dtype)
    local, owned = _local_labels(cand_i.gather(1, top).long(), first, vocab)
    s_k = s.gather(1, local).masked_fill_(~owned, 0.0)
    mappings.all_reduce(s_k)  # exactly one rank contributes each value
    return local, owned, s_k, t_k


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy, mean (or ``reduction="sum"``) over tokens; ``logits [b, s, v]``, ``labels [b, s]``.

    Under TP ``logits`` is this rank's vocabulary slice and ``labels`` are global ids; the value is
    the same on every rank and the gradient is that of the slice.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy reduction {reduction!r}: expected 'mean' or 'sum'")
    if state.get_tensor_model_parallel_world_size() == 1:
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction=reduction)
    return _VocabParallelCrossEntropy.apply(logits, labels, reduction == "mean")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy on vocab-parallel logits, in token chunks; keeps only the per-token log-sum-exp."""

    @staticmethod
    def forward(ctx, logits, labels, mean):
        x = logits.detach().flatten(0, -2)
        y = labels.flatten()
        n, vocab = x.shape
        _, first = _vocab_slice(vocab)
        lse = torch.empty(n, dtype=torch.float32, device=x.device)
        lse_sum = torch.zeros((), dtype=torch.float64, device=x.device)  # the same on every rank
        target_sum = torch.zeros((), dtype=torch.float64, device=x.device)  # this rank's labels only
        chunk = _chunk_rows(vocab, x.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            s_c = x[rows].float()
            m = s_c.amax(-1, keepdim=True)
            mappings.all_reduce(m, dist.ReduceOp.MAX)
            e = (s_c - m).exp_().sum(-1, keepdim=True)
            mappings.all_reduce(e)
            lse_c = e.log_().add_(m).squeeze(1)
            lse[rows] = lse_c
            lse_sum += lse_c.sum(dtype=torch.float64)
            local, owned = _local_labels(y[rows], first, vocab)
            target_sum += s_c.gather(1, local[:, None]).squeeze(1).masked_fill_(~owned, 0.0).sum(dtype=torch.float64)
        mappings.all_reduce(target_sum)  # the owner of each label contributed its logit, the others 0
        ctx.save_for_backward(logits, labels, lse)
        ctx.mean = mean
        total = lse_sum - target_sum
        return (total / n if mean else total).float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        logits, labels, lse = ctx.saved_tensors
        x = logits.detach().flatten(0, -2)
        y = labels.flatten()
        n, vocab = x.shape
        _, first = _vocab_slice(vocab)
        scale = grad_loss / n if ctx.mean else grad_loss
        grad = torch.empty_like(x)
        chunk = _chunk_rows(vocab, x.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            g = (x[rows].float() - lse[rows, None]).exp_()  # softmax of this slice
            local, owned = _local_labels(y[rows], first, vocab)
            g.scatter_add_(1, local[:, None], -owned[:, None].to(g.dtype))
            grad[rows] = g.mul_(scale)
        return grad.view(logits.shape), None, None


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    topk: int = 64,
) -> torch.Tensor:
    """KL divergence between temperature-softened teacher and student distributions, mean over tokens.

    ``forward_kl`` is KL(teacher || student), ``reverse_kl`` is KL(student || teacher), ``topk_kl`` is the
    forward KL with both distributions renormalised over the teacher's ``topk`` most likely tokens.
    The caller scales by ``temperature ** 2``. A plain autograd reference on whole-vocabulary logits
    (single process; it knows nothing of tensor parallelism): training uses ``distillation_loss``.
    """
    s = student_logits.float() / temperature
    t = teacher_logits.detach().float() / temperature
    if kind == "topk_kl":
        values, index = t.topk(min(topk, t.shape[-1]), dim=-1)
        t, s = values, s.gather(-1, index)
    elif kind not in ("forward_kl", "reverse_kl"):
        raise ValueError(f"kd loss {kind!r}: expected one of {', '.join(KD_LOSSES)}")
    log_s, log_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    if kind == "reverse_kl":
        per_token = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)
    else:
        per_token = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
    return per_token.mean()


class _DistillationLoss(torch.autograd.Function):
    """``(1 - alpha) * CE + alpha * T^2 * KL`` (CE alone without teacher logits), whose gradient is written
    during the forward pass.

    The vocabulary is walked in token chunks: one log-softmax of the student serves both terms, and
    ``(1 - alpha) * (q - onehot) + alpha * T * dKL/dz`` goes straight into one saved gradient buffer, so
    no full-size intermediate outlives its chunk. ``kd_loss`` and ``cross_entropy`` are the reference.

    Vocab-parallel (TP > 1), per chunk: the log-softmax normalisers are all-reduced (MAX, then SUM of
    exponentials), reverse KL's per-token sums are all-reduced (its gradient needs them), ``topk_kl``
    selects the global top-k (``_vocab_parallel_topk``); the gradient stays local. The CE sum (each
    label's owner contributes) and the forward-KL sum are all-reduced once at the end.
    """

    @staticmethod
    def forward(ctx, logits, labels, teacher_logits, alpha, kind, temperature, topk):
        if kind not in KD_LOSSES:
            raise ValueError(f"kd loss {kind!r}: expected one of {', '.join(KD_LOSSES)}")
        s = logits.detach().flatten(0, -2)
        t = None if teacher_logits is None else teacher_logits.detach().flatten(0, -2)
        y = labels.flatten()
        n, vocab = s.shape
        world, first = _vocab_slice(vocab)
        T = temperature
        grad = torch.empty((n, vocab), dtype=torch.float32, device=s.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=s.device)
        kl_sum = torch.zeros((), dtype=torch.float64, device=s.device)
        chunk = _chunk_rows(vocab, s.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            s_c, y_c, g = s[rows].float(), y[rows], grad[rows]
            t_c = None if t is None else t[rows].float()
            log_q, log_qt, log_p = _log_softmaxes(s_c, None if kind == "topk_kl" else t_c, T, world)
            if world == 1:
                ce_sum += -log_q.gather(1, y_c[:, None]).sum()
                torch.exp(log_q, out=g)
                g[torch.arange(g.shape[0], device=g.device), y_c] -= 1.0
            else:  # only the owner of a label picks its log-probability and subtracts the one-hot
                local, owned = _local_labels(y_c, first, vocab)
                ce_sum += -log_q.gather(1, local[:, None]).squeeze(1).masked_fill_(~owned, 0.0).sum()
                torch.exp(log_q, out=g)
                g.scatter_add_(1, local[:, None], -owned[:, None].to(g.dtype))
            if t_c is None:
                continue  # plain cross-entropy: q - onehot
            index = owned_k = None
            if kind == "topk_kl":
                if world == 1:
                    index = t_c.topk(min(topk, vocab), dim=-1).indices
                    s_k, t_k = s_c.gather(1, index), t_c.gather(1, index)
                else:
                    index, owned_k, s_k, t_k = _vocab_parallel_topk(s_c, t_c, min(topk, vocab * world), first)
                log_qt = torch.log_softmax(s_k / T, dim=-1)
                log_p = torch.log_softmax(t_k / T, dim=-1)
            if kind == "reverse_kl":
                qt = log_qt.exp()
                log_ratio = log_qt - log_p
                per_token = (qt * log_ratio).sum(-1)
                mappings.all_reduce(per_token)  # TP: partial sums over the slices
                dkl = qt.mul_(log_ratio.sub_(per_token[:, None]))
            else:
                p = log_p.exp()
                per_token = (p * (log_p - log_qt)).sum(-1)  # forward_kl under TP: partial, reduced at the end
                dkl = (log_qt.exp() if log_qt is not log_q else torch.exp(log_q)).sub_(p)
            kl_sum += per_token.sum()
            g.mul_(1.0 - alpha)  # (1 - a)(q - onehot) + a T dKL/dz
            if index is None:
                g.add_(dkl, alpha=alpha * T)
            else:
                dkl.mul_(alpha * T)
                if owned_k is not None:
                    dkl.masked_fill_(~owned_k, 0.0)  # each rank scatters the selected ids it owns
                g.scatter_add_(1, index, dkl)
        if world > 1:
            # CE: each label's owner contributed; forward KL: each slice's share (reverse KL and top-k
            # KL are already the same on every rank)
            sums = torch.stack([ce_sum, kl_sum if kind == "forward_kl" else torch.zeros_like(kl_sum)])
            mappings.all_reduce(sums)
            ce_sum = sums[0]
            if kind == "forward_kl":
                kl_sum = sums[1]
        ce, kl = (ce_sum / n).float(), (kl_sum / n).float()
        loss = (1.0 - alpha) * ce + alpha * T * T * kl
        ctx.save_for_backward(grad)
        ctx.settings = (n, logits.dtype, logits.shape)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        if ctx.settings is None:
            raise RuntimeError("distillation_loss: a second backward pass through the same loss is not supported")
        (grad,) = ctx.saved_tensors
        n, dtype, shape = ctx.settings
        ctx.settings = None  # the buffer is scaled in place below
        return grad.mul_(grad_loss / n).view(shape).to(dtype), None, None, None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    alpha: float,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    topk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(1 - alpha) * CE + alpha * T^2 * KL``; returns (loss, CE, KL or None).

    Under TP both logits are this rank's vocabulary slice, ``labels`` global ids; every rank gets the
    same values and the gradient of its slice.
    """
    if teacher_logits is None or alpha == 0.0:
        loss, ce, _ = _DistillationLoss.apply(student_logits, labels, None, 0.0, kind, temperature, topk)
        return loss, ce, None
    return _DistillationLoss.apply(student_logits, labels, teacher_logits, alpha, kind, temperature, topk)
