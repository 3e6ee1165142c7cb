"""llama.cpp's importance-matrix i-quants: IQ4_NL (32-weight blocks) and IQ4_XS (256-weight super-blocks)
on the non-linear 16-value grid. Later: IQ3_*, IQ2_*, IQ1_* with their grids as data."""

from __future__ import annotations

import torch

from llmquant.formats.base import BlockFormat
