"""How weights are rounded onto a format's grid beyond plain search: pure tensor functions over ``formats``."""

from llmquant.methods.gptq import GPTQResult, HessianAccumulator, gptq_quantize, hessian

__all__ = ["GPTQResult", "HessianAccumulator", "gptq_quantize", "hessian"]
