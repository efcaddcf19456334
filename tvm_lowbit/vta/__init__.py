"""VTA (Versatile Tensor Accelerator) target: configuration presets, the instruction set, lowering of
integer conv2d/dense layers to instruction streams, a NumPy functional simulator, a cycle model, and the
VTA/host partition of a quantized model (see README, "VTA (FPGA accelerator) target").

Modules: ``config`` (presets, derived sizes), ``isa`` (encode/decode), ``program`` (builder, tokens),
``lower`` (conv/dense -> program), ``sim`` (functional simulator), ``cycles`` (cycle model), ``quant``
(the VTA math of a layer and its NumPy reference), ``model`` (partition, running), ``compile``
(Relax graph with VTA calls, host build, artifact), ``integer`` (integer-only ResNet bodies: power-of-two
requantization, ReLU and residual adds on VTA, activations kept in VTA's layout in DRAM; see
docs/design/vta-integer.md).
"""
