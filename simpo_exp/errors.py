"""The errors a user causes and can fix: one base class, shared by every stage and its entry point.

A stage raises a subclass with a message that names the key, value, file or row at fault; the entry
points (``simpo_exp.runinfo.user_errors``) print that message instead of a traceback and exit with 2.
Anything else is a bug, shown with its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave (config, files, models, resources), with a message saying what to change."""


class OtherRunsDirectory(UserError, RuntimeError):
    """The run directory holds another config's run (its checkpoints, or its finished result): the command is refused
    and the run left as it was, its recorded config and outcome included (``runinfo.user_errors`` puts back what
    Hydra rewrote before the run could refuse)."""


class FolderInUse(OtherRunsDirectory):
    """Another job is working in the folder (``rundir.hold_folder``): the command is refused, the folder left to it."""


class OutOfMemoryError(UserError, RuntimeError):
    """A training or evaluation step ran out of device memory."""


def out_of_memory(where: str, error: BaseException) -> OutOfMemoryError:
    """The message for an out-of-memory step: which knobs lower the memory a step needs."""
    return OutOfMemoryError(
        f"out of device memory during {where} ({str(error).splitlines()[0][:200]}). Lower the memory a step needs: "
        "per_device_train_batch_size (keep the global batch with hardware.effective_batch_size or "
        "gradient_accumulation_steps), max_length, hardware.gradient_checkpointing=true (on every layer: "
        "hardware.checkpoint_every_n_layers=1; less still: hardware.checkpoint_offload=true), "
        "hardware.logps_chunk_size=1024 (large vocabularies), or a sharded engine (hardware=fsdp/zero3) or LoRA. "
        "A run with a checkpoint resumes from it with the checkpointing and chunk settings changed; the batch, "
        "max_length, engine or LoRA changed need resume=false (a fresh start)"
    )
