"""``pretrain_slm.py``: its flags parsed into a ``TrainConfig`` and run by a ``Trainer``; errors are one
``error:`` line and exit 2, an aborted run (nothing useful trained) exit 2, Ctrl-C exit 130."""

from __future__ import annotations

from collections.abc import Sequence

from megatron_subnet.arguments import parse_config
from megatron_subnet.cli import report, run_main
from megatron_subnet.training.trainer import Callback, Trainer, TrainingAborted


def main(argv: list[str] | None = None, callbacks: Sequence[Callback] = ()) -> int:
    """Run ``pretrain_slm.py`` with ``argv`` (default: the command line); ``callbacks`` observe the run."""

    def pretrain(argv: list[str] | None) -> int:
        config = parse_config(argv)
        try:
            return Trainer(config, callbacks).run()
        except TrainingAborted as e:
            report(e, 2)
            return 2

    return run_main(pretrain, argv)
