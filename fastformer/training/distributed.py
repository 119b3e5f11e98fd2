"""Data-parallel training over MPI: which process am I, and the few collectives a step needs.

    comm = get_comm()            # MPIComm under mpiexec (or distributed=True), else SingleProcess
    comm.rank, comm.size         # this process, the number of processes
    comm.allreduce_sum(buf)      # sum a float buffer over the ranks, in place (the flat gradient)
    comm.allreduce_scalar(x)     # the sum of a Python number over the ranks
    comm.bcast(arr)              # rank 0's array into every rank's, in place
    comm.gather(obj)             # [every rank's obj] on rank 0, None elsewhere (small objects, pickled)

The trainer has one code path: `SingleProcess` is the complete one-process implementation (every
collective is the identity), `MPIComm` does the same over mpi4py. mpi4py is imported only when the
process was started by an MPI launcher (one of LAUNCHER_VARS is set) or when asked for, so a plain
`fastformer train` never needs it. Gradients go through the uppercase buffer API
(`Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)`): no pickling, no copy of the flat buffer.

Threads: ranks on one machine share its cores. Unless FASTFORMER_NUM_THREADS is set, an MPIComm
sets it to this process's cores / ranks on this node (from a shared-memory split of the
communicator), which kernels/process.py applies when the kernels load -- so get the communicator
before the first kernel call (the CLI and the Trainer do).
"""

import hashlib
import json
import os
import sys
import time
import traceback
from contextlib import contextmanager

import numpy as np

from fastformer.errors import FastformerError, error_line
from fastformer.kernels.process import ENV_VAR, available_cores

# set by MPICH/Hydra (PMI_*), Open MPI (OMPI_*), PMIx launchers and Intel MPI (MPI_LOCALNRANKS)
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
INSTALL_HINT = 'pip install "fastformer[mpi]"'


def launched_by_mpi(environ=None):
    """True when one of LAUNCHER_VARS is in `environ` (default os.environ)."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in LAUNCHER_VARS)


class SingleProcess:
    """The communicator of a one-process run: rank 0 of 1, every collective the identity."""

    rank, size, local_rank, local_size = 0, 1, 0, 1

    def allreduce_sum(self, buf):
        return buf

    def allreduce_scalar(self, x):
        return x

    def bcast(self, arr):
        return arr

    def gather(self, obj):
        return [obj]

    def barrier(self):
        pass

    def abort(self, code=1):
        raise SystemExit(code)


class MPIComm:
    """The ranks of an MPI communicator (COMM_WORLD by default) through mpi4py."""

    def __init__(self, comm=None):
        from mpi4py import MPI  # only here: see get_comm

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks sharing this machine's memory
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        if not os.environ.get(ENV_VAR, "").strip():
            os.environ[ENV_VAR] = str(max(1, available_cores() // self.local_size))

    def allreduce_sum(self, buf):
        """Sum the contiguous array `buf` over the ranks, in place; returns it."""
        assert buf.flags.c_contiguous, "allreduce_sum needs a contiguous buffer"
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def allreduce_scalar(self, x):
        """The sum over the ranks of the number x (float64 for floats, int64 for ints)."""
        a = np.array([x], dtype=np.int64 if isinstance(x, (int, np.integer)) else np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        return a[0].item()

    def bcast(self, arr):
        """Rank 0's contiguous array into `arr` on every rank, in place; returns it."""
        assert arr.flags.c_contiguous, "bcast needs a contiguous buffer"
        self.comm.Bcast(arr, root=0)
        return arr

    def gather(self, obj):
        """[obj of rank 0, rank 1, ...] on rank 0, None on the others (pickled: small objects only)."""
        return self.comm.gather(obj, root=0)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code=1):
        """End every rank of the job now (the others may be waiting in a collective)."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.2)  # the launcher forwards output asynchronously: let this rank's message out first
        self.comm.Abort(code)
        os._exit(code)  # an MPI whose Abort returns (seen with MPICH's wheel) must not go on


def get_comm(distributed=None):
    """The run's communicator: MPIComm when `distributed` is True, or when it is None and the
    process was started by an MPI launcher; SingleProcess otherwise. FastformerError naming the
    `mpi` extra when a distributed run is asked for and mpi4py is not installed."""
    if distributed is None:
        distributed = launched_by_mpi()
    if not distributed:
        return SingleProcess()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise FastformerError(f"distributed training needs mpi4py and an MPI: {INSTALL_HINT}") from None
    return MPIComm()


class RanksDiffer(FastformerError):
    """The ranks of a job were started differently (check_same_on_every_rank); every rank raises it
    at the same point, so rank 0 alone need say it."""


def check_same_on_every_rank(comm, what, value):
    """Refuse, on every rank at once (RanksDiffer), a job whose ranks hold different `value`s
    (JSON-able; e.g. the arguments a rank was started with): compared by a SHA-256 against rank 0's,
    so ranks started differently (another seed, another file) never train apart or wait for each other."""
    if comm.size == 1:
        return
    text = json.dumps(value, sort_keys=True, default=repr).encode("utf-8", "surrogateescape")
    mine = np.frombuffer(hashlib.sha256(text).digest(), dtype=np.uint8).copy()
    differ = comm.allreduce_scalar(int(not np.array_equal(mine, comm.bcast(mine.copy()))))
    if differ:
        raise RanksDiffer(f"{differ} of {comm.size} ranks were started with {what} other than rank 0's: "
                              f"every rank of a run must be started with the same command line and files")


@contextmanager
def abort_on_error(comm, passthrough=()):
    """Around work that ranks do together: an exception on one rank ends the whole job (MPI_Abort)
    instead of leaving the others waiting in a collective. A FastformerError or OSError is one
    line on stderr and exit status 2, Ctrl-C one line and status 130, anything else its traceback
    and status 1. Exceptions of the `passthrough` types (raised on every rank at the same point)
    propagate as usual; so does everything when there is only one process."""
    if comm.size == 1:
        yield
        return
    try:
        yield
    except passthrough:
        raise
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: one line each, the job ends
        sys.stderr.write(f"fastformer (rank {comm.rank} of {comm.size}): interrupted; a training run continues "
                         f"from its newest checkpoint with --resume\n")
        comm.abort(130)
    except BaseException as e:  # a FastformerError or file error is one line (errors.error_line), a bug its traceback
        message = error_line(e)
        if message is not None:
            sys.stderr.write(f"fastformer (rank {comm.rank} of {comm.size}): error: {message}\n")
            comm.abort(2)
        sys.stderr.write(f"fastformer (rank {comm.rank} of {comm.size}): aborting the job after:\n"
                         f"{traceback.format_exc()}")
        comm.abort(1)
