"""The train stage under Accelerate's FSDP2 path, on CPUs (run by accelerate launch, one
per process): `accelerate launch ... benchmarks/fsdp_on_cpu.py KEY=VALUE ...`. Used by
the tests and by the GPU check's CPU mode.

Accelerate turns FSDP on only for accelerators: on CPUs (gloo) its state maps an FSDP
launch to plain multi-process DDP. This stands in for the GPU: it sets what `accelerate
launch --config_file configs/accelerate/fsdp.yaml` sets in the environment, and after
Accelerate's state is made on a CPU it takes the branch Accelerate takes on GPUs (the
distributed type FSDP, the plugin it was given, the plugin's mixed precision). Everything
else is the real path: Accelerator.prepare's FSDP2 wrapping, its gradient scaling and
autocast choices, the train stage's loop and checkpoints.
"""

import os
import sys

FSDP_YAML_ENV = {  # configs/accelerate/fsdp.yaml, as accelerate launch exports it
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "TransformerBlock",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
    "FSDP_OFFLOAD_PARAMS": "false",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
    "FSDP_ACTIVATION_CHECKPOINTING": "false",
}


def fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    made = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        made(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP  # accelerate/state.py, GPU branch
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


if __name__ == "__main__":
    os.environ.update(FSDP_YAML_ENV)
    fsdp_on_cpu()
    from pipeline.train import main

    main(sys.argv[1:])
