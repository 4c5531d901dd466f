"""m2cache.formats: the vocabulary the store and the network share, importing neither.

``config`` (``ModelConfig``) and ``families`` (what each family's ``config.json`` means, its tensors'
names), ``quant`` (the neuron bundle encodings: FP16, INT8, INT4 in groups), ``int8`` (resident
weights in INT8), ``shares`` (fractions of neurons per precision, the gate policies every store
offers). ``m2cache.storage`` writes and reads them, ``m2cache.model`` computes with them.
"""
