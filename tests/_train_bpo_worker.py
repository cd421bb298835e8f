"""Worker of tests/test_train_bpo.py::test_bpo_two_ranks_when_one_rank_gets_no_batch (torchrun, 2 ranks, gloo):
rank 1's rollouts all fail (bpo_rollouts raises, as when every prompt is refused) while rank 0's succeed; with a
reference model and two mini-batches per rollout the ranks must still run the same collectives. Prints one line per
rank with the logged metrics it needs."""

from __future__ import annotations

import faulthandler
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.dirname(__file__))

import r4b.engine.train.bpo as bpo  # noqa: E402


def main() -> None:
    cfg = bpo.BPOConfig(**json.loads(sys.argv[1]))
    faulthandler.dump_traceback_later(90, exit=True)  # a hang fails the test in time, with every stack printed
    trainer = bpo.BPOTrainer(cfg)
    real = bpo.bpo_rollouts

    def fails_on_rank_1(*args, **kwargs):
        if trainer.dist.rank == 1:
            raise ValueError("no prompt could be rolled out (2 skipped)")
        return real(*args, **kwargs)

    bpo.bpo_rollouts = fails_on_rank_1
    try:
        last = trainer.train()
    finally:
        trainer.close()
    # one os.write of a short line: atomic on a pipe, so the two ranks' lines never run together (print's separate
    # writes of the text and the newline did, once in CI: "...sequences 8.0rank 1 done: ...")
    line = (f"rank {trainer.dist.rank} done: steps {trainer.step} skipped {last.get('rollout_skipped_prompts')} "
            f"sequences {last.get('rollout_sequences')}\n")
    sys.stdout.flush()
    os.write(1, line.encode())
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
