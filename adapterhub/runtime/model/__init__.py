"""The Llama-family model and its files: config, the decoder, the KV cache, the tokenizer, checkpoints.

- ``config.py``      ``ModelConfig`` from ``config.json`` (the architectures this runtime implements)
- ``model.py``       the decoder with Hugging Face module names; projections are ``AdapterLinear``
- ``kv_cache.py``    preallocated keys / values with a length per cache row
- ``tokenizer.py``   ``tokenizers`` + ``tokenizer_config.json`` (bos / eos, chat template)
- ``checkpoint.py``  finding, reading and writing a Hugging Face checkpoint directory
- ``loader.py``      building a model from a checkpoint (weights in a ``quant/`` format)
- ``tiny.py``        the embedded default model, and random checkpoints for tests
"""
