"""formats.quantize / formats.dequantize: the checks people meet first and the numpy/torch contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmquant.formats import FORMATS, dequantize, get_format, quantize
from llmquant.oracles.ggml import ggml_quantize
from tests.formats.compare import heavy_tailed, random_imatrix


def test_row_length_not_a_multiple_of_the_block_size_is_refused():
    with pytest.raises(ValueError, match=r"Q4_0: row length 40 is not a multiple of the block size 32"):
        quantize(heavy_tailed(4, 40), "Q4_0")


def test_weights_must_be_two_dimensional():
    with pytest.raises(ValueError, match="expected 2-D weights"):
        quantize(np.zeros(64, dtype=np.float32), "Q8_0")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(bad: float):
    w = heavy_tailed(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match="1 non-finite values"):
        quantize(w, "Q8_0")


def test_imatrix_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="imatrix has 32 values but rows have 64 columns"):
        quantize(heavy_tailed(4, 64), "Q4_0", imatrix=random_imatrix(32))


def test_negative_imatrix_is_refused():
    imatrix = random_imatrix(64)
    imatrix[3] = -1.0
    with pytest.raises(ValueError, match="negative"):
        quantize(heavy_tailed(4, 64), "Q4_0", imatrix=imatrix)


def test_non_finite_imatrix_is_refused():
    imatrix = random_imatrix(64)
    imatrix[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        quantize(heavy_tailed(4, 64), "Q4_0", imatrix=imatrix)


def test_unknown_type_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown tensor type 'Q9_9'") as raised:
        quantize(heavy_tailed(4, 64), "Q9_9")
    for name in ("F16", "Q4_0", "Q8_0"):
        assert name in str(raised.value)
    with pytest.raises(ValueError, match="known types"):
        dequantize(np.zeros(18, dtype=np.uint8), "nope", (32,))


def test_type_names_are_case_insensitive():
    assert get_format("q4_0") is FORMATS["Q4_0"]


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0", "F16"])
def test_numpy_and_torch_inputs_give_the_same_bytes(type_name: str):
    w = heavy_tailed(16, 256)
    imatrix = random_imatrix(256)
    from_numpy = quantize(w, type_name, imatrix=imatrix)
    from_torch = quantize(torch.from_numpy(w), type_name, imatrix=torch.from_numpy(imatrix))
    assert isinstance(from_torch, np.ndarray) and from_torch.dtype == np.uint8
    assert np.array_equal(from_numpy, from_torch)
    assert np.array_equal(from_numpy, ggml_quantize(w, type_name, imatrix))


def test_other_float_dtypes_are_widened_first():
    w = torch.from_numpy(heavy_tailed(8, 64)).to(torch.bfloat16)
    assert np.array_equal(quantize(w, "Q8_0"), ggml_quantize(w.float().numpy(), "Q8_0"))


def test_chunking_does_not_change_the_bytes():
    # the imatrix path of Q4_0 uses a statistic of each row: chunks must hold whole rows
    w = heavy_tailed(37, 256)
    imatrix = random_imatrix(256)
    assert np.array_equal(quantize(w, "Q4_0", imatrix, chunk_rows=5), quantize(w, "Q4_0", imatrix))


def test_dequantize_returns_numpy_for_numpy():
    w = heavy_tailed(8, 64)
    back = dequantize(quantize(w, "Q8_0"), "Q8_0", w.shape)
    assert isinstance(back, np.ndarray) and back.dtype == np.float32 and back.shape == w.shape


def test_dequantize_returns_torch_on_the_same_device_for_torch():
    w = heavy_tailed(8, 64)
    data = quantize(w, "Q8_0")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        back = dequantize(torch.from_numpy(data).to(device), "Q8_0", w.shape)
        assert isinstance(back, torch.Tensor) and back.device.type == device
        assert back.dtype == torch.float32 and tuple(back.shape) == w.shape
        assert np.array_equal(back.cpu().numpy(), dequantize(data, "Q8_0", w.shape))


def test_dequantize_refuses_the_wrong_number_of_bytes():
    with pytest.raises(ValueError, match="do not hold"):
        dequantize(np.zeros(17, dtype=np.uint8), "Q4_0", (32,))
