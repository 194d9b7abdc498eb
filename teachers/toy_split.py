"""The toy teacher's UNet steps on two processes: each step's batch is split in two, one half
computed here and the other in a worker process, and the two halves' gradients are summed.

Why: the toy UNet's layers are small (32-64 channels on 16 x 16 latents), and torch's two
intra-op threads share such an operation poorly. On a 2-core machine one training step at batch 24
took 150-170 ms with two threads; two processes of one thread each, running at the same time on
half the batch, took about 128 ms each (README, "Two levers for the slow days").

How: the UNet's, the text encoders' and the caption-words heads' parameters live in shared memory,
so the optimizer's in-place step here is what the worker computes with next. The main process
draws every random number of the step (the batch, the noise, the timesteps, the caption dropout)
exactly as the one-process build does and sends the worker its rows; the worker returns its
half's gradients in shared buffers. Each half's loss is its rows' share of the batch mean, so the
sum of the two gradients is the whole batch's gradient: the build computes the same update as
the one-process build up to rounding (main's half first, then the worker's, always: the sum is
the same on every run).
"""
from __future__ import annotations

import multiprocessing.connection
from typing import Callable, Sequence

import numpy as np
import torch

def split_rows(batch: dict, start: int, stop: int) -> dict:
    """Rows ``start:stop`` of a step's batch (tensors and lists of tensors; other values as they are)."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = v[start:stop]
        elif isinstance(v, list):
            out[k] = [x[start:stop] for x in v]
        else:
            out[k] = v
    return out


def _pack(half: dict) -> dict:
    return {k: ([x.numpy() for x in v] if isinstance(v, list) else v.numpy() if torch.is_tensor(v) else v)
            for k, v in half.items()}


def _unpack(packed: dict) -> dict:
    return {k: ([torch.from_numpy(x) for x in v] if isinstance(v, list)
                else torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
            for k, v in packed.items()}


def _worker_main(conn: multiprocessing.connection.Connection, loss_fn: Callable, build_fn: Callable, spec: dict,
                 shared: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], threads: int) -> None:
    torch.set_num_threads(threads)
    models, params = build_fn(spec)
    if [q.shape for q in params] != [q.shape for q in shared]:
        raise RuntimeError("the worker's models do not have the main process's parameters")
    for q, data in zip(params, shared):
        q.data = data  # the same storage: the main process's optimizer steps are seen here
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the main process is gone
            return
        if msg is None:
            return
        half = _unpack(msg)
        for q in params:
            q.grad = None
        loss, words = loss_fn(models, half)
        loss.backward()
        had_grad = []
        with torch.no_grad():
            for q, g in zip(params, grads):
                had_grad.append(q.grad is not None)
                if q.grad is not None:
                    g.copy_(q.grad)
        conn.send((loss.item(), None if words is None else words.item(), had_grad))


class HalfBatchWorker:
    """A worker process that computes the gradient of ``loss_fn(models, half)`` on the rows it is
    sent, with the parameters ``params`` shared with this process.

    The worker builds its own models with ``build_fn(spec) -> (models, params)`` (fresh modules
    from their configs: a pickled model can lose what its library set up at construction, such as
    transformers' hidden-state recording) and points its ``params``, in the same order, at the
    shared ones. ``loss_fn`` and ``build_fn`` must be module-level functions (the worker is
    spawned and imports them). Use: ``submit(half)``, compute this process's half and its
    ``backward()``, then ``add_grads()``, which waits for the worker and adds its gradients to
    ``params``' ``.grad``. A half's tensors travel as numpy arrays (plain bytes through the pipe,
    a few kB per step, cheaper than a shared-memory segment per tensor).
    """

    def __init__(self, loss_fn: Callable, build_fn: Callable, spec: dict, params: Sequence[torch.nn.Parameter],
                 threads: int = 1):
        self.params = list(params)
        for q in self.params:
            q.share_memory_()
        self.grads = [torch.zeros_like(q).share_memory_() for q in self.params]
        shared = [q.detach() for q in self.params]
        ctx = torch.multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main,
                                args=(child, loss_fn, build_fn, spec, shared, self.grads, threads),
                                daemon=True, name="toy-teacher-half-batch")
        self.proc.start()
        child.close()
        self._pending = False

    def submit(self, half: dict) -> None:
        try:
            self.conn.send(_pack(half))
        except OSError:  # BrokenPipeError: the worker is gone
            raise RuntimeError(f"the toy teacher's build worker exited (code {self.proc.exitcode})") from None
        self._pending = True

    def _receive(self):
        # poll with a timeout so that a worker that died (killed, out of memory) is an error, not a hang
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise RuntimeError(f"the toy teacher's build worker exited (code {self.proc.exitcode}) mid-step")
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise RuntimeError("the toy teacher's build worker closed its pipe mid-step") from None

    def add_grads(self) -> tuple[float, float | None]:
        """Wait for the submitted half and add its gradients to the parameters' ``.grad`` (after this
        process's own). Returns the worker's half loss and caption-words term."""
        loss, words, had_grad = self._receive()
        self._pending = False
        with torch.no_grad():
            for q, g, had in zip(self.params, self.grads, had_grad):
                if not had:
                    continue
                if q.grad is None:
                    q.grad = g.clone()
                else:
                    q.grad.add_(g)
        return loss, words

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                if self._pending:  # an exception between submit and add_grads: drain the answer first
                    self._receive()
                self.conn.send(None)
            except (OSError, RuntimeError):  # a worker already gone
                pass
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(timeout=5)
        self.conn.close()

    def __enter__(self) -> "HalfBatchWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
