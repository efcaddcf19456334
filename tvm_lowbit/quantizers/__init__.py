"""Quantizers: one module per algorithm over the shared math in ``tvm_lowbit.qmath``; ``quantize``
dispatches on the config's type (``register_scheme``), configs are versioned (``config_from_dict``)."""

from tvm_lowbit.quantizers.api import quantize, register_scheme, registered_schemes, unregister_scheme
from tvm_lowbit.quantizers.auto import Auto
from tvm_lowbit.quantizers.config import SchemeConfig, config_from_dict, register_config, registered_configs
from tvm_lowbit.quantizers.fgq import FGQ
from tvm_lowbit.quantizers.inq import INQ, INQQuantizer

__all__ = ["quantize", "register_scheme", "registered_schemes", "unregister_scheme", "SchemeConfig", "config_from_dict",
           "register_config", "registered_configs", "Auto", "FGQ", "INQ", "INQQuantizer"]
