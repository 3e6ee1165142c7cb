"""Unquantized types: F32, F16, BF16 (block size 1)."""

from __future__ import annotations

import torch

from llmquant.formats.base import BlockFormat
