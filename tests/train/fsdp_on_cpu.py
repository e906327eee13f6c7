"""Test-only entry point: `python -m tests.train.fsdp_on_cpu train ...` is `python -m zeroconv train ...` with FSDP
on CPU processes (gloo), so accelerate's own FSDP2 code (prepare's fully_shard, save_state/load_state through DCP,
get_state_dict) runs on a machine without GPUs.

Why a switch is needed: accelerate 1.15 turns an FSDP launch into DistributedType.FSDP only for GPU-like devices
(AcceleratorState.__init__ sets it inside the MULTI_GPU/MULTI_NPU/... branch, never for MULTI_CPU), though FSDP2,
DCP and the state-dict gathers all run on CPU with gloo. After accelerate has built its state from the launch's
FSDP config (the plugin comes from the FSDP_* variables `accelerate launch` sets), this sets the distributed type
to FSDP and keeps the plugin. The type is set in PartialState's shared state as well: every later
`AcceleratorState()` copies PartialState's attributes over its own, and would turn it back into MULTI_CPU.
Without it, `accelerate launch --config_file configs/accelerate/fsdp.yaml` with ACCELERATE_USE_CPU=1 silently runs
plain MULTI_CPU data parallelism (no sharding). Setting the type on AcceleratorState alone is not enough: prepare
shards, but save_state then sees MULTI_CPU again and takes the unsharded branch, failing in
clean_state_dict_for_safetensors ("RuntimeError: Attempted to access the data pointer on an invalid python
storage"). Nothing in zeroconv knows about this switch; shipping code never imports it.

With ZEROCONV_TEST_RECORD_VALIDATION set, each validation also writes the weights it samples with (the state dict
of the ControlNet run_validation is given, on the main process) to output_dir/validated/step-N.safetensors, so a
test can tell which weights a launched run validated.
"""

import os
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.fsdp_plugin = fsdp_plugin
        self.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


AcceleratorState.__init__ = _init_with_fsdp_on_cpu


def _record_validated_weights():
    from pathlib import Path

    from safetensors.torch import save_file

    from zeroconv.train import validate

    run_validation = validate.run_validation

    def recording(t, step, controlnet):
        folder = Path(t.cfg.output_dir) / "validated"
        folder.mkdir(exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in controlnet.state_dict().items()},
                  folder / f"step-{step}.safetensors")
        return run_validation(t, step, controlnet)

    validate.run_validation = recording  # TrainingRun.validate imports it from the module at each call


if os.environ.get("ZEROCONV_TEST_RECORD_VALIDATION"):
    _record_validated_weights()

if __name__ == "__main__":
    from zeroconv.cli import main

    sys.exit(main(sys.argv[1:]))
