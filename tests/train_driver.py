"""One `train()` run in its own process, for tests that stop runs with signals (run by
test_train_resume.py and test_train_multihost.py).

    python tests/train_driver.py CONFIG_JSON [--resume] [--signal-at STEP NAME [--after-save S]]
        [--coordinator HOST:PORT --num-processes N --process-id I --devices D]

`--signal-at 10 SIGTERM` sends the process that signal from inside the loop right after step 10's
metrics arrive (what a scheduler's preemption or `kill -9` would do, at a known step); with
`--after-save 8`, once the checkpoint of step 8 is committed. Prints `RESULT {summary as JSON}`
when `train` returns.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--signal-at", nargs=2, metavar=("STEP", "NAME"))
    parser.add_argument("--after-save", type=int, metavar="STEP")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--devices", type=int, default=1, help="CPU devices of this process")
    ns = parser.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", ns.devices)
    jax.config.update("jax_default_matmul_precision", "highest")
    if ns.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from retnet_jax.train import distributed

        distributed.initialize(ns.coordinator, ns.num_processes, ns.process_id)

    from retnet_jax.train import TrainConfig, train

    cfg = TrainConfig.from_dict(json.loads(ns.config))
    hook = None
    if ns.signal_at:
        at, name = int(ns.signal_at[0]), signal.Signals[ns.signal_at[1]]
        committed = Path(cfg.workdir) / "checkpoints" / str(ns.after_save)

        def hook(step, metrics):
            if step == at:
                deadline = time.monotonic() + 60
                while ns.after_save is not None and not committed.is_dir() and time.monotonic() < deadline:
                    time.sleep(0.01)  # orbax renames the folder into place when the save commits
                os.kill(os.getpid(), name)

    summary = train(cfg, resume=ns.resume, progress=False, on_step=hook)
    print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
