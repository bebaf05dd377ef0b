"""metrics.jsonl across a resume: one record per iteration, the resumed run's."""

from __future__ import annotations

import json

from megatron_subnet.training.metrics import MetricsLogger


def test_a_resume_replaces_what_the_interrupted_run_wrote_after_its_checkpoint(tmp_path):
    """Killed at step 5 after the checkpoint of step 3 (a line cut short at the end): resuming at 3 keeps steps
    1-3 and the evaluation at 3, drops steps 4-5, the test loss and the broken line, then appends."""
    records = [{"iteration": 0, "valid_loss": 9.0}, *({"iteration": i, "loss": 10.0 - i} for i in range(1, 6)),
               {"iteration": 3, "valid_loss": 7.5}, {"iteration": 3, "test_loss": 7.6}]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iteration": 6, "lo')
    logger = MetricsLogger(tmp_path, True, total_iters=6, start_iter=3)
    logger.log({"iteration": 4, "loss": 5.5, "lr": 1e-3, "tokens_per_s": 1.0})
    logger.close(plot=False)
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert got == [records[0], records[1], records[2], records[3], records[6],
                   {"iteration": 4, "loss": 5.5, "lr": 1e-3, "tokens_per_s": 1.0}]  # fmt: skip


def test_a_fresh_or_unresumed_run_keeps_its_rules(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"iteration": 7, "loss": 1.0}) + "\n")
    MetricsLogger(tmp_path, True, total_iters=9).close(plot=False)  # start_iter 0: appends, drops nothing
    assert path.read_text().count("\n") == 1
    MetricsLogger(tmp_path, True, total_iters=9, fresh=True).close(plot=False)
    assert path.read_text() == ""
