"""``python -m train ...`` (also ``accelerate launch -m train ...``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Optional


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the command line, train, export; returns the exit status."""
    from train.config import parse_args
    from train.trainer import train

    cfg = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(cfg)
    logging.getLogger("train").info("model folder ready for the Hub: %s", result.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
