"""llama.cpp's legacy formats: 32-weight blocks with one fp16 scale (and a min for the _1 types).

Q8_0, Q4_0, Q5_0 (symmetric) and Q4_1, Q5_1 (scale + min), each with ggml's plain reference path and,
with an importance vector, its weighted search.
"""

from __future__ import annotations

import torch

from llmquant.formats import search
from llmquant.formats.base import BlockFormat

# ==== symmetric: Q8_0, Q4_0, Q5_0 ====

# ==== end of symmetric ====

# ==== scale + min: Q4_1, Q5_1 ====

# ==== end of scale + min ====
