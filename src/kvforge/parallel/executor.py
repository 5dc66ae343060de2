"""ParallelRunner: the engine's model runner when the model is split over processes.

The engine process keeps the scheduler, the KV block bookkeeping and the output processing; it
starts one process per local rank (``torch.multiprocessing`` spawn) and sends each step's plain
``SchedulerOutput`` to rank 0 over a pipe (see worker.py). It never joins the process group
itself, so several engines can live in one process and a crashed rank cannot take it down.

A rank that exits (killed, out of memory, a failed collective) fails the engine with
:class:`EngineDeadError` naming the rank; the other ranks are stopped. Nodes above 0 (``--nnodes``
with ``--node-rank``) run :func:`run_node` and serve no requests.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import socket
import time
import weakref
from typing import Any

from kvforge.config import EngineConfig, log_level
from kvforge.core.step_io import ModelRunnerOutput, SchedulerOutput
from kvforge.errors import (
    EngineDeadError,
    InvalidRequestError,
    KVForgeError,
    UnsupportedModelError,
)
from kvforge.lora.request import LoRARequest
from kvforge.parallel.group import shard_range
from kvforge.parallel.worker import layout_of, run_rank
from kvforge.utils import format_size

logger = logging.getLogger(__name__)


def check_supported(config: EngineConfig) -> None:
    """Refuse the options split models do not serve yet."""
    if config.lora_config.enabled:
        raise InvalidRequestError(
            "LoRA adapters are not served with tensor / pipeline / expert parallelism yet",
            "enable_lora",
        )
    if config.speculative_config.method == "draft":
        raise InvalidRequestError(
            "a draft model is not served with parallel workers yet (use --speculative-method "
            "ngram)",
            "speculative_model",
        )


def check_layout(config: EngineConfig) -> None:
    """Refuse, before any process starts, a model whose sizes do not split over the ranks."""
    from kvforge.loader.model_loader import read_model_config

    cfg = read_model_config(config.model_config)
    layout = layout_of(config)
    layout.stage_layers(cfg.num_layers, 0)  # enough layers for the stages
    sizes = [
        ("attention heads", cfg.num_heads),
        ("KV heads", cfg.num_kv_heads),
        ("vocabulary", cfg.vocab_size),
    ]
    if not all(cfg.is_moe(i) for i in range(cfg.num_layers)):  # some dense MLPs
        sizes.append(("MLP intermediate size", cfg.intermediate_size))
    if cfg.shared_expert_intermediate_size:
        sizes.append(("shared expert intermediate size", cfg.shared_expert_intermediate_size))
    for what, total in sizes:
        shard_range(total, 0, layout.tp, what)
    if cfg.num_experts:
        shard_range(cfg.num_experts, 0, layout.ep, "experts")
        size = cfg.moe_intermediate_size or cfg.intermediate_size
        shard_range(size, 0, layout.expert_tp, "expert intermediate size")
    if layout.tp > 1 and cfg.qk_norm_full:
        raise UnsupportedModelError(
            "QK-norm over all heads (OLMoE) cannot be split by tensor rank; use "
            "--expert-parallel-size or --pipeline-parallel-size"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _init_method(config: EngineConfig) -> str:
    parallel = config.parallel_config
    if parallel.nnodes > 1 and (parallel.master_addr is None or parallel.master_port is None):
        raise InvalidRequestError(
            "several nodes need --master-addr and --master-port (or MASTER_ADDR / MASTER_PORT)",
            "master_addr",
        )
    address = parallel.master_addr or "127.0.0.1"
    return f"tcp://{address}:{parallel.master_port or _free_port()}"


def _start_ranks(config: EngineConfig, with_pipe: bool) -> tuple[list[Any], Any]:
    """Start this node's ranks; returns (processes, the engine's end of rank 0's pipe)."""
    parallel = config.parallel_config
    layout = layout_of(config)
    local = layout.world_size // parallel.nnodes
    first = parallel.node_rank * local
    init_method = _init_method(config)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe() if with_pipe else (None, None)
    procs = []
    for rank in range(first, first + local):
        proc = context.Process(
            target=run_rank,
            args=(
                rank,
                config,
                init_method,
                theirs if rank == 0 else None,
                local,
                os.getpid(),
                log_level(),
            ),
            name=f"kvforge-rank{rank}",
            daemon=True,
        )
        proc.start()
        logger.info("rank process %s (pid %d) started", proc.name, proc.pid)
        procs.append(proc)
    if theirs is not None:
        theirs.close()
    return procs, ours


def run_node(config: EngineConfig) -> int:
    """A node above 0: start its ranks and wait for them (they end with the engine)."""
    procs, _ = _start_ranks(config, with_pipe=False)
    logger.info("node %d: %d ranks started", config.parallel_config.node_rank, len(procs))
    code = 0
    for proc in procs:
        proc.join()
        code = code or (proc.exitcode or 0)
    return code


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _stop(procs: list[Any], conn: Any) -> None:
    """Ask rank 0 to stop, then make sure every local rank is gone."""
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.send(("stop",))
    for proc in procs:
        proc.join(timeout=10)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    if conn is not None:
        conn.close()


class ParallelRunner:
    """The ModelRunner interface the engine needs, backed by rank processes."""

    def __init__(self, config: EngineConfig) -> None:
        check_supported(config)
        check_layout(config)
        parallel = config.parallel_config
        if parallel.node_rank != 0:
            raise InvalidRequestError(
                "nodes above 0 run workers only (kvforge serve --node-rank N does)", "node_rank"
            )
        self.config = config
        self.layout = layout_of(config)
        self.dead: str | None = None
        self.cause: BaseException | None = None  # a rank's typed error, when it sent one
        self.started = False  # the ranks are loaded (loading has no deadline)
        self.procs, self.conn = _start_ranks(config, with_pipe=True)
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conn)
        logger.info(
            "parallel: %d ranks (tensor %d, pipeline %d, expert %d), %d on this node",
            self.layout.world_size,
            self.layout.tp,
            self.layout.pp,
            self.layout.ep,
            len(self.procs),
        )
        try:
            info = self._receive()
        except EngineDeadError as exc:
            if isinstance(self.cause, KVForgeError):
                raise self.cause from None  # e.g. heads that do not split over the ranks
            raise EngineDeadError(
                f"{exc} (if this started from a script: it must guard its top level with "
                'if __name__ == "__main__":)'
            ) from None
        self.started = True
        self.tokenizer = info["tokenizer"]
        self.model_config = info["model_config"]
        self.num_blocks: int = info["num_blocks"]
        self.bytes_per_block: int = info["bytes_per_block"]
        self.plan: list[dict[str, int]] = info["plan"]
        self._log_plan()

    def _log_plan(self) -> None:
        """The memory planner's table: every rank's layers, weights and KV."""
        layout = self.layout
        logger.info("memory plan (per rank):")
        for rank, row in enumerate(self.plan):
            logger.info(
                "  rank %d: stage %d, layers %d-%d, %d KV heads, weights %s, KV %s",
                rank,
                layout.stage(rank),
                row["first_layer"],
                row["first_layer"] + row["layers"] - 1,
                row["kv_heads"],
                format_size(row["weight_bytes"]),
                format_size(row["kv_bytes"]),
            )

    # ------------------------------------------------------------ protocol
    def _call(self, message: tuple[Any, ...]) -> Any:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if not self._finalizer.alive:
            raise EngineDeadError("the engine's workers were shut down")
        try:
            self.conn.send(message)
        except OSError:
            self._fail("rank 0 is gone (its pipe closed)")
        return self._receive()

    def _receive(self) -> Any:
        """Rank 0's answer; EngineDeadError as soon as any local rank exits instead."""
        sentinels = {proc.sentinel: proc for proc in self.procs}
        # rank 0 beats every second while it works; silence this long means it hangs
        silence = self.config.parallel_config.distributed_timeout
        last_sign = time.monotonic()
        while True:
            ready = multiprocessing.connection.wait([self.conn, *sentinels], timeout=1.0)
            if not ready and time.monotonic() - last_sign > silence and self.started:
                self._fail(f"rank 0 has not answered for {silence:.0f} s")
            if self.conn in ready:
                try:
                    kind, payload, *rest = self.conn.recv()
                except Exception as exc:  # noqa: BLE001 - a closed pipe or an unreadable error
                    kind, payload, rest = "error", f"rank 0's pipe failed ({exc!r})", []
                last_sign = time.monotonic()
                if kind == "alive":
                    continue
                if kind == "error":
                    self.cause = rest[0] if rest else None
                    self._fail(f"a parallel worker failed: {payload.splitlines()[0]}")
                return payload
            for sentinel in ready:
                proc = sentinels[sentinel]
                if self.conn.poll(2.0):  # rank 0 may be reporting why (its error says more)
                    continue
                proc.join(timeout=1.0)
                self._fail("a parallel worker is gone")

    def _fail(self, why: str) -> None:
        """Stop every rank and raise; the reason names the ranks that died first (a peer's
        failure shows on rank 0 only as a broken connection)."""
        time.sleep(0.2)  # let a dying peer finish exiting
        gone = [
            f"{proc.name} (pid {proc.pid}) {_exit_reason(proc.exitcode)}"
            for proc in self.procs
            if proc.exitcode is not None
        ]
        if gone:
            why = f"{'; '.join(gone)}: {why}"
        self.dead = why[:600]
        logger.error("engine failed: %s; stopping the other ranks", why)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=5)
        raise EngineDeadError(self.dead)

    # ---------------------------------------------------- runner interface
    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on the ranks; rank 0's sampled tokens."""
        result: ModelRunnerOutput = self._call(("step", output))
        return result

    def expert_stats(self) -> list[Any]:
        """Routing counters of the mixture-of-experts layers, summed over the ranks."""
        return self._call(("expert_stats",))  # type: ignore[no-any-return]

    def traffic(self) -> list[dict[str, int]]:
        """Bytes each rank has sent into collectives and transfers, by kind (tp, ep, pp)."""
        return self._call(("traffic",))  # type: ignore[no-any-return]

    def add_lora(self, request: LoRARequest) -> None:
        """LoRA is not served by split models (refused at start)."""
        raise InvalidRequestError("LoRA adapters are not enabled", "lora_request")

    def remove_lora(self, lora_id: int) -> bool:
        """No adapters are ever loaded."""
        return False

    def embed(self, prompts: list[list[int]]) -> Any:
        """Embeddings need the whole model in one process (not built for split models)."""
        raise UnsupportedModelError("embeddings are not served with parallel workers yet")

    def shutdown(self) -> None:
        """Stop every rank (also done when the runner is garbage-collected)."""
        self._finalizer()
