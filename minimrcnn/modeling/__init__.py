"""The Mask R-CNN model, one concept per module: backbone, fpn, anchors, matcher,
sampling, rpn, poolers, box_head, mask_head, roi_heads, model."""
