"""LoRA / rsLoRA / DoRA as PEFT 0.21.2 computes them, in NumPy (docs/semantics.md §4, §5, §6.4).

Weights are float32 arrays; a weight stored in bf16/fp16 is passed as its exact float32 values and
named by `dtype` ("float32" | "bfloat16" | "float16"), and every rounding to that dtype is explicit.
Forwards compute in float64 (the spec, not an emulation); merges compute in float32 like PEFT on CPU.
Shapes: A (R, Din) = lora_A, B (Dout, R) = lora_B, W (Dout, Din), m (Dout,) = lora_magnitude_vector.
"""

import math
import re

import numpy as np

from reference import bf16

# Rounding of a float32 array to the weight's storage dtype (round to nearest even, as torch casts).
ROUND = {
    "float32": lambda x: np.asarray(x, dtype=np.float32),
    "bfloat16": bf16.round_to_bf16,
    "float16": lambda x: np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32),
}

# PEFT's built-in default when target_modules is None, per HF model_type (§6.4).
DEFAULT_TARGETS = {"llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj")}


# --- configuration: scaling, patterns, targets --------------------------------------------------


def scaling(lora_alpha, r, use_rslora=False):
    """§4.2: alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023, Sec. 3)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def pattern_value(pattern, name, default):
    """§4.2: the first key K (dict order) with `(.*\\.)?(K)$` fully matching `name` wins, else default."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?({key})", name):
            return value
    return default


def module_scaling(name, r, lora_alpha, rank_pattern=None, alpha_pattern=None, use_rslora=False):
    """(rank, alpha, scaling) of one module, with rank_pattern / alpha_pattern overrides applied."""
    rank = pattern_value(rank_pattern or {}, name, r)
    alpha = pattern_value(alpha_pattern or {}, name, lora_alpha)
    return rank, alpha, scaling(alpha, rank, use_rslora)


def _layer_index(name, layers_pattern):
    """The first numbered segment after a layers container (`model.layers.3.mlp` -> 3), or None."""
    if not layers_pattern:  # any container: the first "<name>.<digits>." segment (lazy, as PEFT)
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(match[1]) if match else None
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if match:
            return int(match[1])
    return None


def _in_list(name, names):
    return any(name == k or name.endswith("." + k) for k in names)


def matches(name, target_modules, layers_to_transform=None, layers_pattern=None, exclude_modules=None):
    """§6.4: is module `name` (full dotted path) targeted?  target_modules is resolved (not None/all-linear).

    A string is a full-match regex; a list matches equal names or "." + entry suffixes and is then
    restricted by layers_to_transform (+ layers_pattern); exclude_modules wins over everything.
    """
    if isinstance(exclude_modules, str) and re.fullmatch(exclude_modules, name):
        return False
    if exclude_modules and not isinstance(exclude_modules, str) and _in_list(name, exclude_modules):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if not _in_list(name, target_modules):
        return False
    # An entry equal to the whole name matches before the layer filter is consulted (peft 0.21.2,
    # tuners_utils.check_target_module_exists: the `key in target_modules` branch).
    if name in target_modules or layers_to_transform is None or layers_to_transform == []:
        return True
    index = _layer_index(name, layers_pattern)
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    return index is not None and index in wanted


def resolve_targets(linear_names, target_modules, model_type="llama", output_embedding="lm_head", **match_kwargs):
    """Targeted module names among `linear_names` (every nn.Linear of the model, full dotted paths).

    None -> the model type's default; "all-linear" -> every linear except the output embedding
    (PEFT stores this as the set of full dotted names, §6.4).
    """
    if target_modules is None:
        target_modules = DEFAULT_TARGETS[model_type]
    elif isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        target_modules = [n for n in linear_names if n != output_embedding]
    return [n for n in linear_names if matches(n, target_modules, **match_kwargs)]


# --- LoRA ---------------------------------------------------------------------------------------


def delta_weight(A, B, s, fan_in_fan_out=False):
    """§4.4: s * B @ A in float32.  # (R, Din), (Dout, R) -> (Dout, Din), or (Din, Dout) if fan_in_fan_out"""
    delta = (np.asarray(B, np.float32) @ np.asarray(A, np.float32)) * np.float32(s)
    return delta.T if fan_in_fan_out else delta


def lora_forward(x, W, bias, A, B, s):
    """§4.1 at inference: W x + b + s * B A x, float64.  # (..., Din) -> (..., Dout)"""
    x = np.asarray(x, np.float64)
    y = x @ np.asarray(W, np.float64).T + s * ((x @ np.asarray(A, np.float64).T) @ np.asarray(B, np.float64).T)
    return y if bias is None else y + bias


# --- DoRA (Liu et al. 2024, "DoRA", Sec. 4) -------------------------------------------------------


def dora_weight_norm(W, A, B, s):
    """§5.2: ||W + s B A|| per output row, no epsilon, float64.  # (Dout, Din) -> (Dout,)"""
    V = np.asarray(W, np.float64) + s * (np.asarray(B, np.float64) @ np.asarray(A, np.float64))
    return np.sqrt((V * V).sum(axis=1))


def dora_forward(x, W, bias, A, B, s, m):
    """§5.3 at inference: b + (m / ||W + s B A||_row) * (W x + s B A x), float64.  # (..., Din) -> (..., Dout)"""
    g = np.asarray(m, np.float64) / dora_weight_norm(W, A, B, s)  # (Dout,)
    y = g * lora_forward(x, W, None, A, B, s)
    return y if bias is None else y + bias


# --- merge / unmerge (§4.4, §5.4) ---------------------------------------------------------------


def merge_lora(W, A, B, s, dtype="float32", safe=False):
    """§4.4: unsafe = round(W + dW) (one rounding); safe = round(W + round(dW)) (two).  # -> (Dout, Din)

    The two differ in bf16/fp16 for a large share of elements (§4.4, §9.5).
    """
    delta = delta_weight(A, B, s)
    if safe:
        delta = ROUND[dtype](delta)
    return ROUND[dtype](np.asarray(W, np.float32) + delta)


def unmerge_lora(W_merged, A, B, s, dtype="float32"):
    """§4.4: W' - round(dW) in W's dtype (PEFT casts dW to W's dtype first).  # -> (Dout, Din)"""
    return ROUND[dtype](np.asarray(W_merged, np.float32) - ROUND[dtype](delta_weight(A, B, s)))


def merge_dora(W, A, B, s, m, dtype="float32"):
    """§5.4: W' = round((m / n) * (W + dW)) with n = ||W + dW||_row on the unmerged W, float32.

    Returns (W' (Dout, Din), n (Dout,)); n is needed to unmerge.
    """
    V = np.asarray(W, np.float32) + delta_weight(A, B, s)  # (Dout, Din)
    n = np.sqrt((V * V).sum(axis=1, dtype=np.float32))
    factor = np.asarray(m, np.float32) / n  # (Dout,)
    return ROUND[dtype](factor[:, None] * V), n


def unmerge_dora(W_merged, A, B, s, m, n, dtype="float32"):
    """§5.4: W = round(W' / (m / n) - dW), with the norm n cached at merge time.  # -> (Dout, Din)"""
    factor = np.asarray(m, np.float32) / np.asarray(n, np.float32)
    return ROUND[dtype](np.asarray(W_merged, np.float32) / factor[:, None] - delta_weight(A, B, s))
