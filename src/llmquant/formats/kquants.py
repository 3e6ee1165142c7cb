"""llama.cpp's k-quants: 256-weight super-blocks of sub-blocks with quantized scales (and mins).

Q3_K and Q6_K (symmetric sub-blocks), Q2_K, Q4_K and Q5_K (scale + min sub-blocks), each with ggml's
reference path and, with an importance vector, its weighted search.
"""

from __future__ import annotations

import torch

from llmquant.formats import search
from llmquant.formats.base import BlockFormat

# ==== symmetric: Q3_K, Q6_K ====

# ==== end of symmetric ====

# ==== scale + min: Q2_K, Q4_K, Q5_K ====

# ==== end of scale + min ====
