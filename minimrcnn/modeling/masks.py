"""Masks between the image and the RoI: training targets cut from ground truth, and
predicted M x M masks pasted back into the image.

Both directions use the same continuous geometry: pixel (i, j) covers
[j, j+1) x [i, i+1) and its centre is (j + 0.5, i + 0.5); a box (x1, y1, x2, y2) is
divided into M x M equal cells.

- Targets: RoIAlign (aligned=True) samples each ground-truth mask, as a float
  image, at the cell centres of its proposal box; >= 0.5 makes it binary again.
- Paste (Detectron2's ``_do_paste_mask``): each image pixel centre inside the box's
  window is mapped into the M x M grid and read with bilinear interpolation
  (``grid_sample``, align_corners=False, zeros outside), then thresholded.

Shape shorthand:
    G: ground-truth masks of one image, each H x W
    R: RoIs; M: mask resolution
    D: detections; Wd, Hd: the largest paste window among them
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minimrcnn.ops.roi_align import roi_align

# A resampled mask pixel is foreground when at least half of it was.
MASK_TARGET_THRESHOLD = 0.5
# Paste in chunks so that D x Hd x Wd floats stay within this many elements.
PASTE_CHUNK_ELEMENTS = 1 << 24


def mask_targets_for_image(
    gt_masks: torch.Tensor,
    proposals: torch.Tensor,
    matched_gt: torch.Tensor,
    resolution: int,
    box_scale: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Binary M x M targets: each proposal's ground-truth mask seen through the proposal.

    gt_masks: [G, H, W] uint8/bool; proposals: [R, 4] xyxy; matched_gt: [R] int64 in 0..G-1.
    box_scale: (sx, sy) that maps the masks' pixel grid to the proposals' coordinates
    (the model's resize factor): the proposals are divided by it, so masks never need
    resizing. Returns [R, M, M] float32 in {0, 1}.
    """
    num_rois = proposals.shape[0]
    if num_rois == 0:
        return proposals.new_zeros((0, resolution, resolution))
    # Only the matched masks become float: a COCO image may carry dozens of large masks.
    used_gt, roi_to_used = torch.unique(matched_gt, return_inverse=True)
    mask_images = gt_masks[used_gt][:, None].to(torch.float32)  # (g, H, W) -> (g, 1, H, W)
    scale_x, scale_y = box_scale
    boxes = proposals.detach().to(torch.float32) / proposals.new_tensor(
        [scale_x, scale_y, scale_x, scale_y], dtype=torch.float32
    )
    rois = torch.cat([roi_to_used[:, None].to(torch.float32), boxes], dim=1)
    resampled = roi_align(mask_images, rois, resolution, spatial_scale=1.0,
                          sampling_ratio=0, aligned=True)  # (R, 1, M, M)
    return (resampled[:, 0] >= MASK_TARGET_THRESHOLD).to(torch.float32)


def _paste_windows(boxes: torch.Tensor, resolution: int, image_size: tuple[int, int]):
    """Integer pixel windows [x0, x1) x [y0, y1) covering each box, clipped to the image.

    Bilinear reads stay non-zero up to half a mask cell past the box edge, so the
    window reaches that far (plus a pixel) to paste exactly what a full-image paste would.
    """
    height, width = image_size
    margin_x = (boxes[:, 2] - boxes[:, 0]).abs() / (2 * resolution) + 1
    margin_y = (boxes[:, 3] - boxes[:, 1]).abs() / (2 * resolution) + 1
    x0 = (boxes[:, 0] - margin_x).floor().clamp(0, width).to(torch.int64)
    y0 = (boxes[:, 1] - margin_y).floor().clamp(0, height).to(torch.int64)
    x1 = (boxes[:, 2] + margin_x).ceil().clamp(0, width).to(torch.int64)
    y1 = (boxes[:, 3] + margin_y).ceil().clamp(0, height).to(torch.int64)
    return x0, y0, torch.maximum(x1, x0), torch.maximum(y1, y0)


def _paste_chunk(mask_probs, boxes, x0, y0, window_w, window_h, threshold, image_size):
    """Paste one chunk of masks. Returns (detection, row, col) of the foreground pixels."""
    height, width = image_size
    device = mask_probs.device
    # Pixel centres of each window, in image coordinates: (D, Wd) and (D, Hd).
    centres_x = x0[:, None] + torch.arange(window_w, device=device)[None, :] + 0.5
    centres_y = y0[:, None] + torch.arange(window_h, device=device)[None, :] + 0.5
    boxes = boxes.to(torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    box_w = (boxes[:, 2] - boxes[:, 0]).clamp(min=tiny)
    box_h = (boxes[:, 3] - boxes[:, 1]).clamp(min=tiny)
    # The box spans [-1, 1] in grid_sample's normalized coordinates.
    grid_x = (centres_x - boxes[:, 0, None]) / box_w[:, None] * 2 - 1  # (D, Wd)
    grid_y = (centres_y - boxes[:, 1, None]) / box_h[:, None] * 2 - 1  # (D, Hd)
    grid = torch.stack(
        (grid_x[:, None, :].expand(-1, window_h, -1), grid_y[:, :, None].expand(-1, -1, window_w)),
        dim=3,
    )  # (D, Hd, Wd, 2) as (x, y)
    sampled = F.grid_sample(mask_probs[:, None].to(torch.float32), grid.to(torch.float32),
                            mode="bilinear", padding_mode="zeros", align_corners=False)
    window_masks = sampled[:, 0] >= threshold  # (D, Hd, Wd)
    # Windows are padded to the chunk's largest: drop pixels past the image edge.
    rows = centres_y.floor().to(torch.int64)  # (D, Hd)
    cols = centres_x.floor().to(torch.int64)  # (D, Wd)
    inside = (rows < height)[:, :, None] & (cols < width)[:, None, :]
    detection, window_row, window_col = torch.nonzero(window_masks & inside, as_tuple=True)
    return detection, rows[detection, window_row], cols[detection, window_col]


def _chunks_by_window(window_w: list[int], window_h: list[int], order: list[int]):
    """Split ``order`` into runs whose padded windows fit PASTE_CHUNK_ELEMENTS."""
    chunks, current, max_w, max_h = [], [], 0, 0
    for index in order:
        grown_w, grown_h = max(max_w, window_w[index]), max(max_h, window_h[index])
        if current and (len(current) + 1) * grown_w * grown_h > PASTE_CHUNK_ELEMENTS:
            chunks.append((current, max_w, max_h))
            current, grown_w, grown_h = [], window_w[index], window_h[index]
        current.append(index)
        max_w, max_h = grown_w, grown_h
    if current:
        chunks.append((current, max_w, max_h))
    return chunks


def paste_masks_in_image(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
) -> torch.Tensor:
    """Paste M x M foreground probabilities into full-image binary masks.

    mask_probs: [D, M, M] in [0, 1]; boxes: [D, 4] xyxy in the target image's pixels;
    image_size: (H, W). Returns [D, H, W] bool. Only a window around each box is
    sampled (the mask is zero outside it), so the cost follows box area, not image area.
    """
    height, width = int(image_size[0]), int(image_size[1])
    num_masks = mask_probs.shape[0]
    pasted = torch.zeros((num_masks, height, width), dtype=torch.bool, device=mask_probs.device)
    if num_masks == 0:
        return pasted
    if boxes.shape != (num_masks, 4):
        raise ValueError(f"boxes: expected [{num_masks}, 4], got {tuple(boxes.shape)}")
    if mask_probs.dim() != 3 or mask_probs.shape[1] != mask_probs.shape[2]:
        raise ValueError(f"mask_probs: expected [D, M, M], got {tuple(mask_probs.shape)}")
    x0, y0, x1, y1 = _paste_windows(boxes, mask_probs.shape[-1], (height, width))
    window_w, window_h = (x1 - x0).tolist(), (y1 - y0).tolist()
    # Sorted by window area, each chunk pads its windows to similar sizes.
    order = torch.argsort((x1 - x0) * (y1 - y0)).tolist()
    for chunk, chunk_w, chunk_h in _chunks_by_window(window_w, window_h, order):
        if chunk_w == 0 or chunk_h == 0:
            continue
        chunk = torch.tensor(chunk, device=mask_probs.device)
        detection, rows, cols = _paste_chunk(
            mask_probs[chunk], boxes[chunk], x0[chunk], y0[chunk], chunk_w, chunk_h,
            threshold, (height, width),
        )
        pasted[chunk[detection], rows, cols] = True
    return pasted


def paste_mask_probs_torchvision(mask_probs: torch.Tensor, boxes: torch.Tensor,
                                 image_size: tuple[int, int], padding: int = 1) -> torch.Tensor:
    """torchvision's paste (``mask_paste="torchvision"``): full-image probabilities [D, H, W].

    mask_probs: [D, M, M]; boxes: [D, 4] in the image's pixels. Each mask gets a border of
    ``padding`` zero cells, its box grows about its centre by (M + 2 padding) / M so the
    border falls outside the box, the box corners are truncated to int64, and the padded
    mask is resized bilinearly (align_corners=False) to the inclusive pixel box
    ``(x2 - x1 + 1) x (y2 - y1 + 1)`` and copied in, clipped to the image. Unlike
    :func:`paste_masks_in_image` the mask is stretched over whole pixels, so it can sit
    up to a pixel off the box.
    """
    height, width = int(image_size[0]), int(image_size[1])
    num_masks = mask_probs.shape[0]
    pasted = mask_probs.new_zeros((num_masks, height, width))
    if num_masks == 0:
        return pasted
    resolution = mask_probs.shape[-1]
    scale = float(resolution + 2 * padding) / resolution
    padded = F.pad(mask_probs[:, None], (padding,) * 4)  # (D, 1, M + 2p, M + 2p)
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    centre_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    centre_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    expanded = torch.stack((centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h),
                           dim=1).to(torch.int64)  # truncation toward zero, as .to(int64) does
    for index, (x0, y0, x1, y1) in enumerate(expanded.tolist()):
        box_w, box_h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        resized = F.interpolate(padded[index:index + 1], size=(box_h, box_w), mode="bilinear",
                                align_corners=False)[0, 0]
        left, right = max(x0, 0), min(x1 + 1, width)
        top, bottom = max(y0, 0), min(y1 + 1, height)
        if right > left and bottom > top:
            pasted[index, top:bottom, left:right] = resized[top - y0:bottom - y0, left - x0:right - x0]
    return pasted


__all__ = [
    "MASK_TARGET_THRESHOLD",
    "mask_targets_for_image",
    "paste_mask_probs_torchvision",
    "paste_masks_in_image",
]
