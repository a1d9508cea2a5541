"""A process of tests/test_metrics.py's two-process window test, in a module of its own: a spawned process imports
the module its function lives in, and tests/test_metrics.py's imports (transformers, the model helpers) took 9 s."""

from types import SimpleNamespace

import torch

from simpo_exp.metrics import Window


def reduce_a_restored_window(rank: int, port: int, saved: list, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        accelerator = SimpleNamespace(
            num_processes=2, process_index=rank, is_main_process=rank == 0, device=torch.device("cpu"),
            reduce=lambda t, reduction: (dist.all_reduce(t), t)[1],
        )  # fmt: skip
        window = Window.restore(saved, 1.0, 2, accelerator)
        window.add({"pairs": torch.tensor(2.0), "loss": torch.tensor(1.0), "tokens": torch.tensor(10.0)})  # a step
        out.put((rank, window.means(accelerator, "train")))
    finally:
        dist.destroy_process_group()
