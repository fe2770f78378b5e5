# TEMPORARY during development of issue 5: appended to kernels/configs.py once final, then deleted.
import triton

POINTWISE_BLOCK = 2048
POINTWISE_NUM_WARPS = 8


def triplet_config(dim, dtype):
    import torch
    elements = 1024 if dtype == torch.float64 else 2048
    block_d = min(triton.next_power_of_2(max(dim, 1)), 512)
    return max(1, min(64, elements // block_d)), block_d, 4


def batch_hard_mine_config(dtype):
    import torch
    if dtype == torch.float64:
        return 32, 32, 16, 4, 2
    if dtype == torch.float32:
        return 64, 64, 16, 8, 2
    return 64, 64, 64, 8, 3


def batch_hard_loss_config(dim, dtype):
    import torch
    elements = 512 if dtype == torch.float64 else 1024
    block_d = min(triton.next_power_of_2(max(dim, 1)), 256)
    return max(1, elements // block_d), block_d, 4


def distillation_config(n_classes, dtype):
    import torch
    if n_classes >= 2048:
        return 1, 2048 if dtype == torch.float64 else 4096, 8
    block_v = max(triton.next_power_of_2(n_classes), 2)
    return max(1, min(16, 1024 // block_v)), block_v, 4
