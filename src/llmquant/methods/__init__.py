"""How weights are rounded onto a format's grid beyond plain search: pure tensor functions over ``formats``."""

from llmquant.methods.awq import AWQResult, awq_search_scales
from llmquant.methods.error import output_error
from llmquant.methods.gptq import GPTQResult, gptq_quantize, hessian

__all__ = ["AWQResult", "GPTQResult", "awq_search_scales", "gptq_quantize", "hessian", "output_error"]
