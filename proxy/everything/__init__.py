"""Segment everything (upstream `SamAutomaticMaskGenerator`) without torch, in parts:

- `params`: the request's settings, upstream's names, defaults and checked ranges;
- `upstream`: numpy ports of upstream's helpers (grids, crop boxes, NMS, region clean-up);
- `crops`: the crops and the decoder prompts of their grid points;
- `masks`: per-batch filtering and RLE bookkeeping (`MaskData`), crop and merge steps, records;
- `regions`: the optional small-region clean-up on RLE masks;
- `pipeline`: the loop over crops and decoder batches, with the model behind `MaskModel`.
"""
