"""One rank of a split model: a process that builds its share of the model and KV cache and
runs its part of every step.

Rank 0 (the driver) talks to the engine over a pipe: it receives each ``SchedulerOutput``,
relays it to the other ranks over a gloo "control" group (with the tokens it sampled in the
previous step, which the others append to their copies of the requests), runs its share, samples
and answers with the ``ModelRunnerOutput``. The other ranks only ever wait for the next message
and run their share. Collectives inside a step use the default group, whose timeout bounds how
long a rank waits for a dead peer; the control group waits without limit (an idle engine sends
nothing).

Any failure ends the rank: rank 0 reports it on the pipe first; the engine watches every local
rank's process and fails with :class:`EngineDeadError` when one exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import threading
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

from kvforge.config import EngineConfig
from kvforge.errors import KVForgeError
from kvforge.parallel.group import (
    TRAFFIC,
    ExpertParallel,
    ModelShard,
    RankContext,
    TensorParallel,
)
from kvforge.parallel.layout import Layout

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
# The control group never times out on its own: a worker waits there while the engine is idle.
_CONTROL_TIMEOUT = timedelta(days=365)


def layout_of(config: EngineConfig) -> Layout:
    """The rank layout of ``config``'s parallel sizes."""
    parallel = config.parallel_config
    return Layout(parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.ep_size)


def run_rank(
    rank: int,
    config: EngineConfig,
    init_method: str,
    conn: Connection | None,
    local_ranks: int,
    parent_pid: int,
    log_level: str,
) -> None:
    """Process entry of one rank (``conn``: rank 0's pipe to the engine)."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")
    parallel = config.parallel_config
    layout = layout_of(config)
    device = config.model_config.device
    backend = parallel.distributed_backend or ("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        local = rank % local_ranks
        config = dataclasses.replace(
            config,
            model_config=dataclasses.replace(config.model_config, device=f"cuda:{local}"),
        )
        torch.cuda.set_device(local)
    # the node's cores shared between its ranks
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    _watch_parent(parent_pid)
    if parallel.nnodes == 1 and backend == "gloo":
        # one machine: gloo over the loopback interface (about half the latency of the
        # interface the host name resolves to, on the machines measured)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=layout.world_size,
            timeout=timedelta(seconds=parallel.distributed_timeout),
        )
        ctx = _context(layout, rank, config)
        from kvforge.runner.model_runner import ModelRunner

        runner = ModelRunner(config, parallel=ctx)
        plans: list[Any] | None = [None] * layout.world_size if rank == 0 else None
        dist.gather_object(runner.memory_plan(), plans, dst=0)
        if conn is not None:
            conn.send(
                (
                    "ready",
                    {
                        "tokenizer": runner.tokenizer,
                        "model_config": runner.model_config,
                        "num_blocks": runner.num_blocks,
                        "bytes_per_block": runner.bytes_per_block,
                        "plan": plans,
                    },
                )
            )
        _serve(runner, ctx, _Pipe(conn) if conn is not None else None)
    except BaseException as exc:  # noqa: BLE001 - reported to the engine, then the rank ends
        logger.exception("rank %d failed", rank)
        if conn is not None:
            # typed errors travel whole (a bad model or size is the caller's error) when they
            # survive pickling; the text always does
            detail = exc if isinstance(exc, KVForgeError) and _picklable(exc) else None
            with contextlib.suppress(Exception):
                conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}", detail))
        os._exit(1)  # do not wait on peers in process-group teardown
    if dist.is_initialized():
        dist.destroy_process_group()


def _picklable(exc: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any failure means "send the text only"
        return False
    return True


class _Pipe:
    """Rank 0's end of the engine's pipe: answers, and a heartbeat every second while a step
    runs (the engine's sign that rank 0 is alive, however long the step)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.busy = threading.Event()
        threading.Thread(target=self._beat, daemon=True, name="kvforge-heartbeat").start()

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_SECONDS)
            if self.busy.is_set():
                with self.lock:
                    self.conn.send(("alive", None))

    def recv(self) -> Any:
        message = self.conn.recv()
        self.busy.set()
        return message

    def send(self, message: Any) -> None:
        with self.lock:
            self.busy.clear()
            self.conn.send(message)


def _watch_parent(parent_pid: int) -> None:
    """End this rank when the process that started it is gone (killed without cleanup)."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="kvforge-parent-watch").start()


def _context(layout: Layout, rank: int, config: EngineConfig) -> RankContext:
    """Create every process group (all ranks, same order) and keep this rank's."""
    mine: dict[str, tuple[int, int, Any]] = {}
    timeout = timedelta(seconds=config.parallel_config.distributed_timeout)
    for kind, ranks in layout.all_groups():
        group = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine[kind] = (ranks.index(rank), len(ranks), group)
    control = dist.new_group(backend="gloo", timeout=_CONTROL_TIMEOUT)

    def member(kind: str, counter: str) -> TensorParallel | None:
        index, size, group = mine[kind]
        return TensorParallel(index, size, group, counter) if size > 1 else None

    tp = member("tp", "tp")
    ep, expert_tp = member("ep", "ep"), member("expert_tp", "tp")
    parallel = config.parallel_config
    experts = None
    if ep is not None or expert_tp is not None:
        # one counting rank per token slice: with ep each group member counts its own slice;
        # without, every rank of the stage routes all tokens and only its first counts
        counts = rank % layout.expert_tp == 0 if ep is not None else rank % layout.stage_size == 0
        experts = ExpertParallel(ep, expert_tp, parallel.moe_capacity_factor, counts)
    start, end = _stage_layers(config, layout, rank)
    return RankContext(
        layout,
        rank,
        ModelShard(tp, experts, (start, end) if layout.pp > 1 else None),
        parallel.pipeline_micro_batches or layout.pp,
        control,
    )


def _stage_layers(config: EngineConfig, layout: Layout, rank: int) -> tuple[int, int]:
    if layout.pp == 1:
        return 0, 0
    from kvforge.loader.model_loader import read_model_config

    num_layers = read_model_config(config.model_config).num_layers
    return layout.stage_layers(num_layers, layout.stage(rank))


def _serve(runner: Any, ctx: RankContext, conn: _Pipe | None) -> None:
    """The step loop: take a message (rank 0 from the engine, relayed to the others), run it."""
    sampled: dict[str, list[int]] = {}
    timeout = timedelta(seconds=runner.config.parallel_config.distributed_timeout)
    while True:
        if ctx.is_driver:
            assert conn is not None
            try:
                message = conn.recv()
            except EOFError:  # the engine is gone
                message = ("stop",)
            relay = message
            if message[0] == "step":  # the others need no grammar bitmask, but the tokens
                relay = ("step", dataclasses.replace(message[1], grammar_bitmask=None), sampled)
            if ctx.layout.world_size > 1:
                _relay(relay, ctx, timeout)
        else:
            message = _relayed(ctx)
        kind = message[0]
        if kind == "stop":
            return
        if kind == "step":
            if ctx.is_driver:
                result = runner.execute(message[1])
                sampled = dict(zip(result.request_ids, result.sampled_token_ids))
                assert conn is not None
                conn.send(("ok", result))
            else:
                runner.execute(message[1], message[2])
        elif kind == "expert_stats":
            stats = runner.expert_stats()
            gathered: list[Any] | None = [None] * ctx.layout.world_size if ctx.is_driver else None
            dist.gather_object(stats, gathered, dst=0)
            if conn is not None and gathered is not None:
                conn.send(("ok", _merge_stats(gathered)))
        elif kind == "traffic":  # bytes each rank sent so far, by kind (benchmarks)
            counts: list[Any] | None = [None] * ctx.layout.world_size if ctx.is_driver else None
            dist.gather_object(dict(TRAFFIC), counts, dst=0)
            if conn is not None:
                conn.send(("ok", counts))
        else:
            raise ValueError(f"unknown message {kind!r}")


def _relay(message: Any, ctx: RankContext, timeout: timedelta) -> None:
    """Rank 0: send ``message`` to every rank over the control group, failing after
    ``timeout`` if one does not take it (the group itself waits forever: it is where the others
    idle)."""
    payload = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8)
    for tensor in (torch.tensor([len(payload)], dtype=torch.int64), payload):
        work = dist.broadcast(tensor, src=0, group=ctx.control, async_op=True)
        if not work.wait(timeout):
            raise TimeoutError(f"a rank did not take the next step within {timeout}")


def _relayed(ctx: RankContext) -> Any:
    """Ranks above 0: the next message rank 0 relays (waiting as long as the engine idles)."""
    length = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(length, src=0, group=ctx.control)
    payload = torch.empty(int(length.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=ctx.control)
    return pickle.loads(payload.numpy().tobytes())


def _merge_stats(per_rank: list[Any]) -> list[Any]:
    """Sum each layer's routing counters over the ranks (each counted a share of the tokens)."""
    merged: dict[int, Any] = {}
    for stats in per_rank:
        for layer in stats:
            merged[layer.layer] = merged[layer.layer] + layer if layer.layer in merged else layer
    return [merged[i] for i in sorted(merged)]
