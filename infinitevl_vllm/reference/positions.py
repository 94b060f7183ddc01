"""Multimodal RoPE position ids (the Qwen2.5-VL rule).

Text tokens advance all three rows (temporal, height, width) together.  The tokens of an
image or video (after 2x2 merging: t x h x w of them) take row values
(start + t_i * seconds_per_grid * tokens_per_second, start + h_i, start + w_i); the text after
it starts at the largest id used so far plus one.  Images use a time step of 0.
"""

from __future__ import annotations

import torch


def mrope_positions(
    input_ids: list[int] | torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: float,
    second_per_grid_ts: list[float] | None = None,
) -> tuple[torch.Tensor, int]:
    """Returns (positions [3, T] long, delta) where decode step n uses position T + n + delta."""
    ids = torch.as_tensor(input_ids).tolist()
    grids = {
        image_token_id: iter([] if image_grid_thw is None else image_grid_thw.tolist()),
        video_token_id: iter([] if video_grid_thw is None else video_grid_thw.tolist()),
    }
    seconds = iter(second_per_grid_ts or [])
    rows: list[torch.Tensor] = []
    next_id = 0
    i = 0
    while i < len(ids):
        tok = ids[i]
        if tok in grids and i > 0 and ids[i - 1] == vision_start_token_id:
            t, h, w = next(grids[tok])
            h, w = h // spatial_merge_size, w // spatial_merge_size
            step = 0.0 if tok == image_token_id else next(seconds, 1.0)
            tt = (torch.arange(t) * step * tokens_per_second).long()
            grid = torch.stack(
                [
                    tt.view(t, 1, 1).expand(t, h, w),
                    torch.arange(h).view(1, h, 1).expand(t, h, w),
                    torch.arange(w).view(1, 1, w).expand(t, h, w),
                ]
            ).reshape(3, -1)
            rows.append(grid + next_id)
            next_id = int(rows[-1].max()) + 1
            i += t * h * w
            continue
        rows.append(torch.full((3, 1), next_id, dtype=torch.long))
        next_id += 1
        i += 1
    positions = torch.cat(rows, dim=1) if rows else torch.zeros(3, 0, dtype=torch.long)
    return positions, next_id - len(ids)
