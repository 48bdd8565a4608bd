"""Inference path of the convolutional feature extractor (thesis 3.2): fairseq's
``ConvFeatureExtractionModel`` in "default" mode (a conv with a per-channel GroupNorm and GELU,
then conv and GELU blocks), computed channels last, in tiles of output frames, with matrix
products in place of convolutions. Equal to the extractor within float32 rounding and faster on
the CPU: the 30 s windows of probing make tensors of hundreds of MB per layer, which tiles (on
one thread) never allocate (fresh large allocations are page-faulted in on every call) and which
a tile keeps in the cache from one layer to the next.
"""

import torch
from torch import nn

TILE_FRAMES = 64  # output frames per tile on one thread: 64 x 64 + 78 first-layer frames, 8.5 MB


def fold_group_norm(
    wav: torch.Tensor, conv: nn.Conv1d, norm: nn.GroupNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """``folded`` [B, K, C] and ``shift`` [B, C] with ``norm(conv(wav[:, None]))[b, :, t] ==
    windows[b, t] @ folded[b] + shift[b]``, for the unpadded windows ``wav[b].unfold(0, K, stride)``
    of a single-input-channel ``conv`` followed by a per-channel GroupNorm.

    The conv output of channel c is w_c . u_t for window u_t, so its mean over time is w_c . mean(u)
    and its variance w_c' Cov(u) w_c: the norm's statistics come from the K x K window covariance
    (in float64), and its scale and shift fold into the conv weights. The conv bias cancels in the
    norm. The statistics span the whole of ``wav``, so any tile of frames can be computed alone."""
    (kernel,), (stride,) = conv.kernel_size, conv.stride
    windows = wav.double().unfold(1, kernel, stride)  # [B, frames, K]
    mean_window = windows.mean(dim=1)
    centered = windows - mean_window[:, None, :]
    covariance = centered.transpose(1, 2) @ centered / windows.shape[1]
    weight = conv.weight[:, 0, :].double()  # [C, K]
    variance = torch.einsum("ck,bkl,cl->bc", weight, covariance, weight)
    scale = norm.weight.double() / torch.sqrt(variance + norm.eps)
    shift = norm.bias.double() - (mean_window @ weight.T) * scale
    folded = weight.T[None] * scale[:, None, :]
    return folded.to(wav.dtype), shift.to(wav.dtype)


def strided_conv(x: torch.Tensor, taps: torch.Tensor, stride: int, bias: torch.Tensor | None) -> torch.Tensor:
    """An unpadded, ungrouped convolution of channels-last ``x`` [T, C] with ``taps`` [K, C, C']
    (``conv.weight.permute(2, 1, 0)``) -> [T', C']: one matrix product per kernel tap, each
    reading the strided view of the rows that tap sees (no unfolded copy), accumulated in place."""
    kernel = taps.shape[0]
    frames = (x.shape[0] - kernel) // stride + 1
    span = (frames - 1) * stride + 1
    out = x[:span:stride] @ taps[0] if bias is None else torch.addmm(bias, x[:span:stride], taps[0])
    for tap in range(1, kernel):
        out.addmm_(x[tap : tap + span : stride], taps[tap])
    return out


def is_default_mode(extractor: nn.Module) -> bool:
    """Whether ``extractor`` has the block layout `extractor_features` computes: a single-input
    conv, dropout, per-channel GroupNorm and activation, then blocks of conv, dropout and
    activation."""
    first, *rest = extractor.conv_layers
    return (
        len(first) == 4
        and isinstance(first[2], nn.GroupNorm)
        and first[2].num_groups == first[2].num_channels
        and first[0].in_channels == 1
        and all(len(block) == 3 and isinstance(block[0], nn.Conv1d) for block in rest)
    )


def input_span(start: int, stop: int, convs: list[nn.Conv1d]) -> tuple[int, int]:
    """The input frames [first, last) from which the stack ``convs`` computes output frames
    [start, stop)."""
    for conv in reversed(convs):
        (kernel,), (stride,) = conv.kernel_size, conv.stride
        start, stop = start * stride, (stop - 1) * stride + kernel
    return start, stop


def extractor_features(extractor: nn.Module, wav: torch.Tensor) -> torch.Tensor:
    """``extractor(wav).transpose(1, 2)`` [B, frames, C] for ``wav`` [B, samples] and a
    default-mode extractor (`is_default_mode`), in eval mode: per clip and per tile of output
    frames, the first block from the folded GroupNorm (`fold_group_norm`), the others by
    `strided_conv`. A tile recomputes the few frames it shares with its neighbours.

    Tiles of `TILE_FRAMES` on one thread; on several, the whole clip is one tile: each matrix
    product is a synchronisation point of the threads, and on a busy 2-core machine the ~1000
    small products of 64-frame tiles cost more than the memory they save (benchmarks/
    extract_features.py: 0.68x transformers' clips/s with 64-frame tiles, 1.06x with none)."""
    first, *rest = extractor.conv_layers
    convs = [first[0]] + [block[0] for block in rest]
    activations = [first[3]] + [block[2] for block in rest]
    taps = [conv.weight.permute(2, 1, 0).contiguous() for conv in convs[1:]]
    folded, shift = fold_group_norm(wav, first[0], first[2])
    (kernel,), (stride,) = first[0].kernel_size, first[0].stride
    frames = (wav.shape[1] - kernel) // stride + 1
    for conv in convs[1:]:
        frames = (frames - conv.kernel_size[0]) // conv.stride[0] + 1
    out = wav.new_empty(wav.shape[0], frames, convs[-1].out_channels)
    tile = TILE_FRAMES if torch.get_num_threads() == 1 else frames
    for start in range(0, frames, tile):
        stop = min(start + tile, frames)
        first_frame, last_frame = input_span(start, stop, convs[1:])
        samples = wav[:, first_frame * stride : (last_frame - 1) * stride + kernel]
        for item in range(wav.shape[0]):
            windows = samples[item].unfold(0, kernel, stride)
            x = activations[0](torch.addmm(shift[item], windows, folded[item]))
            for conv, weights, activation in zip(convs[1:], taps, activations[1:]):
                x = activation(strided_conv(x, weights, conv.stride[0], conv.bias))
            out[item, start:stop] = x
    return out
