"""One rank of a multi-process training run: ``torchrun ... -m forge._dist_train CONFIG.json``.

``forge train --num-processes N`` starts these through torch.distributed.run; every rank runs the
same train stage, the Trainer shards the data, and only rank 0 writes progress, checkpoints' extras,
the adapter and metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from forge.progress import quiet_libraries
    from forge.train import TrainConfig, train

    quiet_libraries()
    path = Path((argv if argv is not None else sys.argv[1:])[0])
    config = TrainConfig.model_validate(json.loads(path.read_text(encoding="utf-8")))
    try:
        train(config)
    finally:
        import torch.distributed as dist

        # A process group left to the interpreter's exit can abort the rank there ("terminate called
        # without an active exception", SIGABRT) after the run succeeded, failing it: end it here.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
