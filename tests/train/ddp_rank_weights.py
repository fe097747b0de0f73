"""Run `train run` under torchrun with each rank also saving its own final LoRA tensors, so that a test can
compare the ranks' weights itself instead of trusting the run's own check:

python -m torch.distributed.run --nproc_per_node 2 -m tests.train.ddp_rank_weights OUT_DIR train-run-args...

Each rank writes OUT_DIR/rank{N}.safetensors (fp32 copies) at the moment the run checks that ranks agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

import train.run
from train.cli import app

out = Path(sys.argv.pop(1))
checked = train.run.check_ranks_agree


def saving_then_checking(accelerator, params) -> None:
    tensors = {name: p.detach().float().cpu().contiguous() for name, p in params.items()}
    save_file(tensors, str(out / f"rank{accelerator.process_index}.safetensors"))
    checked(accelerator, params)


train.run.check_ranks_agree = saving_then_checking
app()
