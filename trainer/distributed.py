"""Data parallelism for the trainer: the frozen base is replicated on every process and only the trained weights'
gradients (adapters, GAN head) are averaged; and the ``accelerate launch`` command ``dmd2 train --num-processes``
runs for the user."""
from __future__ import annotations

import socket
import sys

import torch


_REDUCE_BUCKET = 32 << 20  # elements per all-reduce call (128 MiB of fp32)


def _all_reduce_mean(params, world: int) -> None:
    """Average adapter gradients across processes in a few large flat buckets (one collective per bucket rather than
    one per LoRA tensor). Every rank sends the same layout (missing gradients as zeros), so the results agree bit
    for bit on all ranks."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    start = 0
    while start < len(grads):
        end, size = start, 0
        while end < len(grads) and (size == 0 or size + grads[end].numel() <= _REDUCE_BUCKET) and grads[end].dtype == grads[start].dtype:
            size += grads[end].numel()
            end += 1
        flat = torch.cat([g.reshape(-1) for g in grads[start:end]])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for g in grads[start:end]:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        start = end


def sync_and_clip(params, world: int, max_norm: float) -> float:
    """All-reduce adapter gradients across processes (the frozen base is never reduced), then clip."""
    if world > 1:
        _all_reduce_mean(params, world)
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def launch_command(num_processes: int, trainer_args: list[str], *, port: int | None = None) -> list[str]:
    """The accelerate launch command line that ``dmd2 train --num-processes N`` runs (one node, N processes; CPU
    processes use gloo, GPUs NCCL). For several nodes run ``accelerate launch`` yourself (see the README)."""
    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
            "-m", "trainer", "train", *trainer_args]
