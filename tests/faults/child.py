"""The infalign CLI in a child process with one fault armed (used by ``tests/faults``)::

    python child.py SPEC CLI-ARGS...

SPEC (JSON): ``{"reward_calls": N, "signal": "SIGINT" | "SIGTERM" | "SIGKILL"}`` sends the signal to
this process in reward call N + 1 (``tiny_assets.FAULTS``); ``{"kill_in_save": N}`` kills it with
SIGKILL right after the N-th ``torch.save`` (a checkpoint's ``trainer_state.pt``, written into the
temp directory, before the rename). SIGINT and SIGTERM start at Python's defaults, whatever the
test process inherited, and torch uses one thread as in the tests. (Guarded by ``__main__``: a
``run --jobs`` spawns workers that import this module.)
"""

import json
import os
import signal
import sys

import torch


def _main() -> int:
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    spec = json.loads(sys.argv[1])

    import tiny_assets  # the reward module of the recipe, armed before the run

    if "reward_calls" in spec:
        sig = int(getattr(signal, spec["signal"]))
        tiny_assets.FAULTS.update(interrupt_after=spec["reward_calls"], signal=sig)
    if "kill_in_save" in spec:
        real_save, left = torch.save, [int(spec["kill_in_save"])]

        def save(*args, **kwargs):
            real_save(*args, **kwargs)
            left[0] -= 1
            if left[0] <= 0:
                os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save

    from infalign.cli import main

    return main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(_main())
