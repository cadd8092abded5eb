"""``docent train`` under ``accelerate launch``: every process runs the same command.

The Trainer shares the work (each process trains on its slice of every batch, gradients are
averaged); Docent's own work around it happens once, on the main process: choosing the run's
name, writing the resume state, making rehearsal rows, publishing the adapter (metadata,
report, merged weights), and everything after training (promotion, printing). What the other
processes need from that work is broadcast to them (:func:`on_main`), so no process reads a
file while another writes it. Run alone, every helper here is a plain call.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from docent.errors import DocentError

T = TypeVar("T")


class MainProcessError(DocentError):
    """The main process failed in work it does for all processes."""


def process_state() -> Any:
    """accelerate's view of this process (a ``PartialState``): its index, the number of
    processes, its device. A CPU process must ask for the CPU state explicitly: without
    ``cpu=True`` accelerate takes a CPU process launched by torchrun to be alone (and every
    process would then believe it is the main one)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    # transformers' own default (ddp_timeout): main-only work between barriers, such as
    # rehearsal rows on a CPU, can take minutes.
    return PartialState(cpu=cpu, timeout=timedelta(seconds=1800))


def is_main_process() -> bool:
    return bool(process_state().is_main_process)


def wait_for_everyone() -> None:
    process_state().wait_for_everyone()


def on_main(make: Callable[[], T]) -> T:
    """``make()`` run by the main process alone; every process gets its result. An error on
    the main process is raised on every process (a ``DocentError`` as itself, anything else
    as :class:`MainProcessError` on the others), so none waits for a result that never comes."""
    state = process_state()
    if state.num_processes == 1:
        return make()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    failure: BaseException | None = None
    if state.is_main_process:
        try:
            box[0] = ("ok", make())
        except DocentError as exc:
            failure, box[0] = exc, ("error", exc)
        except BaseException as exc:  # the others must hear of it, then it goes on up
            failure, box[0] = exc, ("error", MainProcessError(f"the main process failed: {exc!r}"))
    broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if failure is not None:
        raise failure
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


def sharded(trainer: Any) -> bool:
    """Whether the trainer shards the weights across processes (FSDP or DeepSpeed ZeRO-3):
    then no single process holds the whole trained model in memory."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return False
    return int(trainer.accelerator.state.deepspeed_plugin.zero_stage) == 3


def parallel_summary(trainer: Any) -> dict[str, Any]:
    """How a run was spread, for its metadata and report. One optimizer step sees
    ``effective_batch`` = per-device batch × processes × gradient accumulation examples
    (packed rows when packing)."""
    args = trainer.args
    processes = int(args.world_size)
    return {
        "processes": processes,
        "distributed_type": str(trainer.accelerator.distributed_type.value),
        "per_device_batch": int(args.per_device_train_batch_size),
        "grad_accum": int(args.gradient_accumulation_steps),
        "effective_batch": int(
            args.per_device_train_batch_size * processes * args.gradient_accumulation_steps
        ),
        "mixed_precision": str(trainer.accelerator.mixed_precision),
    }


def precision(cuda: bool, bf16: bool, mixed: str) -> str:
    """The metadata's ``dtype``: the weights' dtype and the autocast the run actually used
    (Docent's choice, or one the accelerate config added where Docent chose none)."""
    weights = "bfloat16" if cuda and bf16 else "float32"
    if mixed in ("no", "") or (mixed == "bf16" and weights == "bfloat16"):
        return weights
    return f"{weights} + {mixed} autocast"


def spread(parallel: dict[str, Any]) -> str:
    """The report's batch suffix under `accelerate launch`: ``x2 processes = 8 per step``."""
    if parallel["processes"] <= 1:
        return ""
    return f"x{parallel['processes']} processes = {parallel['effective_batch']} per step"
