"""DeepSpeed and FSDP on CPU processes, for the tests: a stand-in for a machine with GPUs.

Put this folder first on PYTHONPATH of a run started by ``accelerate launch`` (or torchrun) with
``SHARDED_ON_CPU=1`` (and, for DeepSpeed, its own ``DS_ACCELERATOR=cpu``). accelerate sends a CPU run down
its multi-CPU path, which knows neither engine, and finds no backend without CUDA. This stand-in makes three
changes: the processes talk over gloo; a DeepSpeed run is not marked as a CPU one (``cpu=False``), so that it
reaches accelerate's DeepSpeed path; a run given an FSDP plugin becomes an FSDP run, as it would on GPUs.
Everything else is the real code: accelerate's preparation, the engines' sharding (ZeRO's partitioning at
load, FSDP2's ``fully_shard`` of each layer), their optimizers, gathers and sharded checkpoints, and the
project's run. DeepSpeed and torch's FSDP2 both run on CPU tensors over gloo.
"""

import os

if os.environ.get("SHARDED_ON_CPU") == "1" and os.environ.get("LOCAL_RANK") is not None:
    import accelerate
    import accelerate.state
    from accelerate.utils import DistributedType

    _init = accelerate.Accelerator.__init__
    _backend = accelerate.state.PartialState._prepare_backend
    _state_init = accelerate.state.AcceleratorState.__init__

    def _deepspeed_on_cpu(self, *args, **kwargs):
        if kwargs.get("deepspeed_plugin") is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
            kwargs["cpu"] = False  # a CPU run would never reach the DeepSpeed path
        _init(self, *args, **kwargs)

    def _gloo(self, cpu=False, sagemaker_dp=False, backend=None):
        name, kind = _backend(self, cpu, sagemaker_dp, backend)
        if name is None and not cpu:  # no CUDA: the processes talk over gloo
            return "gloo", DistributedType.MULTI_CPU
        return name, kind

    def _fsdp_on_cpu(self, *args, **kwargs):
        _state_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # what AcceleratorState does for FSDP on GPUs; PartialState holds the type every later state copies
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    if os.environ.get("SHARDED_EMPTY_ELSEWHERE") == "1" and os.environ.get("RANK", "0") != "0":
        # What transformers before 5.23 left on every process but the main one under FSDP's
        # cpu_ram_efficient_loading: zeros, until accelerate's prepare broadcasts the main process's weights into
        # the model it prepares. Later releases load them on every process, but the option promises no more
        # than the main process's, so the tests hold the project to that.
        import torch
        import transformers

        _from_pretrained = transformers.PreTrainedModel.from_pretrained.__func__

        def _empty_elsewhere(cls, *args, **kwargs):
            loaded = _from_pretrained(cls, *args, **kwargs)
            model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info): output_loading_info
            if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
                with torch.no_grad():
                    for p in model.parameters():
                        p.zero_()
            return loaded

        transformers.PreTrainedModel.from_pretrained = classmethod(_empty_elsewhere)

    accelerate.Accelerator.__init__ = _deepspeed_on_cpu
    accelerate.state.PartialState._prepare_backend = _gloo
    accelerate.state.AcceleratorState.__init__ = _fsdp_on_cpu
