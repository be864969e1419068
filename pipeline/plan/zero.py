"""The ZeRO-3 settings that decide per-GPU memory, read from a DeepSpeed config (defaults = DeepSpeed 0.19's).

HF-style `"auto"` values resolve the way transformers' DeepSpeed integration does: reduce bucket h^2, prefetch
bucket 0.9 h^2, persistence threshold 10 h.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ZeroSettings:
    reduce_bucket_size: int = int(5e8)  # elements; a buffer this large is allocated when contiguous_gradients
    prefetch_bucket_size: int = int(5e7)
    param_persistence_threshold: int = int(1e5)  # tensors smaller than this stay whole on every GPU
    max_live_parameters: int = int(1e9)
    max_reuse_distance: int = int(1e9)  # gathered params reused within this many elements stay gathered
    contiguous_gradients: bool = True
    offload_optimizer: bool = False
    offload_param: bool = False

    @classmethod
    def from_ds_config(cls, ds_config: dict | str | Path | None, hidden: int, offload: bool | None = None) -> "ZeroSettings":
        """Read the `zero_optimization` section; `offload` (if given) overrides both offload settings."""
        if isinstance(ds_config, (str, Path)):
            ds_config = json.loads(Path(ds_config).read_text())
        z = dict((ds_config or {}).get("zero_optimization", {}))
        auto = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                "stage3_param_persistence_threshold": 10 * hidden}
        d = cls()

        def get(key, default):
            v = z.get(key, default)
            return auto.get(key, default) if v == "auto" else int(float(v))

        def device(key):
            return str((z.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")

        return cls(
            reduce_bucket_size=get("reduce_bucket_size", d.reduce_bucket_size),
            prefetch_bucket_size=get("stage3_prefetch_bucket_size", d.prefetch_bucket_size),
            param_persistence_threshold=get("stage3_param_persistence_threshold", d.param_persistence_threshold),
            max_live_parameters=get("stage3_max_live_parameters", d.max_live_parameters),
            max_reuse_distance=get("stage3_max_reuse_distance", d.max_reuse_distance),
            contiguous_gradients=bool(z.get("contiguous_gradients", True)),
            offload_optimizer=device("offload_optimizer") if offload is None else offload,
            offload_param=device("offload_param") if offload is None else offload,
        )
