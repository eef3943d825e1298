"""`python -m tests.fsdp_cpu ARGS...`: the `desta` command with accelerate's FSDP on CPU processes (gloo).

accelerate turns `distributed_type: FSDP` into plain multi-process CPU training, because it enables FSDP
only on GPU-like devices; PyTorch's FSDP2 itself runs on CPU with gloo. This keeps the FSDP plugin that
`accelerate launch --config_file recipes/accelerate/fsdp.yaml` sets up, so the tests run the recipe's FSDP
path (sharded parameters, sharded checkpoints, resume) on CPU.
"""

import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_keeping_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_keeping_fsdp

if __name__ == "__main__":
    from desta.cli import main

    sys.exit(main())
