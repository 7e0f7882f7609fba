"""Multi-host start-up for the command-line tools: join the other processes before JAX starts.

    python -m flux_jax.generate ... --coordinator 10.0.0.1:7777 --num-processes 4 --process-id 0
    python -m flux_jax.generate ...          # on a TPU pod or under `srun`: found automatically

`initialize(args)` must run before anything touches JAX devices (jax.devices(), an array, a jit
call): the device list of a multi-process job only exists once the processes have met.

Which processes form the job:
  * the three flags, all or none: that job, on any hardware;
  * no flags, on a Cloud TPU VM (JAX found libtpu and TPU chips at import): JAX's own TPU
    cluster detection (GKE environment variables or the GCE metadata server) names the hosts of
    the slice or pod; a single-host TPU VM makes a job of one process;
  * no flags, inside an `srun` step of several tasks (SLURM_STEP_NUM_TASKS > 1): JAX's SLURM
    detection. Only srun sets that variable, for its own step: a batch script, an salloc shell
    or an ssh session into an allocated node run one process, and JAX's detection (which trusts
    SLURM_NTASKS) would wait there for peers that never start;
  * otherwise one process, and nothing is done.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Optional

MAX_PORT = 65535
FLAGS = ("--coordinator", "--num-processes", "--process-id")
SLURM_STEP_TASKS = "SLURM_STEP_NUM_TASKS"  # set by srun for the tasks of its step only
CPU_COLLECTIVES = "gloo"  # cross-process collectives between CPU devices; JAX's CPU client reads it
CPU_COLLECTIVES_ENV = "JAX_CPU_COLLECTIVES_IMPLEMENTATION"  # a user's own choice (e.g. mpi) wins
ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\s\[\]]+):(\d+)$")  # HOST:PORT or [IPv6]:PORT


class DistributedError(ValueError):
    """Bad multi-host flags, or a job that could not be joined: the message names the fix."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "multi-host", "Run one process per host, each with the same arguments but --process-id; pass all three "
                      "flags or none (none: a TPU pod or an srun step is found automatically, else one process).")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0, reachable from every process, and a free port on it")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the job (one a host)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process: 0 to N-1; 0 prints the progress")


def check_arguments(args: argparse.Namespace) -> bool:
    """Whether the flags ask for a multi-process job; DistributedError if they are incomplete or wrong."""
    values = (args.coordinator, args.num_processes, args.process_id)
    given = [flag for flag, value in zip(FLAGS, values) if value is not None]
    if not given:
        return False
    if len(given) < len(FLAGS):
        missing = [flag for flag in FLAGS if flag not in given]
        raise DistributedError(f"{', '.join(given)} needs {' and '.join(missing)} too: pass all of "
                               f"{', '.join(FLAGS)}, or none")
    match = ADDRESS.match(args.coordinator)
    if not match or not 1 <= int(match.group(2)) <= MAX_PORT:
        raise DistributedError(f"--coordinator must be HOST:PORT with a port from 1 to {MAX_PORT}, "
                               f"got {args.coordinator!r}")
    if args.num_processes < 1:
        raise DistributedError(f"--num-processes must be at least 1, got {args.num_processes}")
    if not 0 <= args.process_id < args.num_processes:
        raise DistributedError(f"--process-id must be from 0 to {args.num_processes - 1} "
                               f"(--num-processes {args.num_processes}), got {args.process_id}")
    return True


def detected_cluster() -> Optional[str]:
    """The multi-host environment found without flags (see the module docstring), or None."""
    from jax._src import cloud_tpu_init  # set at `import jax`, before any backend starts

    if cloud_tpu_init.running_in_cloud_tpu_vm:
        return "Cloud TPU"
    try:
        if int(os.environ.get(SLURM_STEP_TASKS, "1")) > 1:
            return "SLURM"
    except ValueError:
        pass
    return None


def initialize(args: argparse.Namespace) -> Optional[str]:
    """Join the multi-host job the flags name or the environment shows; returns how it was found.

    None: a single process, nothing done. Must run before anything touches JAX devices.
    """
    import jax
    from jax._src import xla_bridge

    flags = check_arguments(args)
    found = "flags" if flags else detected_cluster()
    if found is None:
        return None
    if xla_bridge.backends_are_initialized():  # a caller bug, not the user's: say what went first
        raise RuntimeError("distributed.initialize must run before anything touches JAX devices")
    if CPU_COLLECTIVES_ENV not in os.environ:
        # Only JAX's CPU client reads this, so it is safe on GPU/TPU hosts too, and which backends
        # exist cannot be asked before the job is joined. Set explicitly: JAX versions differ on
        # the default, and without an implementation CPU devices of different processes cannot
        # run the collectives a mesh spanning them needs.
        jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)
    where = (f"the job at {args.coordinator} as process {args.process_id} of {args.num_processes}" if flags
             else f"the {found} job")
    try:
        if flags:
            jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                       process_id=args.process_id)
        else:
            jax.distributed.initialize()  # JAX's own cluster detection fills in all three
    except Exception as e:  # unreachable coordinator, timeout, port taken: grpc/XLA errors of many types
        raise DistributedError(f"cannot join {where}: {type(e).__name__}: {e}") from None
    return found


def is_main() -> bool:
    """Whether this is process 0, the one that prints progress (True without a multi-host job)."""
    import jax

    return jax.process_index() == 0


def from_main(value: int) -> int:
    """Process 0's `value` (a 32-bit unsigned int, e.g. a drawn seed) on every process; `value` alone without a job."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.uint32(value)))


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op with one process)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
