"""``torchrun --nproc_per_node=K -m diffiml.train --config ... --data ... --out ...``: data-parallel training."""

import sys

from diffiml.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
