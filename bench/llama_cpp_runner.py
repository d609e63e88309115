"""llama.cpp through llama-cpp-python's low-level API (the C functions): several sequences in one
`llama_batch`, greedy on the host from the logits, so one step of S streams is one `llama_decode`.

The high-level `llama_cpp.Llama` runs one sequence and copies the logits into Python-side arrays every
token; the bench measures llama.cpp itself, so it drives the C API as llama.cpp's own batched example does.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Sequence

import numpy as np

import llama_cpp

GGML_LOG_LEVEL_ERROR = 4  # ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation


@llama_cpp.llama_log_callback
def _errors_only(level: int, text: bytes, user_data) -> None:
    """llama.cpp logs every tensor and graph input at load; only its errors reach stderr here.
    A module-level object: ctypes must keep the callback alive as long as llama.cpp may call it."""
    if level == GGML_LOG_LEVEL_ERROR:
        print(text.decode(errors="replace"), end="", file=sys.stderr)


class LlamaCpp:
    """One model and one context holding up to `n_seq` sequences of `n_ctx_seq` tokens each."""

    def __init__(self, path: str, n_threads: int = 2, n_seq: int = 8, n_ctx_seq: int = 1024, n_batch: int = 512):
        llama_cpp.llama_log_set(_errors_only, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_seq * n_ctx_seq
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = n_threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, n_seq)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def reset(self) -> None:
        """Forgets every sequence (the KV cache is emptied)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def forward(self, entries: Sequence[tuple[int, int, int]], outputs: Sequence[bool]) -> np.ndarray:
        """Runs (token, position, sequence) entries in one llama_decode; logits (n_outputs, V) of the
        entries whose `outputs` flag is set, in order."""
        if len(entries) > self.n_batch:
            raise ValueError(f"{len(entries)} tokens exceed the batch of {self.n_batch}")
        b = self.batch
        for i, ((token, position, seq), is_output) in enumerate(zip(entries, outputs)):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, position, 1, int(is_output)
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        status = llama_cpp.llama_decode(self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        n_out = sum(map(bool, outputs))
        pointer = llama_cpp.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(n_out, self.n_vocab))

    def prefill(self, prompts: Sequence[Sequence[int]], all_logits: bool = False) -> np.ndarray:
        """Writes prompt s as sequence s (in chunks of n_batch); logits at each last token (S, V), or at
        every token of a single prompt when `all_logits`."""
        last = []
        for seq, prompt in enumerate(prompts):
            for start in range(0, len(prompt), self.n_batch):
                chunk = prompt[start:start + self.n_batch]
                entries = [(t, start + i, seq) for i, t in enumerate(chunk)]
                is_last = start + len(chunk) == len(prompt)
                outputs = [all_logits or (is_last and i == len(chunk) - 1) for i in range(len(chunk))]
                logits = self.forward(entries, outputs)
            last.append(logits.copy())
        return last[0] if all_logits else np.concatenate(last)

    def greedy(self, prompts: Sequence[Sequence[int]], steps: int, first: np.ndarray | None = None) -> np.ndarray:
        """Greedy tokens (S, steps + 1): the prompts' next tokens, then `steps` decode steps with all streams
        in one batch each; `first`: the prompts' last logits when prefill already ran."""
        logits = self.prefill(prompts) if first is None else first
        positions = [len(p) for p in prompts]
        out = np.empty((len(prompts), steps + 1), dtype=np.int64)
        for n in range(steps):
            out[:, n] = logits.argmax(-1)
            entries = [(int(t), positions[s] + n, s) for s, t in enumerate(out[:, n])]
            logits = self.forward(entries, [True] * len(entries))
        out[:, steps] = logits.argmax(-1)
        return out
