"""Shared scale searches (weighted least squares over candidate scales) the format families call.

Every function works on a whole batch of groups at once: ``x`` is float32 ``[n_groups, group_size]``.
Two helpers write this file at once: each keeps to its own section (edit with small anchored replacements).
"""

from __future__ import annotations

import torch

# ==== symmetric searches (make_qx_quants, make_q3_quants, nearest_int) ====

# ==== end of symmetric searches ====

# ==== scale + min searches (make_qkx1/2/3_quants, make_qp_quants) ====

# ==== end of scale + min searches ====
