"""Adapters on the base: the batched per-row layer, the pool of slots, merging and combining.

- ``linear.py``     ``AdapterLinear``: a base weight plus per-rank stacks of adapters, one forward for all rows
- ``pool.py``       ``AdapterPool``: adapter names -> slots, LRU eviction, pinning of batches in flight
- ``merge.py``      fold one adapter into the base weights and back
- ``combine.py``    weighted combinations of adapters (PEFT's add_weighted_adapter)
- ``lora_math.py``  the LoRA / rsLoRA / DoRA formulas in torch (PEFT's numbers)
"""
