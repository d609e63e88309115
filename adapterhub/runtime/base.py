"""`Base`: what `load_base` returns; the one object users and the serving engine hold (docs/runtime.md).

It composes the model, its tokenizer and the adapter pool; the work happens in the modules it
delegates to (generate.py for the step API and generation, adapters/ for the pool and merging,
model/loader.py for files). It never opens a registry: a registry ref is resolved through the
`registry` the caller passes (any object with ``load(ref) -> Adapter``, e.g. ``adapterhub.Registry``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, Sequence

import torch

from adapterhub.adapter import Adapter, adapter_source
from adapterhub.base_identity import BaseIdentity
from adapterhub.errors import ConfigError, RequestError
from adapterhub.runtime import export as exporter
from adapterhub.runtime import generate as gen
from adapterhub.runtime.adapters import merge
from adapterhub.runtime.adapters.pool import AdapterPool
from adapterhub.runtime.model import loader
from adapterhub.runtime.model.config import ModelConfig
from adapterhub.runtime.model.generation_config import SamplingDefaults
from adapterhub.runtime.model.kv_cache import BLOCK_SIZE, KVCache, kv_bytes_per_token
from adapterhub.runtime.model.model import Transformer
from adapterhub.runtime.model.tokenizer import Tokenizer
from adapterhub.runtime.quant import formats


class AdapterStore(Protocol):
    """What the runtime needs of a registry: ``adapterhub.Registry`` is one."""

    def load(self, ref: str) -> Adapter: ...


def load_base(path_or_id: str | Path = "tiny", quantize: str | None = "nf4",
              compute_dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
              max_adapters: int = 16, adapter_dtype: str | torch.dtype = "auto") -> Base:
    """A base model with an adapter pool: "tiny" (embedded), a Hugging Face checkpoint dir, or a hub id
    found in the local HF cache. quantize names the format of the decoder linears (quant/formats.py:
    "nf4", ...; a bitsandbytes 4-bit checkpoint loads as saved whatever it says); None keeps them dense
    in `compute_dtype`. adapter_dtype: "auto" stores and runs adapters in `compute_dtype`; "float32" keeps
    them in fp32 inside a bf16 / fp16 base, as PEFT does (adapters/linear.py)."""
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise ConfigError(f"compute_dtype must be a floating torch dtype such as torch.bfloat16, got {compute_dtype!r}")
    formats.format_class(quantize)  # an unknown format fails before anything is read
    adapter_dtype = resolve_adapter_dtype(adapter_dtype, compute_dtype)
    config, tokenizer, model = loader.load_parts(path_or_id, quantize, compute_dtype, torch.device(device))
    return Base(config, tokenizer, model, max_adapters=max_adapters, name=str(path_or_id),
                identity=loader.load_identity(path_or_id), adapter_dtype=adapter_dtype,
                sampling_defaults=loader.load_sampling_defaults(path_or_id))


ADAPTER_DTYPES = {"float32": torch.float32, "fp32": torch.float32}  # besides "auto": the compute dtype


def resolve_adapter_dtype(adapter_dtype: str | torch.dtype | None, compute_dtype: torch.dtype) -> torch.dtype:
    """"auto" / None -> compute_dtype; "float32" (or torch.float32) -> float32; anything else is refused."""
    if adapter_dtype in (None, "auto"):
        return compute_dtype
    resolved = adapter_dtype if isinstance(adapter_dtype, torch.dtype) else ADAPTER_DTYPES.get(str(adapter_dtype))
    if resolved not in (torch.float32, compute_dtype):
        raise ConfigError(f"adapter dtype {adapter_dtype!r} is not 'auto' (the compute dtype, {compute_dtype}) "
                          "or 'float32'; pass one of those")
    return resolved


class Base:
    """identity: what the registry records of a base (base_identity.py), computed from the checkpoint by
    `load_base`; adapters recording another base are refused by `add_adapter` (None: nothing is checked).
    tokenizer: None for a checkpoint without tokenizer.json, which then takes token ids only.
    sampling_defaults: generation_config.json's sampling values, the server's defaults for a request."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None, model: Transformer, *,
                 max_adapters: int = 16, name: str = "base", identity: BaseIdentity | None = None,
                 adapter_dtype: torch.dtype | None = None, sampling_defaults: SamplingDefaults = SamplingDefaults()):
        self.config, self.tokenizer, self.model, self.name = config, tokenizer, model, name
        self.identity = identity
        self.sampling_defaults = sampling_defaults
        self.pool = AdapterPool(model.linears(), capacity=max_adapters, identity=identity, adapter_dtype=adapter_dtype)

    # --- adapters -------------------------------------------------------------------------------------

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(Dout, Din) of every decoder linear, keyed by HF module path."""
        return self.pool.module_shapes()

    def add_adapter(self, source: Adapter | str | os.PathLike, name: str | None = None,
                    registry: AdapterStore | None = None, *, allow_base_mismatch: bool = False) -> str:
        """Loads an `Adapter`, a PEFT dir (a `Path`, or a str that is clearly a path: "./x", "/x", "~/x") or a
        registry ref (any other str, read from `registry`); returns the name it is loaded under.

        An adapter recorded against another base (a differing architecture, config or weight digest) raises
        IncompatibleAdapterError naming both bases; `allow_base_mismatch=True` loads it with a warning."""
        kind = adapter_source(source)
        if isinstance(kind, Adapter):
            adapter, default_name = kind, "adapter"
        elif isinstance(kind, Path):
            adapter, default_name = Adapter.from_peft_dir(kind), kind.name
        elif registry is None:
            raise ConfigError(f"adapter {source!r} is a registry ref, and no registry was given: pass "
                              f"registry=adapterhub.Registry(...), or './{source}' for a directory")
        else:
            adapter, default_name = registry.load(kind), kind
        name = name or default_name
        self.pool.add(adapter, name, allow_base_mismatch)
        return name

    def remove_adapter(self, name: str) -> None:
        self.pool.remove(name)

    def merge(self, name: str):
        """Folds one adapter into the base weights (adapters/merge.py); returns its MergeReport."""
        return merge.merge_adapter(self.model.linears(), self.pool, name)

    def export(self, path: str | Path, *, dtype: str | torch.dtype = "bfloat16", quantize: str | None = None,
               shard_size: int | str = "5GB", progress: bool = False) -> exporter.ExportResult:
        """Writes this base, with the adapter merged into it if any, as a Hugging Face checkpoint that transformers
        (and with quantize="nf4" transformers + bitsandbytes) loads; the merge is redone in fp32 and rounded or
        quantized once (runtime/export.py)."""
        return exporter.export_checkpoint(self, path, dtype=dtype, quantize=quantize, shard_size=shard_size,
                                          progress=progress)

    def unmerge(self) -> str:
        """Restores the base weights; returns the name of the adapter that was merged."""
        return merge.unmerge(self.model.linears(), self.pool)

    # --- forward and generation -----------------------------------------------------------------------

    def __call__(self, input_ids, adapters: Sequence[str | None] | None = None, attention_mask=None) -> torch.Tensor:
        """Logits (B, T, V) for input_ids (B, T); adapters: one name or None per row."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.model.device)
        if input_ids.dim() != 2:
            raise RequestError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        with torch.inference_mode(), self._pinned(adapters, input_ids.shape[0]) as ids:
            return self.model(input_ids, ids, attention_mask=attention_mask)

    def generate(self, prompts, adapters: Sequence[str | None] | None = None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | str | None = None) -> list[gen.Completion]:
        """Completes texts or token-id lists (or one text / one id list), each row with its adapter, in one batch."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()  # (B, T) token ids
        is_single = isinstance(prompts, str) or (prompts and all(isinstance(t, int) for t in prompts))
        prompts = [prompts] if is_single else list(prompts)
        if not prompts:
            raise RequestError("generate needs at least one prompt")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if self.tokenizer is None and (stop or any(isinstance(p, str) for p in prompts)):
            raise ConfigError(f"base {self.name!r} has no tokenizer (its directory has no tokenizer.json), so it "
                              "takes token ids, not text or stop strings; pass lists of token ids, or add a "
                              "tokenizer.json (transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir))")
        token_prompts = [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        B = len(token_prompts)
        seeds = None if seed is None else [seed] * B
        sampling = gen.SamplingBatch.from_params([temperature] * B, [top_k] * B, [top_p] * B, seeds,
                                                 device=self.model.device)
        stop_ids = self.stop_token_ids()
        with torch.inference_mode(), self._pinned(adapters, B) as ids:
            return gen.generate(self.model, self.tokenizer, token_prompts, ids, max_new_tokens=max_new_tokens,
                                sampling=sampling, stop_ids=stop_ids, stop=stop)

    def stop_token_ids(self) -> list[int]:
        """Tokens that end a completion: config.json / generation_config.json eos ids and the tokenizer's eos."""
        ids = [*self.config.eos_token_id, self.tokenizer.eos_token_id if self.tokenizer is not None else None]
        return [t for t in dict.fromkeys(ids) if t is not None]

    # --- step API (serving engine) --------------------------------------------------------------------

    def new_cache(self, max_batch: int, max_seq: int, memory: int | None = None,
                  block_size: int = BLOCK_SIZE) -> KVCache:
        """A paged KVCache: `memory` bytes of blocks (None: enough for every row at max_seq). A budget
        that cannot hold one row of max_seq tokens is refused (such a request could never run)."""
        c = self.config
        num_blocks = None
        if memory is not None:
            num_blocks = int(memory) // (block_size * self.kv_bytes_per_token())
            if num_blocks < -(-max_seq // block_size):
                raise ConfigError(f"a KV cache of {int(memory)} bytes holds {num_blocks * block_size} tokens of this "
                                  f"base ({self.kv_bytes_per_token()} bytes each), less than one request of max_seq="
                                  f"{max_seq}; give it more memory or lower max_seq")
        return KVCache(c.num_hidden_layers, max_batch, c.num_key_value_heads, max_seq, c.head_dim,
                       dtype=self.model.dtype, device=self.model.device, num_blocks=num_blocks, block_size=block_size)

    def kv_bytes_per_token(self) -> int:
        """Bytes of keys + values one token takes in the KV cache (every layer)."""
        c = self.config
        return kv_bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.model.dtype)

    def weight_bytes(self) -> int:
        """Bytes of the base's weights as held (4-bit linears packed, tied embeddings once)."""
        tensors = {t.data_ptr(): t.nbytes for t in [*self.model.parameters(), *self.model.buffers()] if t is not None}
        return sum(tensors.values()) + sum(m.weight.nbytes for m in self.model.linears().values())

    def prefill(self, cache: KVCache, rows: Sequence[int], prompts: Sequence[Sequence[int]], ids,
                prefix_adapters: Sequence[str] | None = None) -> torch.Tensor:
        """generate.prefill; `prefix_adapters` (each row's adapter digest, "" for the base) turns prefix caching on."""
        with torch.inference_mode():
            return gen.prefill(self.model, cache, rows, prompts, self._ids(ids), prefix_adapters)

    def decode(self, cache: KVCache, rows: torch.Tensor, tokens: torch.Tensor, ids) -> torch.Tensor:
        with torch.inference_mode():
            return gen.decode(self.model, cache, rows, tokens, self._ids(ids))

    def save_quantized(self, path: str | Path) -> Path:
        """Writes a 4-bit base as transformers + bitsandbytes save it; load_base(path) then skips quantizing."""
        return loader.save_quantized(path, self.config, self.model, self.tokenizer)

    # --- internals ------------------------------------------------------------------------------------

    def _ids(self, ids):
        return None if ids is None else torch.as_tensor(ids, dtype=torch.long, device=self.model.device)

    @contextmanager
    def _pinned(self, adapters, B: int):
        """Pins the adapters of one batch for its duration; yields ids (B,), or None when every row is the base."""
        if adapters is not None and len(adapters) != B:
            raise RequestError(f"adapters has {len(adapters)} entries for a batch of {B} rows; "
                               "give one name or None per row")
        is_base_only = adapters is None or all(a is None for a in adapters)
        ids = None if is_base_only else self.pool.acquire(list(adapters))
        try:
            yield ids
        finally:
            if ids is not None:
                self.pool.release(ids)
