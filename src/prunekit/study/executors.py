"""Where a study's runs execute: in this process, in N local worker processes, or on a Ray cluster.

Every executor takes runs with :meth:`submit` and hands back finished :class:`RunOutcome` objects from
:meth:`wait`; only the main process writes the results database. Worker processes get an equal share
of the cores (``torch.set_num_threads`` in the worker) and write their output to ``logs/`` in the
study folder. Ray (``pip install 'prunekit[ray]'``) runs each run as a task needing that many CPUs;
on a cluster the study folder must be on storage every node sees.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.study.execute import RunContext, RunOutcome, execute
from prunekit.study.spec import Run

EXECUTORS = ("local", "ray")


def core_share(workers: int) -> int:
    """Torch threads per worker: the machine's cores divided evenly (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


class InlineExecutor:
    """One run at a time in this process (its own progress shows on the terminal)."""

    capacity = 1

    def __init__(self, context: RunContext) -> None:
        self.context = context
        self.queue: list[Run] = []

    def submit(self, run: Run) -> None:
        self.queue.append(run)

    def wait(self) -> list[RunOutcome]:
        run = self.queue.pop(0)
        return [execute(run, self.context)]

    def close(self) -> None:
        self.queue.clear()


def _quiet_worker() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


class PoolExecutor:
    """N worker processes on this machine (spawned: no state shared with the main process)."""

    def __init__(self, context: RunContext, workers: int) -> None:
        self.capacity = workers
        self.context = context
        self.pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet_worker)
        self.running: dict[concurrent.futures.Future[RunOutcome], Run] = {}

    def submit(self, run: Run) -> None:
        self.running[self.pool.submit(execute, run, self.context)] = run

    def wait(self) -> list[RunOutcome]:
        done, _ = concurrent.futures.wait(list(self.running), return_when=concurrent.futures.FIRST_COMPLETED)
        outcomes = []
        for future in done:
            run = self.running.pop(future)
            try:
                outcomes.append(future.result())
            except concurrent.futures.process.BrokenProcessPool as exc:
                raise PrunekitError(f"a worker process died while running {run.label} (out of memory?): run the "
                                    "same command again to continue, perhaps with fewer --workers") from exc
        return outcomes

    def close(self) -> None:
        for future in self.running:
            future.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Runs as Ray tasks: a local Ray instance, or the cluster at ``address``."""

    def __init__(self, context: RunContext, workers: int, address: str | None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise PrunekitError("--executor ray needs Ray, which is not installed: pip install 'prunekit[ray]' "
                                "(or use the local executor with --workers N)") from exc
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = os.cpu_count() or 1
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise PrunekitError(f"cannot start or reach Ray at {address or 'this machine'} "
                                    f"({' '.join(str(exc).split())[:200]}): check --ray-address") from exc
        self.capacity = workers
        self.remote = ray.remote(num_cpus=context.threads or 1)(execute)
        self.context = context
        self.running: dict[Any, Run] = {}

    def submit(self, run: Run) -> None:
        self.running[self.remote.remote(run, self.context)] = run

    def wait(self) -> list[RunOutcome]:
        ready, _ = self.ray.wait(list(self.running), num_returns=1)
        outcomes = []
        for ref in ready:
            run = self.running.pop(ref)
            try:
                outcomes.append(self.ray.get(ref))
            except self.ray.exceptions.RayError as exc:
                first = " ".join(str(exc).split())[:300]
                outcomes.append(RunOutcome(run.key, False, error=f"Ray task failed: {first}"))
        return outcomes

    def close(self) -> None:
        for ref in self.running:
            self.ray.cancel(ref, force=True)
        self.running.clear()
        if self.started:
            self.ray.shutdown()


def make_executor(kind: str, context: RunContext, workers: int, address: str | None = None) -> Any:
    """The executor asked for; ``workers`` 1 with the local executor runs in this process."""
    if kind not in EXECUTORS:
        raise PrunekitError(f"unknown executor '{kind}': use local or ray")
    if workers < 1:
        raise PrunekitError(f"--workers {workers} must be at least 1")
    if kind == "ray":
        return RayExecutor(context, workers, address)
    if address:
        raise PrunekitError("--ray-address is for --executor ray")
    return InlineExecutor(context) if workers == 1 else PoolExecutor(context, workers)
