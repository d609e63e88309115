"""Registry: bytes at rest per safetensors byte (zstd with and without byte-plane shuffle); push / pull MB/s.

Adapter: Llama shapes (hidden 1024, intermediate 2816, 8 layers; 2 with --quick), r = 16 on all 7
linears, two value kinds stored as fp32 safetensors:
  bf16-valued  fp32 files holding bf16-representable values (what PEFT writes after bf16 training, §4.3)
  fp32 noise   true fp32 values (no structure beyond the float format)
Push / pull MB/s count safetensors bytes; medians over repeats, each push into a fresh store. The baseline
in the same run is writing the safetensors file itself (write + fsync). OCI loopback is measured when
Debian's docker-registry is installed.

    python -m bench.registry [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from adapterhub import Registry
from adapterhub.adapter import Adapter, RawTensor, random_adapter
from adapterhub.registry.blobs import encode
from adapterhub.registry.manifest import WIDTH
from bench.timing import median_seconds

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_shapes(layers: int, d: int = 1024, f: int = 2816) -> dict[str, tuple[int, int]]:
    per_layer = {"self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
                 "self_attn.o_proj": (d, d), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    return {f"model.layers.{i}.{name}": shape for i in range(layers) for name, shape in per_layer.items()}


def bf16_valued(adapter: Adapter) -> Adapter:
    """The same adapter with every fp32 value rounded to bf16 (still stored as F32)."""
    rounded = {k: RawTensor.from_array(RawTensor.from_array(t.to_float32(), "BF16").to_float32(), "F32")
               for k, t in adapter.tensors.items()}
    return Adapter(adapter.config, rounded)


def at_rest_ratio(adapter: Adapter, shuffle: bool) -> float:
    stored = sum(len(encode(t.data, WIDTH[t.dtype] if shuffle else 1)) for t in adapter.tensors.values())
    return stored / len(adapter.safetensors_bytes())



def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def local_speeds(adapter: Adapter, work: Path, repeats: int) -> dict[str, float]:
    mb = len(adapter.safetensors_bytes()) / 1e6
    src = adapter.save_peft_dir(work / "src")
    counter = iter(range(10 ** 6))

    def fresh_push():
        Registry(work / f"store{next(counter)}").push(src, "bench")

    registry = Registry(work / "pull-store")
    registry.push(src, "bench")

    def pull():
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        registry.pull("bench", out)

    data = adapter.safetensors_bytes()
    return {"baseline write+fsync": mb / median_seconds(lambda: write_file(work / "plain", data), repeats, warmup=False),
            "push (new blobs)": mb / median_seconds(fresh_push, repeats, warmup=False),
            "push (all deduped)": mb / median_seconds(lambda: registry.push(src, "bench"), repeats, warmup=False),
            "pull": mb / median_seconds(pull, repeats, warmup=False)}


def oci_speeds(adapter: Adapter, work: Path, repeats: int) -> dict[str, float] | None:
    binary = shutil.which("docker-registry")
    if binary is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (work / "oci.yml").write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: "
                                  f"{work / 'oci'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    server = subprocess.Popen([binary, "serve", str(work / "oci.yml")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        mb = len(adapter.safetensors_bytes()) / 1e6
        counter = iter(range(10 ** 6))
        url = f"oci://127.0.0.1:{port}/bench"
        push = median_seconds(lambda: Registry(url).push(adapter, f"t{next(counter)}"), repeats, warmup=False)
        again = median_seconds(lambda: Registry(url).push(adapter, "t0"), repeats, warmup=False)
        pull = median_seconds(lambda: Registry(url).load("t0"), repeats, warmup=False)
        return {"push (new blobs)": mb / push, "push (all deduped)": mb / again, "pull (verified load)": mb / pull}
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 3 repeats")
    args = parser.parse_args()
    layers, repeats = (2, 3) if args.quick else (8, 5)
    noise = random_adapter(llama_shapes(layers), r=16, lora_alpha=32, target_modules=TARGETS, seed=0)
    kinds = {"bf16-valued fp32": bf16_valued(noise), "fp32 noise": noise}
    print(f"adapter: {layers} layers x 7 linears, r=16, {len(noise.safetensors_bytes()) / 1e6:.1f} MB safetensors")
    print("\nbytes at rest / safetensors bytes (lower is better)")
    print(f"{'values':<18}{'zstd':>8}{'shuffle+zstd':>14}{'shuffle gain':>14}")
    for name, adapter in kinds.items():
        plain, shuffled = at_rest_ratio(adapter, False), at_rest_ratio(adapter, True)
        print(f"{name:<18}{plain:>8.3f}{shuffled:>14.3f}{plain / shuffled:>13.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("\nlocal store, MB/s of safetensors bytes (median), ratio vs baseline")
        for name, adapter in kinds.items():
            (work / name).mkdir()
            speeds = local_speeds(adapter, work / name, repeats)
            base = speeds["baseline write+fsync"]
            print(f"  {name}: " + ", ".join(f"{k} {v:.0f} MB/s ({v / base:.2f}x)" for k, v in speeds.items()))
        (work / "oci-run").mkdir()
        speeds = oci_speeds(noise, work / "oci-run", repeats)
        if speeds is None:
            print("\nOCI loopback: docker-registry not installed, skipped")
        else:
            print("\nOCI loopback (docker-registry on 127.0.0.1), fp32 noise: "
                  + ", ".join(f"{k} {v:.0f} MB/s" for k, v in speeds.items()))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
