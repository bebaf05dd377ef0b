"""Model FLOPs and MFU of a training run: the student's and the teacher's, per device and cumulative.

MFU follows PaLM's definition: model FLOPs (forward + backward = 3x the forward, recomputation not counted)
per second per device, over the device's peak (``peak.py``). A KD step also runs the teacher's forward; it is
reported apart (``teacher_tflops``) and in ``total_mfu``, the fraction of the step the device would be busy
at its peak doing both models' work (each at the peak of the dtype it runs in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_subnet.model.config import ModelConfig
from megatron_subnet.model.flops import forward_flops_per_token, training_flops_per_token
from megatron_subnet.training.peak import peak_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class FlopsMeter:
    """FLOPs per token of the whole job (all ranks together) and the per-device peaks they are measured against."""

    student_per_token: float  # model FLOPs of a training step per token: 3x forward
    hardware_per_token: float  # what the device actually computes: with recomputation
    teacher_per_token: float  # the teacher's forward per token (0 without a teacher)
    devices: int
    student_peak: float  # FLOP/s of one device in the student's dtype
    teacher_peak: float
    peak_source: str

    @classmethod
    def build(
        cls, student: ModelConfig, teacher: ModelConfig | None, seq_length: int, devices: int, device: torch.device,
        student_dtype: str, teacher_dtype: str, recompute: str | None = None, peak_tflops: float | None = None,
    ) -> FlopsMeter:  # fmt: skip
        student_peak, source = peak_flops(device, DTYPES[student_dtype], peak_tflops)
        teacher_peak = student_peak
        if teacher is not None and teacher_dtype != student_dtype:
            teacher_peak, teacher_source = peak_flops(device, DTYPES[teacher_dtype], peak_tflops)
            source = f"{source}; teacher ({teacher_dtype}): {teacher_source}"
        return cls(
            student_per_token=training_flops_per_token(student, seq_length),
            hardware_per_token=training_flops_per_token(student, seq_length, recompute),
            teacher_per_token=forward_flops_per_token(teacher, seq_length) if teacher is not None else 0.0,
            devices=devices, student_peak=student_peak, teacher_peak=teacher_peak, peak_source=source,
        )  # fmt: skip

    def rates(self, tokens: float, seconds: float) -> dict[str, float]:
        """Per device over a window of ``tokens`` (the whole job's) in ``seconds``: model TFLOP/s and MFU of the
        student, the teacher's forward TFLOP/s, and the MFU of both."""
        per_device = tokens / max(seconds, 1e-12) / self.devices
        student = self.student_per_token * per_device
        teacher = self.teacher_per_token * per_device
        mfu = student / self.student_peak
        return {
            "model_tflops": student / 1e12,
            "mfu": mfu,
            "hardware_tflops": self.hardware_per_token * per_device / 1e12,
            "teacher_tflops": teacher / 1e12,
            "total_mfu": mfu + teacher / self.teacher_peak,
        }

    def totals(self, tokens: float) -> dict[str, float]:
        """Cumulative FLOPs after ``tokens`` training tokens: the student's training (model FLOPs) and the
        teacher's forwards, for compute accounting."""
        return {"train_flops": self.student_per_token * tokens, "teacher_flops": self.teacher_per_token * tokens}
