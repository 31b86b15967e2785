"""`python fsdp_on_cpu.py ARGS` = `gravity-sparse ARGS`, with accelerate's FSDP path allowed on CPU.

accelerate 1.16 turns an FSDP config into FSDP only for accelerator devices (AcceleratorState sets
distributed_type FSDP for MULTI_GPU/NPU/XPU/..., never for MULTI_CPU): on CPU the same config silently
trains with DDP. torch's FSDP2 itself runs on CPU with gloo. This shim lifts that one gate, so the test
runs accelerate's and the Trainer's real FSDP2 preparation and our heal code on CPU. Test-only.
"""

import sys

import accelerate.state as state

_init = state.AcceleratorState.__init__


def _init_allowing_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
        self.distributed_type = state.DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


state.AcceleratorState.__init__ = _init_allowing_cpu_fsdp

if __name__ == "__main__":
    from gravity_sparse.cli import main

    sys.exit(main(sys.argv[1:]))
