"""Your own task family, end to end: the same commands as for Meta-World, on a suite you register.

The family is ``reacher`` from ``reacher_suite.py`` beside this file: Gymnasium's MuJoCo
Reacher-v5 with a hidden goal per task (50 training goals, 10 held-out ones). Importing that
module registers it; the console script finds it through ``IMPROVER_PLUGINS``:

    export IMPROVER_PLUGINS=examples/reacher_suite.py
    improver generate --suite reacher --out runs/reacher/train --tasks 50
    improver generate --suite reacher --split test --out runs/reacher/heldout --tasks 10
    improver meta-train --data runs/reacher/train --out runs/reacher/run --token-stride 1 --steps 3000 --lr 3e-3 --distill-weight 0
    improver improve --suite reacher --policy SAVED_POLICY --improver runs/reacher/run/improver --mode behaviour

This script runs the first three and improves the held-out zoo policies that mostly fail:

    python examples/own_env.py                      # about 40 minutes on 2 busy CPU cores (39 of them meta-training)
    python examples/own_env.py --improver runs/reacher/run/improver   # reuse a trained improver
"""

from __future__ import annotations

import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reacher_suite  # noqa: E402  (registers the suite "reacher")
from meta_train_and_improve import Args, main  # noqa: E402

DEFAULTS = Args(
    suite=reacher_suite.NAME, out=Path("runs/reacher"), train_tasks=50, heldout_tasks=10, meta_steps=3000, token_stride=1, lr=3e-3
)

if __name__ == "__main__":
    main(tyro.cli(Args, default=DEFAULTS))
