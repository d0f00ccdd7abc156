"""Normalizers for data-parallel training (DistributedDataParallel), computed on the device without a host sync.

A detector normalizes its summed classification loss by the number of positive anchors. Under DDP each process
sees part of the batch, and DDP averages the gradients of the processes: to train the same model as one process on
the whole batch, each process must divide its local sum by the *global* number of positives divided by the number
of processes (as detectron2's FCOS and mmdet's heads do with `reduce_mean(num_pos)`):

    loss_r = S_r / (P / W)   =>   (1 / W) sum_r d loss_r = d (sum_r S_r) / P,   P = sum_r P_r, W = world size.
"""
import torch
import torch.distributed as dist


def global_normalizer(local_count, *, clamp_min: float = 1.0, group=None, device=None) -> torch.Tensor:
    """The normalizer to pass to `multilevel_focal_loss` / `focal_loss` under DDP: the sum of `local_count` over
    the processes of `group`, divided by their number, clamped below at `clamp_min`, as a 0-d float32 tensor on
    `local_count`'s device. One all_reduce, no host sync (the value is never read on the host), so it can sit in a
    compiled or CUDA-graph-captured loss stage. Without an initialized process group it is `local_count` itself
    (clamped), so the same code runs on one process.

    Args:
        local_count: this process's number of positive anchors: a tensor (any numeric dtype, e.g. the int64 result
            of `(labels >= 0).sum()`) or a Python number.
        clamp_min: lower bound of the result (detectors use 1 so that a batch without positives does not divide by
            0).
        group: the process group (default: the world).
        device: where a Python-number `local_count` goes (default: the current CUDA device when the group's
            backend is NCCL, else the CPU). Tensors stay on their device.
    """
    if isinstance(local_count, torch.Tensor):
        if local_count.numel() != 1:
            raise ValueError(f"local_count must hold one number, got shape {tuple(local_count.shape)}")
        total = local_count.detach().reshape(()).to(torch.float32, copy=True)
    else:
        distributed = dist.is_available() and dist.is_initialized()
        if device is None:
            nccl = distributed and dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        total = torch.tensor(float(local_count), dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        total = total / dist.get_world_size(group)
    return total.clamp(min=clamp_min)
