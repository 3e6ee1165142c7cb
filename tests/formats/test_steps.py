"""The block formats' public steps (choose_params → encode → pack, unpack, reconstruct) for every format with
parameters, against ggml's bytes and gguf's dequantizer.

The list of formats is the registry's: a new format is tested here as soon as it is registered. The codebook
i-quants (IQ1/IQ2/IQ3) have one level per codeword of 4 or 8 weights rather than per weight: the per-weight
tests take the others, and their own tests (at the end) check the same behaviours codeword by codeword.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmquant.formats import FORMATS
from llmquant.formats.base import row_mean_square
from llmquant.formats.iq_lowbit import SIGN_GROUP, CodebookFormat
from llmquant.oracles.ggml import ggml_quantize, ggml_requires_imatrix
from tests.formats.compare import heavy_tailed, random_imatrix

BLOCK_FORMATS = sorted(name for name, fmt in FORMATS.items() if hasattr(fmt, "Params"))
CODEBOOK_FORMATS = [name for name in BLOCK_FORMATS if isinstance(FORMATS[name], CodebookFormat)]
PER_WEIGHT_FORMATS = [name for name in BLOCK_FORMATS if name not in CODEBOOK_FORMATS]
ROWS, COLUMNS = 16, 512


def test_every_quantized_format_exposes_the_steps():
    unquantized = {name for name in FORMATS if name not in BLOCK_FORMATS}
    assert unquantized == {"F32", "F16", "BF16"}


def _blocks(fmt, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-tailed weights as blocks, with a random importance vector laid out per weight."""
    weights = heavy_tailed(ROWS, COLUMNS, seed=seed)
    imatrix = random_imatrix(COLUMNS, seed=seed + 1)
    blocks = torch.from_numpy(weights).reshape(-1, fmt.block_size)
    importance = torch.from_numpy(np.broadcast_to(imatrix, weights.shape).copy()).reshape(-1, fmt.block_size)
    return blocks, importance


def _gguf_dequantize(data: torch.Tensor, type_name: str) -> np.ndarray:
    return gguf_quants.dequantize(data.numpy(), GGMLQuantizationType[type_name]).reshape(data.shape[0], -1)


@pytest.mark.parametrize("type_name", BLOCK_FORMATS)
@pytest.mark.parametrize("with_importance", [False, True])
def test_quantize_blocks_gives_ggml_bytes_of_one_block_rows(type_name, with_importance):
    fmt = FORMATS[type_name]
    blocks, _ = _blocks(fmt, seed=3)
    vector = random_imatrix(fmt.block_size, seed=4) if with_importance else None
    # the same importance for every block, so that ggml's rows of one block each see what our blocks see
    importance = None if vector is None else torch.from_numpy(vector).expand(blocks.shape[0], -1)
    if vector is None and ggml_requires_imatrix(type_name):  # ggml aborts without one; we refuse
        with pytest.raises(ValueError, match="needs an importance vector"):
            fmt.quantize_blocks(blocks, importance)
        return
    ours = fmt.quantize_blocks(blocks, importance)
    theirs = ggml_quantize(blocks.numpy(), type_name, imatrix=vector)
    assert np.array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize("type_name", PER_WEIGHT_FORMATS)
def test_pack_of_encode_under_chosen_params_gives_ggml_bytes(type_name):
    fmt = FORMATS[type_name]
    weights = heavy_tailed(ROWS, COLUMNS, seed=5)
    imatrix = random_imatrix(COLUMNS, seed=6)
    rows = torch.from_numpy(weights)
    blocks = rows.reshape(-1, fmt.block_size)
    importance = torch.from_numpy(imatrix).reshape(1, -1).expand(ROWS, -1).reshape(-1, fmt.block_size)
    # the legacy types' importance search also weighs by each row's mean square, as quantize_rows passes it
    row_sigma2 = row_mean_square(rows).repeat_interleave(COLUMNS // fmt.block_size) if fmt.uses_row_statistics else None
    params = fmt.choose_params(blocks, importance, row_sigma2=row_sigma2)
    theirs = ggml_quantize(weights, type_name, imatrix=imatrix).reshape(-1, fmt.bytes_per_block)
    encoded = fmt.pack(fmt.encode(blocks, params), params).numpy()
    # the parameters are ggml's in every format ...
    assert np.array_equal(fmt.pack(fmt.unpack(torch.from_numpy(theirs))[0], params).numpy(), theirs)
    if fmt.levels_from_search is None:  # ... and so are the levels, where ggml re-rounds under them
        assert np.array_equal(encoded, theirs)
    else:  # ggml's levels come from its search: ours are the nearest levels, so never farther from the weights
        ours_error = np.abs(_gguf_dequantize(torch.from_numpy(encoded), type_name) - blocks.numpy())
        ggml_error = np.abs(_gguf_dequantize(torch.from_numpy(theirs), type_name) - blocks.numpy())
        assert (ours_error <= ggml_error * (1 + 1e-6) + 1e-12).all()


@pytest.mark.parametrize("type_name", BLOCK_FORMATS)
def test_unpack_inverts_pack(type_name):
    fmt = FORMATS[type_name]
    blocks, importance = _blocks(fmt, seed=7)
    data = fmt.quantize_blocks(blocks, importance)
    levels, params = fmt.unpack(data)
    values = fmt.reconstruct(params).values
    if type_name in CODEBOOK_FORMATS:  # a level per codeword: its index in the grid (the low 16 bits)
        assert levels.shape == (blocks.shape[0], fmt.block_size // values.shape[1])
        assert int(levels.min()) >= 0 and int((levels & 0xFFFF).max()) < values.shape[0]
    else:
        assert levels.shape == blocks.shape
        assert int(levels.min()) >= 0 and int(levels.max()) < values.numel()
    assert torch.equal(fmt.pack(levels, params), data)
    again_levels, again_params = fmt.unpack(fmt.pack(levels, params))
    assert torch.equal(again_levels, levels)
    assert all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float16 else a,
                           b.view(torch.uint8) if b.dtype == torch.float16 else b)
               for a, b in zip(again_params, params, strict=True))


@pytest.mark.parametrize("type_name", BLOCK_FORMATS)
def test_reconstruct_is_what_gguf_dequantizes(type_name):
    fmt = FORMATS[type_name]
    blocks, importance = _blocks(fmt, seed=9)
    data = fmt.quantize_blocks(blocks, importance)
    levels, params = fmt.unpack(data)
    ours = fmt.reconstruct(params).weights(levels).numpy()
    assert np.array_equal(ours, _gguf_dequantize(data, type_name))


@pytest.mark.parametrize("type_name", PER_WEIGHT_FORMATS)
def test_encode_under_fixed_params_picks_the_nearest_level(type_name):
    fmt = FORMATS[type_name]
    first, importance = _blocks(fmt, seed=11)
    other, _ = _blocks(fmt, seed=12)
    params = fmt.choose_params(first, importance)  # parameters of one matrix, levels of another
    data = fmt.pack(fmt.encode(other, params), params)
    chosen = _gguf_dequantize(data, type_name).astype(np.float64)
    grid = fmt.reconstruct(params)
    every_level = torch.arange(grid.values.numel()).reshape(1, 1, -1)
    candidates = (grid.scale[:, :, None] * grid.values[every_level]).double()
    if grid.offset is not None:
        candidates = candidates + grid.offset[:, :, None].double()
    target = other.double().numpy()
    nearest = np.abs(candidates.numpy() - target[:, :, None]).min(axis=2)
    distance = np.abs(chosen - target)
    # the nearest up to float32 rounding of the scaled value (a tie may go either way)
    slack = 1e-6 * np.abs(grid.scale.double().numpy()) * np.abs(grid.values.double().numpy()).max() + 1e-30
    assert (distance <= nearest + slack).all()


@pytest.mark.parametrize("type_name", PER_WEIGHT_FORMATS)
def test_encoding_column_by_column_equals_the_whole_block(type_name):
    fmt = FORMATS[type_name]
    blocks, importance = _blocks(fmt, seed=13)
    params = fmt.choose_params(blocks, importance)
    whole = fmt.encode(blocks, params)
    by_column = torch.cat([fmt.encode(blocks[:, j:j + 1], params, columns=slice(j, j + 1))
                           for j in range(fmt.block_size)], dim=1)
    assert torch.equal(by_column, whole)
    positions = torch.randperm(fmt.block_size, generator=torch.Generator().manual_seed(0))[:8]
    assert torch.equal(fmt.encode(blocks[:, positions], params, columns=positions), whole[:, positions])


@pytest.mark.parametrize("type_name", BLOCK_FORMATS)
def test_params_of_numpy_and_torch_inputs_agree(type_name):
    fmt = FORMATS[type_name]
    blocks, importance = _blocks(fmt, seed=15)
    from_numpy = fmt.choose_params(blocks.numpy(), importance.numpy())
    from_torch = fmt.choose_params(blocks, importance)
    for a, b in zip(from_numpy, from_torch, strict=True):
        assert isinstance(a, torch.Tensor) and a.shape[0] == blocks.shape[0]
        assert torch.equal(a.float(), b.float())


# ---- the codebook i-quants: the same behaviours, codeword by codeword ----


def _sign_group_errors(data: torch.Tensor, type_name: str, blocks: torch.Tensor) -> np.ndarray:
    """Squared error of each group of 8 weights (a sign byte, an 8-wide codeword, two 4-wide ones)."""
    error = (_gguf_dequantize(data, type_name).astype(np.float64) - blocks.double().numpy()) ** 2
    return error.reshape(error.shape[0], -1, SIGN_GROUP).sum(axis=2)


@pytest.mark.parametrize("type_name", CODEBOOK_FORMATS)
def test_codebook_pack_of_encode_under_ggml_params_is_never_farther_than_ggml(type_name):
    fmt = FORMATS[type_name]
    weights = heavy_tailed(ROWS, COLUMNS, seed=5)
    imatrix = random_imatrix(COLUMNS, seed=6)
    blocks = torch.from_numpy(weights).reshape(-1, fmt.block_size)
    importance = torch.from_numpy(imatrix).reshape(1, -1).expand(ROWS, -1).reshape(-1, fmt.block_size)
    params = fmt.choose_params(blocks, importance)
    theirs = torch.from_numpy(ggml_quantize(weights, type_name, imatrix=imatrix).reshape(-1, fmt.bytes_per_block))
    # the parameters are ggml's ...
    assert torch.equal(fmt.pack(fmt.unpack(theirs)[0], params), theirs)
    # ... and ggml's codewords (from its search) are one choice among those encode weighs: ours are never farther
    ours = fmt.pack(fmt.encode(blocks, params), params)
    ours_error = _sign_group_errors(ours, type_name, blocks)
    ggml_error = _sign_group_errors(theirs, type_name, blocks)
    assert (ours_error <= ggml_error * (1 + 1e-5) + 1e-30).all()
    assert ours_error.sum() < ggml_error.sum()


def _free_signs(type_name: str) -> bool:
    """Whether a codeword's signs follow its weights freely (no parity rule to satisfy)."""
    searcher = getattr(FORMATS[type_name], "searcher", None)
    return searcher is None or not searcher.parity_signs


@pytest.mark.parametrize("type_name", [name for name in CODEBOOK_FORMATS if _free_signs(name)])
def test_codebook_encode_picks_the_nearest_signed_codeword(type_name):
    """Against a brute force over every codeword (and for IQ1_M both shifts), in float64, on the formats whose
    signs are free (the parity formats are checked against ggml's choice above)."""
    fmt = FORMATS[type_name]
    first, importance = _blocks(fmt, seed=11)
    other, _ = _blocks(fmt, seed=12)
    params = fmt.choose_params(first, importance)
    levels = fmt.encode(other, params)
    grid = fmt.reconstruct(params)
    values = grid.values.double()  # [n_grid, width]
    width = values.shape[1]
    target = other.double().reshape(other.shape[0], -1, width)  # [n, codewords, width]
    scale = grid.scale.double()[:, :, None, None]
    if hasattr(grid, "shifts"):  # IQ1: scale·(value ± 1/8), the shift fixed (IQ1_S) or free (IQ1_M)
        shifts = [grid.shift.double()] if grid.shift is not None else [torch.full_like(grid.scale.double(), d)
                                                                        for d in (0.125, -0.125)]
        errors = torch.stack([((scale * (values[None, None] + d[:, :, None, None]) - target[:, :, None]) ** 2)
                              .sum(dim=3) for d in shifts]).amin(dim=0)
    else:  # IQ2/IQ3: scale·value with the weight's sign
        errors = ((scale * values[None, None] - target.abs()[:, :, None]) ** 2).sum(dim=3)
    best = errors.amin(dim=2)
    chosen = torch.from_numpy(_gguf_dequantize(fmt.pack(levels, params), type_name)).double()
    chosen_error = ((chosen.reshape(target.shape) - target) ** 2).sum(dim=2)
    assert (chosen_error <= best * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("type_name", CODEBOOK_FORMATS)
def test_codebook_encode_by_groups_of_8_columns_equals_the_whole_block(type_name):
    fmt = FORMATS[type_name]
    blocks, importance = _blocks(fmt, seed=13)
    params = fmt.choose_params(blocks, importance)
    whole = fmt.encode(blocks, params)
    per_codeword = fmt.block_size // whole.shape[1]
    parts = [fmt.encode(blocks[:, j:j + SIGN_GROUP], params, columns=slice(j, j + SIGN_GROUP))
             for j in range(0, fmt.block_size, SIGN_GROUP)]
    assert torch.equal(torch.cat(parts, dim=1), whole)
    assert parts[0].shape[1] == SIGN_GROUP // per_codeword
    with pytest.raises(ValueError, match="whole"):
        fmt.encode(blocks[:, 3:5], params, columns=slice(3, 5))
