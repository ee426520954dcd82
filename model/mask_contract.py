"""The mask outputs of an exported graph and the forms finished masks are returned in (torch-free).

- ``MaskKind``: what a graph's ``masks`` output holds. ``"box28"`` (MEInst): ``[B, K, 28, 28]`` probabilities
  relative to each detection's box; ``"logprob_s4"`` (EmbedMask): ``[B, K, H/4, W/4]`` log-probabilities
  on the stride-4 grid of the padded input.
- ``MaskFormat``: how ``model.finishing`` returns a finished mask: COCO compressed RLE, COCO polygons, or
  not at all (boxes only).
"""

from __future__ import annotations

from typing import Literal

MaskKind = Literal["box28", "logprob_s4"]
MaskFormat = Literal["rle", "polygon", "none"]
# "logprob_s4" maps: their stride in input pixels, and the value outside each detection's padded box.
LOGPROB_STRIDE = 4
OUTSIDE_LOG_PROB = -10.0
