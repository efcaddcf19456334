"""VTA (Versatile Tensor Accelerator) target: configuration presets, the instruction set, lowering of
integer conv2d/dense layers to instruction streams, a NumPy functional simulator, a cycle model, and the
compilation of a quantized model (see README, "VTA simulation").

Modules: ``config`` (presets, derived sizes), ``isa`` (encode/decode), ``program`` (builder, tokens),
``lower`` (conv/dense -> program), ``sim`` (functional simulator), ``cycles`` (cycle model), ``integer``
(integer-only ResNet bodies: power-of-two requantization, ReLU and residual adds on VTA, activations kept in
VTA's layout in DRAM; see docs/design/vta-integer.md), ``body`` (that body compiled: host graph, artifact,
``load_body``), ``compile`` (``compile_vta``, the entry; the per-layer partition's Relax graph and
artifact for models the integer body cannot take), ``quant`` and ``model`` (the per-layer partition: a
layer's VTA math and NumPy reference, planning, running), ``runtime`` (what both VTA artifacts share).
"""
