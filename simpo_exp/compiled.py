"""``torch.compile`` for training (``hardware.compile``), and telling compile steps from timed ones.

What is compiled: each decoder layer on its own (``nn.Module.compile``, in place), with dynamic shapes,
since every batch has a different length. The layers of a model share their code, so one graph serves
them all (dynamo lifts their parameters to graph inputs), and compiling in place keeps the module tree,
and so the ``state_dict`` keys, exactly as they were: a checkpoint written with compile loads without it
and back. The embedding, the output head and the project's log-prob reduction stay eager; so does the
project's segment attention (``simpo_exp.logps.segment_attention`` is opaque to dynamo: its per-batch
plan would otherwise be traced into the graph and force a recompile every batch), which splits a layer
into the graphs before and after its attention call.

Under gradient checkpointing transformers wraps a layer's ``forward`` in ``torch.utils.checkpoint``, which
dynamo captures whole, as one region that can contain neither a graph break (the packed layouts' segment
attention) nor a side effect on state outside it: transformers 5's layers set its output-capture context
variable inside, so dynamo gave up on the whole layer in every layout, the padded one included, and the run
trained eagerly while it said it compiled. So under checkpointing the layers' attention blocks and MLPs are
compiled one by one instead (the checkpoint stays eager around them; norms and residual adds between them too).

``CompileWatch`` counts the graphs dynamo builds. A training step during which any were built (the first
step, and any recompilation for a new shape or mode) is a warm-up step: the loop leaves its time out of
``train/step_time_s``, tokens/s and MFU and records it as ``train/compile_warmup_s``. Every run is watched, not
only those under ``hardware.compile``: on a GPU, FlexAttention and Liger's head build their kernels with
torch.compile during the first steps (5-15 s each), which counted as training time where no layout measurement
(``packing=auto``) had built them first.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from simpo_exp.config import ConfigError
from simpo_exp.logps import decoder_of

log = logging.getLogger(__name__)

MANY_RECOMPILE_STEPS = 3  # warn when more steps than this recompiled after the first one


def compile_units(model: nn.Module, segment_attention: bool, checkpointing: bool) -> list[nn.Module]:
    """The modules to compile: the decoder layers, or their attention blocks and MLPs under gradient
    checkpointing, whose region around a whole layer dynamo cannot compile (module docstring)."""
    body = decoder_of(model) if hasattr(model, "get_decoder") else None
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ConfigError(
            f"hardware.compile=true: no decoder layers found in {type(model).__name__} "
            "(expected model.get_decoder().layers); set hardware.compile=false"
        )
    if not checkpointing:
        return list(layers)
    parts = [getattr(layer, name, None) for layer in layers for name in ("self_attn", "mlp")]
    if any(p is None for p in parts):
        raise ConfigError(
            f"hardware.compile=true with gradient checkpointing needs layers with self_attn and mlp blocks; "
            f"{type(layers[0]).__name__} lacks them: set hardware.compile=false or hardware.gradient_checkpointing="
            "false"
        )
    return parts


def compile_model(model: nn.Module, hardware) -> int:
    """Compile ``model``'s layers in place as ``hardware`` asks (``compile_mode``, ``compile_backend``,
    ``gradient_checkpointing``), after any segment-attention hook is installed (``ResponseLogps`` does it);
    returns how many modules were compiled."""
    from simpo_exp.logps import SEGMENT_ATTENTION_PREFIX

    attention = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    segments = attention.startswith(SEGMENT_ATTENTION_PREFIX)
    units = compile_units(model, segments, hardware.gradient_checkpointing)
    mode = None if hardware.compile_mode in (None, "default") else hardware.compile_mode
    for unit in units:
        unit.compile(dynamic=True, backend=hardware.compile_backend, mode=mode)
    log.info(
        "torch.compile: %d modules (%s, backend %s, mode %s, dynamic shapes)",
        len(units),
        type(units[0]).__name__,
        hardware.compile_backend,
        mode or "default",
    )
    return len(units)


def graphs_built() -> int:
    """Graphs dynamo has compiled in this process so far (a cheap counter it keeps anyway)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileWatch:
    """Which training steps compiled, and the seconds they took (the warm-up left out of the step time)."""

    def __init__(self, asked: bool = True):
        self.asked = asked  # hardware.compile (the layers compiled), not only kernels that compile themselves
        self.warmup_s = 0.0  # this start's
        self.warmup_steps = 0
        self.earlier_s, self.earlier_steps = 0.0, 0  # the earlier starts' of a resumed run (its checkpoint's)
        self._mark = graphs_built()
        self._warned = False
        self._steps = 0  # this start's

    def step_started(self) -> None:
        self._mark = graphs_built()

    def step_finished(self, seconds: float, step: int, accelerator=None) -> bool:
        """Whether the step that took ``seconds`` compiled (and so is warm-up, not a timed step). A start's first
        step is warm-up on every process where any compiled in it (``accelerator``: the run's processes agree, one
        all-gather): under measured ``packing=auto`` the main process built its kernels while measuring and the
        others build theirs in that step, which the main process waits for at the gradients' all-reduce; timed
        there, its 5-15 s went into the first window's step time and MFU. Later recompiles, one process's own
        batch shape, stay each process's."""
        compiled = graphs_built() > self._mark
        self._steps += 1
        if self._steps == 1 and accelerator is not None and accelerator.num_processes > 1:
            flag = torch.tensor([float(compiled)], device=accelerator.device)
            compiled = bool(accelerator.gather(flag).max().item())
        if compiled:
            self.warmup_s += seconds
            self.warmup_steps += 1
            if self.warmup_steps > MANY_RECOMPILE_STEPS + 1 and not self._warned:
                self._warned = True
                log.warning(
                    "torch.compile recompiled during %d training steps (the latest: step %d), each left out of "
                    "the step time; new shapes or modes keep triggering it. TORCH_LOGS=recompiles says why%s",
                    self.warmup_steps - 1,
                    step,
                    "; hardware.compile=false turns it off" if self.asked else "",
                )
        return compiled

    def totals(self) -> tuple[float, int]:
        """The run's warm-up over all its starts: (seconds, steps)."""
        return self.earlier_s + self.warmup_s, self.earlier_steps + self.warmup_steps

    def summary(self) -> dict:
        """The warm-up, for summary.json, over all the run's starts (a resumed run's untimed steps in metrics.jsonl
        are both starts'): under hardware.compile always, else where kernels were built."""
        seconds, steps = self.totals()
        if not (self.asked or steps):
            return {}
        return {
            "train/compile_warmup_s": seconds,
            "train/compile_warmup_steps": steps,
            "train/compile_graphs": graphs_built(),
        }


def eager_only(active: bool = True):
    """A context in which compiled modules run eagerly (generation: its cached decoding would add graphs
    for shapes training never sees); a no-op context unless ``active``."""
    return torch.compiler.set_stance("force_eager") if active else contextlib.nullcontext()


def compile_for_run(cfg, accelerator, model: nn.Module) -> CompileWatch | None:
    """Compile the policy's layers where ``hardware.compile`` asks (after the policy's attention hook is
    installed, before ``accelerator.prepare``); the watch that times the warm-up, or None."""
    from simpo_exp.engine import SHARDED_ENGINES

    if not cfg.hardware.compile:
        return None
    if accelerator.distributed_type in SHARDED_ENGINES:
        raise ConfigError(
            f"hardware.compile=true is not supported under {accelerator.distributed_type.value} (its parameter "
            "gathering hooks run around the layers it would compile; DeepSpeed has its own engine.compile); "
            "set hardware.compile=false"
        )
    compile_model(model, cfg.hardware)
    return CompileWatch()


def watch_compiles(cfg, accelerator, model: nn.Module) -> CompileWatch:
    """``compile_for_run``'s watch, or, without hardware.compile, one that only tells the steps during which a
    kernel compiled itself (FlexAttention, Liger's head) from the timed ones."""
    return compile_for_run(cfg, accelerator, model) or CompileWatch(asked=False)
