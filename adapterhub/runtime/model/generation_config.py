"""`SamplingDefaults`: the sampling values a checkpoint's `generation_config.json` sets, used by the server when a
request leaves them out (as vLLM does by default: its `--generation-config auto`).

Read: `temperature`, `top_p`, `top_k`, `repetition_penalty` and `max_new_tokens` (a request's default
`max_tokens`); like vLLM, `do_sample` is not read, so a file that sets a temperature samples. transformers
writes only the values that differ from its defaults, so what the file holds is what the model's author chose.
The end-of-sequence ids of the same file are read with the model config (`checkpoint.read_config`): every
kind of generation stops on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from adapterhub.errors import ModelLoadError

FILE = "generation_config.json"


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None

    @classmethod
    def from_json(cls, data: dict, origin: str = FILE) -> SamplingDefaults:
        values = {}
        for name, kind, is_valid in _FIELDS:
            value = data.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, kind) or not is_valid(value):
                raise ModelLoadError(f"{origin}: {name} = {value!r} is not a valid value; fix or remove it")
            values[name] = value
        return cls(**values)

    @classmethod
    def from_dir(cls, path: Path) -> SamplingDefaults:
        file = Path(path) / FILE
        return cls.from_json(json.loads(file.read_text()), str(file)) if file.is_file() else cls()


_FIELDS = (
    ("temperature", (int, float), lambda v: 0 <= v <= 2),
    ("top_p", (int, float), lambda v: 0 < v <= 1),
    ("top_k", int, lambda v: v >= 0),
    ("repetition_penalty", (int, float), lambda v: v > 0),
    ("max_new_tokens", int, lambda v: v >= 1),
)
