"""Training adapters on the runtime's own model: LoRA, QLoRA (an NF4 base), DoRA and QLoRA + DoRA.

`train(base, data, ...)` (loop.py) returns a PEFT adapter with lineage annotations; data.py reads JSONL
examples, init.py initialises as PEFT does, checkpoint.py writes resumable checkpoints atomically, and
plan.py estimates the memory of a run from the model config alone. train/ imports the runtime and
`adapter`, never the registry: the CLI pushes the result (cli/train_cmds.py).
"""

from adapterhub.train.config import TrainConfig
from adapterhub.train.loop import TrainedAdapter, train

__all__ = ["TrainConfig", "TrainedAdapter", "train"]
