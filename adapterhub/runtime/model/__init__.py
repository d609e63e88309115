"""The decoder and its files: the architectures, config, layers, the KV cache, the tokenizer, checkpoints.

- ``families.py``    one row of traits per supported ``model_type`` (Llama, Mistral, Qwen2, Qwen3, Gemma 2,
                     Gemma 3 text, Phi-3)
- ``config.py``      ``ModelConfig`` from ``config.json`` (the family's defaults filled in, the rest refused)
- ``rope.py``        rotary embeddings (default, llama3 and linear scaling)
- ``layers.py``      norms, attention, MLP, decoder layer; each variant picked from the family's traits
- ``model.py``       the decoder with Hugging Face module names; projections are ``AdapterLinear``
- ``kv_cache.py``    paged keys / values (blocks under a budget, a block table and length per cache row)
- ``tokenizer.py``   ``tokenizers`` + ``tokenizer_config.json`` (special tokens); ``chat_template.py`` reading
                     and rendering Jinja chat templates as transformers does
- ``generation_config.py``  ``SamplingDefaults`` from ``generation_config.json`` (the server's defaults)
- ``checkpoint.py``  finding, reading and writing a Hugging Face checkpoint directory
- ``loader.py``      building a model from a checkpoint (weights in a ``quant/`` format)
- ``tiny.py``        the embedded default model, and random checkpoints for tests
"""
