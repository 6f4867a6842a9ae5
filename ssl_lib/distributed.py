"""One run on several processes (``torchrun``): which process this is, and the few collectives the
method and the loop need, each a no-op in a single process.

A K-process run computes what the one-process run computes: the config's batch sizes are the global
batch, every process draws the same global batch order and the same global random views and keeps
its 1/K of them (:func:`shard_columns`, :func:`global_rows`), BatchNorm normalises with the
statistics of the whole global batch (:func:`sync_batchnorm`), DDP averages the gradients, and the
logged step values are combined over the processes (:func:`combine_rows`). Only the float
reductions run in another order, which is why a K-process run agrees with the one-process run
within float tolerance rather than bit for bit.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

#: Seconds a process waits in a collective for the others before it gives up (a process that died
#: without torchrun noticing, e.g. on another machine): $SSL_LIB_DIST_TIMEOUT, default 10 minutes.
TIMEOUT_ENV = "SSL_LIB_DIST_TIMEOUT"
#: Seconds the processes wait for each other while the data is loaded (local process 0 may decode
#: and cache a whole dataset first): $SSL_LIB_DATA_TIMEOUT, default 2 hours, apart from the above.
DATA_TIMEOUT_ENV = "SSL_LIB_DATA_TIMEOUT"


@dataclass(frozen=True)
class Dist:
    """This process's place in a run: ``rank`` of ``world`` processes, ``local_rank`` of the
    ``local_world`` on its machine; ``address``: the rendezvous ``host:port`` when srun started the
    processes (None: torchrun's, in its environment)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    address: str | None = None

    @property
    def main(self) -> bool:
        """The process that writes the run directory, prints and logs."""
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


SINGLE = Dist()

#: What a refused SLURM start is told to do instead (docs/scale-out.md has the whole script).
SBATCH_HINT = ("in the sbatch script, start one process per GPU with `srun python -m ssl_lib train ...` "
               "(#SBATCH --ntasks-per-node=<GPUs per node>; see docs/scale-out.md, 'Over SLURM nodes')")
#: The rendezvous port of an srun-started run: this plus the job id modulo 20000 (below Linux's
#: ephemeral ports), so that two jobs sharing a node do not collide; $MASTER_PORT overrides it.
SLURM_PORT_BASE = 10000


def from_env(environ=None) -> Dist:
    """The process's place in a run. torchrun's RANK, WORLD_SIZE, LOCAL_RANK (LOCAL_WORLD_SIZE)
    first; else, for a process of an srun step of several tasks, SLURM's SLURM_PROCID,
    SLURM_STEP_NUM_TASKS (or SLURM_NTASKS) and SLURM_LOCALID, the rendezvous on the first node of
    the step (where task 0 runs) at a port from the job id; else a single process (the batch script
    of a SLURM job too: :func:`check_slurm_start` refuses it for a run). ConfigError (one line naming
    the variable, and what to run instead) for an srun task that cannot be placed."""
    env = os.environ if environ is None else environ
    if env.get("WORLD_SIZE"):
        world = int(env["WORLD_SIZE"])
        if world <= 1:
            return SINGLE
        local_rank = int(env.get("LOCAL_RANK", "0"))
        return Dist(int(env["RANK"]), world, local_rank, int(env.get("LOCAL_WORLD_SIZE") or 0) or local_rank + 1)
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if not tasks or int(tasks) <= 1 or env.get("SLURM_PROCID") is None or env.get("SLURM_STEP_ID") is None:
        return SINGLE  # not in SLURM, a step of one task, or a job's batch script
    return _from_slurm(env, int(tasks))


def check_slurm_start(environ=None) -> None:
    """ConfigError when this process is the batch script of a SLURM job of several tasks: the run
    would train on one process while the job holds the others' GPUs (srun starts the tasks)."""
    from .errors import ConfigError

    env = os.environ if environ is None else environ
    tasks = env.get("SLURM_NTASKS") or "1"
    if not env.get("WORLD_SIZE") and env.get("SLURM_STEP_ID") is None and tasks.isdigit() and int(tasks) > 1:
        raise ConfigError(f"SLURM_NTASKS={tasks} but this process is the job's batch script, not one of its "
                          f"{tasks} tasks: {SBATCH_HINT}")


def _from_slurm(env, tasks: int) -> Dist:
    from .errors import ConfigError

    for var in ("SLURM_LOCALID", "SLURM_JOB_ID"):
        if not (env.get(var) or "").isdigit():
            raise ConfigError(f"{var}={env.get(var)!r}: cannot place this srun task ({tasks} tasks); {SBATCH_HINT}")
    host = env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "") \
        or env.get("SLURM_LAUNCH_NODE_IPADDR")
    if not host:
        raise ConfigError(f"SLURM_JOB_NODELIST is not set: no rendezvous host for these {tasks} srun tasks; {SBATCH_HINT}")
    port = env.get("MASTER_PORT") or str(SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % 20000)
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "",
                              int(env.get("SLURM_NODEID") or 0))
    local_rank = int(env["SLURM_LOCALID"])
    return Dist(int(env["SLURM_PROCID"]), tasks, local_rank, per_node or local_rank + 1, f"{host}:{port}")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[07-09,12],cpu1`` -> ``gpu07``, ``r[1-2]-n[3-4]`` ->
    ``r1-n3`` (the first of each bracket, its zero padding kept); "" for an empty list."""
    import re

    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first entry: up to the first comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], nodelist[:end].strip())


def tasks_per_node(text: str, node: int) -> int:
    """Node ``node``'s task count in SLURM's ``2(x3),1`` notation (0 when it cannot be read)."""
    import re

    counts = []
    for part in filter(None, text.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return 0
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if node < len(counts) else 0


def start(dist: Dist, device: torch.device) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs) unless already joined: at torchrun's
    rendezvous, or at ``dist.address`` for srun-started processes. On GPUs, then refuse processes
    that share a GPU (the launcher gave them fewer GPUs than processes)."""
    if not dist.on or torch_dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.address:
        torch_dist.init_process_group(backend, init_method=f"tcp://{dist.address}", rank=dist.rank,
                                      world_size=dist.world, timeout=timeout)
    else:
        torch_dist.init_process_group(backend, timeout=timeout)
    if device.type == "cuda":
        ids = [None] * dist.world
        torch_dist.all_gather_object(ids, str(torch.cuda.get_device_properties(device).uuid))
        check_own_gpus(ids)


def check_own_gpus(ids: list[str]) -> None:
    """ConfigError when two processes (ranks) hold the same GPU (``ids``: each rank's GPU uuid)."""
    from .errors import ConfigError

    seen = {}
    for rank, gpu in enumerate(ids):
        if gpu in seen:
            raise ConfigError(f"processes {seen[gpu]} and {rank} are on the same GPU ({gpu}): start at most one "
                              f"process per GPU of each machine; {SBATCH_HINT}")
        seen[gpu] = rank


def stop(dist: Dist) -> None:
    """Leave the process group: once everything that uses it (DDP's reducer) is gone, and together."""
    if dist.on and torch_dist.is_initialized():
        import gc

        gc.collect()  # DDP objects held in reference cycles still hold the group
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def local_first(dist: Dist, load):
    """``load()`` on every process, by local process 0 of each machine first (it builds the data
    cache if none holds the data), by the others once all of those have: they read the cache. The
    wait is a barrier of a group of its own with the long $SSL_LIB_DATA_TIMEOUT, so a slow decode
    does not count against the collective timeout of training."""
    if not dist.on:
        return load()
    timeout = datetime.timedelta(seconds=float(os.environ.get(DATA_TIMEOUT_ENV, "7200")))
    group = torch_dist.new_group(backend="gloo", timeout=timeout)
    result = failure = None
    if dist.local_rank == 0:
        try:
            result = load()
        except Exception as err:  # noqa: BLE001 - raised after the barrier, so that no one waits for it
            failure = err
    torch_dist.barrier(group=group)
    torch_dist.destroy_process_group(group)
    if failure is not None:
        raise failure
    return result if dist.local_rank == 0 else load()


def abort(dist: Dist) -> None:
    """Leave the process group at once, without waiting for the others (this process failed, or they
    did): a process blocked in a collective with this one then gets an error at once instead of
    waiting out the timeout. NCCL's communicators are aborted (pending work would block a destroy)."""
    if not (dist.on and torch_dist.is_initialized()):
        return
    from torch.distributed import distributed_c10d

    abort_group = getattr(distributed_c10d, "_abort_process_group", None)
    if torch_dist.get_backend() == "nccl" and abort_group is not None:
        abort_group()
    else:
        torch_dist.destroy_process_group()


def _failures(dist: Dist, add: int) -> int | None:
    """Add ``add`` to the run's count of reported failures in the rendezvous store (torchrun's agent
    holds it, so it outlives the processes); the count, or None when the store cannot be reached."""
    if not (dist.on and torch_dist.is_initialized()):
        return None
    try:
        store = torch_dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=5))
        return store.add(f"ssl_lib/failures/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", add)
    except Exception:  # noqa: BLE001 - the store went with a dead process: nothing to learn from it
        return None


def first_failure(dist: Dist) -> bool:
    """Report a failure of this process; whether it is the run's first (its process prints the one
    line). Without a process group or a reachable store, process 0 is taken to be the one."""
    count = _failures(dist, 1)
    return dist.main if count is None else count == 1


def failure_reported(dist: Dist) -> bool:
    """Whether some process of the run has reported a failure (:func:`first_failure`)."""
    return bool(_failures(dist, 0))


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective's report that another process of the run has ended."""
    text = str(err)
    return (isinstance(err, getattr(torch_dist, "DistError", ())) or
            isinstance(err, RuntimeError) and any(s in text for s in ("Connection closed by peer", "Connection reset by peer",
                                                                     "remote worker crashing", "NCCL communicator was aborted")))


def local_device(dist: Dist, device: torch.device, gpus: int | None = None) -> torch.device:
    """The device of this process: with several processes, GPU ``local_rank % gpus`` of the ``gpus``
    it sees (default: CUDA's count), so that a launcher that gives each process GPUs of its own
    (CUDA_VISIBLE_DEVICES per task) and one that shows every process all of them both work.
    ConfigError (one line) for a GPU index in the config, which every process would take, and for
    more processes on this machine than the GPUs they all see."""
    if not dist.on or device.type != "cuda":
        return device
    from .errors import ConfigError

    if device.index is not None:
        raise ConfigError(f"config field 'device' is '{device}' but the run has {dist.world} processes, each on "
                          "its own GPU (its local rank's): set device=cuda")
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if 1 < gpus < dist.local_world:  # one GPU each: the launcher's own binding, checked once joined
        raise ConfigError(f"{dist.local_world} processes on this machine but it has {gpus} GPUs: start at most "
                          f"{gpus} per machine (--nproc-per-node, #SBATCH --ntasks-per-node)")
    return torch.device("cuda", dist.local_rank % max(gpus, 1))


# ------------------------------------------------------------------------------- the batches

def shard_columns(batches: torch.Tensor | None, dist: Dist) -> torch.Tensor | None:
    """This process's 1/K of every row of a (steps x global batch) index tensor."""
    if batches is None or not dist.on:
        return batches
    width = batches.shape[1] // dist.world
    return batches[:, dist.rank * width:(dist.rank + 1) * width]


def global_rows(segments: tuple[int, ...], dist: Dist, device=None) -> torch.Tensor:
    """The rows of the global batch that this process's rows are, for a local batch made of
    ``segments`` (sizes of consecutive parts, each this process's 1/K of a part of the global batch
    K times its size: [labeled | unlabeled weak | unlabeled strong])."""
    parts, start = [], 0
    for size in segments:
        parts.append(torch.arange(start + dist.rank * size, start + (dist.rank + 1) * size, device=device))
        start += dist.world * size
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)


def slices(n: int, dist: Dist) -> tuple[int, int]:
    """This process's contiguous share ``[start, end)`` of ``n`` items (the first ones get one more)."""
    return n * dist.rank // dist.world, n * (dist.rank + 1) // dist.world


# ------------------------------------------------------------------------------- collectives

def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The element-wise sum over the processes (in place; ``t`` itself in a single process)."""
    if dist.on:
        torch_dist.all_reduce(t)
    return t


def all_gather(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Every process's ``t`` (the same shape on each), stacked: K x ``t.shape``."""
    if not dist.on:
        return t[None]
    out = [torch.empty_like(t) for _ in range(dist.world)]
    torch_dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def broadcast(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Process 0's ``t`` on every process (in place)."""
    if dist.on:
        torch_dist.broadcast(t, 0)
    return t


def broadcast_object(obj, dist: Dist):
    """Process 0's picklable ``obj`` on every process."""
    if not dist.on:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, 0)
    return box[0]


def combine_rows(gathered: torch.Tensor, mask_column: int, masked_column: int) -> torch.Tensor:
    """The one-process values of steps logged by K processes (K x steps x columns): each column is a
    mean over equal local batches, so the global value is the mean over processes, except the
    masked pseudo-label accuracy, a ratio of sums, which is weighted by each process's mask rate."""
    out = gathered.mean(0)
    rate = gathered[:, :, mask_column]
    weighted = (torch.nan_to_num(gathered[:, :, masked_column]) * rate).sum(0) / rate.sum(0)
    out[:, masked_column] = weighted  # NaN where no process had an image above tau, as in one process
    return out


# ------------------------------------------------------------------------------- BatchNorm

class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm on the statistics of the whole global batch for CPU processes (gloo): torch's
    ``nn.SyncBatchNorm`` refuses CPU tensors. One differentiable all-reduce of each channel's count,
    sum and sum of squares (in float64) per forward in train mode; elsewhere plain BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xd = x.double()
        local = torch.cat([xd.sum((0, 2, 3)), xd.pow(2).sum((0, 2, 3)),
                           xd.new_full((1,), x.numel() // c)])
        with warnings.catch_warnings():  # deprecated for a private successor; still differentiable
            warnings.simplefilter("ignore", FutureWarning)
            total = all_reduce(local)  # its backward sums the gradients over the processes
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean.pow(2)).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), m)
        y = (x - mean.to(x.dtype)[None, :, None, None]) * torch.rsqrt(var.to(x.dtype) + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def sync_batchnorm(net: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``net`` normalising with the global batch's statistics: torch's
    SyncBatchNorm on GPUs, :class:`GlooSyncBatchNorm` on CPUs. Parameters and buffers keep their
    names, so checkpoints load into the plain model and back."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for name, child in net.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlooSyncBatchNorm):
            new = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(net, name, new)
        else:
            sync_batchnorm(child, device)
    return net
