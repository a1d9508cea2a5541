"""DeepSpeed on CPU processes, for the tests: a stand-in for a machine with GPUs.

Put this folder first on PYTHONPATH of a run started by ``accelerate launch`` (or torchrun) with
``DS_ACCELERATOR=cpu``. DeepSpeed then runs its CPU accelerator over gloo, and accelerate, which sends
a CPU run to its own multi-CPU path and has no backend for DeepSpeed without CUDA, is told to use
DeepSpeed with gloo. Everything else is the real code: accelerate's DeepSpeed preparation, ZeRO's
partitioning at load (zero.Init), its optimizer, gathers and sharded checkpoints, and the project's run.
"""

import os

if os.environ.get("DS_ACCELERATOR") == "cpu" and os.environ.get("LOCAL_RANK") is not None:
    import accelerate
    import accelerate.state
    from accelerate.utils import DistributedType

    _init = accelerate.Accelerator.__init__
    _backend = accelerate.state.PartialState._prepare_backend

    def _deepspeed_on_cpu(self, *args, **kwargs):
        if kwargs.get("deepspeed_plugin") is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
            kwargs["cpu"] = False  # a CPU run would never reach the DeepSpeed path
        _init(self, *args, **kwargs)

    def _gloo(self, cpu=False, sagemaker_dp=False, backend=None):
        name, kind = _backend(self, cpu, sagemaker_dp, backend)
        if name is None and not cpu:  # no CUDA: the processes talk over gloo
            return "gloo", DistributedType.MULTI_CPU
        return name, kind

    accelerate.Accelerator.__init__ = _deepspeed_on_cpu
    accelerate.state.PartialState._prepare_backend = _gloo
