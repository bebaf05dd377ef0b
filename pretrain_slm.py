"""Pretrain a small language model from a sub-network of a teacher, with online distillation.

    deepspeed --num_gpus 2 pretrain_slm.py --ds_config examples/ds_config_zero1.json \\
        --teacher-load ckpt/teacher --subnet best_subnet.json --data-path data/demo_text_document \\
        --micro-batch-size 4 --global-batch-size 32 --seq-length 512 --train-iters 1000 --save ckpt/student

Runs unchanged under `deepspeed`, `torchrun` and `mpirun -np N python pretrain_slm.py`. The student's weights
come from `--parent-load` (default: the teacher); `--bf16`, `--teacher-dtype`, `--recompute-granularity` and
`--compile` choose precision and speed; every log line carries MFU (`--help` lists every flag).
"""

import sys

from megatron_subnet.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
