"""RMSNorm through torch.compile: one fused loop instead of ~10 eager passes over the activations.

Eager RMSNorm (fp32 cast, pow, mean, rsqrt, two muls, the cast back, and autograd's mirror of each) is memory-bound:
on the AMX Xeon, bf16, 1 thread, fwd+bwd of (2, 512, 576) took 4.9 ms eager and 1.1 ms compiled, (2, 512, 2048)
21.8 vs 3.8 ms. The compiled kernel rounds once where eager rounds twice: outputs differ by at most one bf16 ulp.
Only the norm is compiled (not the decoder layer): its code has no graph breaks, no ZeRO-3 hook and no per-batch
Python (packed attention loops over each row's samples).
"""
from __future__ import annotations

import types
import warnings

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's function: normalise in fp32, cast back, scale."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


_compiled = torch.compile(rms_norm)


def _compiled_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _compiled(hidden_states, self.weight, self.variance_epsilon)


def is_llama_rms_norm(module: nn.Module) -> bool:
    """Llama-family RMSNorms (Llama, Mistral, Qwen2, ...): `weight` and `variance_epsilon`, y = w * norm(x)."""
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def compile_failure(fn, *example: torch.Tensor) -> str:
    """'' when compiled `fn` runs forward and backward on `example` here, else why not (e.g. no C++ compiler on a
    CPU host)."""
    try:
        with torch.enable_grad():
            out = fn(*example)
            sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    except Exception as e:  # torch.compile raises many types; any of them means: stay eager
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ""


def route_if_compiled(modules: list[nn.Module], forward, compiled, example: list[torch.Tensor], what: str,
                      knob: str) -> int:
    """Give each of `modules` `forward` (its own kept as `_eager_forward`) if `compiled` runs forward and backward on
    `example` here; returns how many (0, with a warning that `what` stays eager, where it does not)."""
    why = compile_failure(compiled, *example)
    if why:
        warnings.warn(f"{what} stays eager: torch.compile failed here ({why}); set model.{knob}: false to skip the "
                      "attempt")
        return 0
    for m in modules:
        m._eager_forward = m.forward
        m.forward = types.MethodType(forward, m)
    return len(modules)


def compile_rms_norms(model: nn.Module) -> int:
    """Route every Llama-family RMSNorm of `model` through the compiled function; returns how many (0, with a
    warning, where torch.compile does not work on this machine: the norms stay eager)."""
    norms = [m for m in model.modules() if is_llama_rms_norm(m)]
    if not norms:
        return 0
    w = norms[0].weight.detach()
    x = torch.randn(1, 8, w.shape[-1], dtype=w.dtype, device=w.device, requires_grad=True)
    return route_if_compiled(norms, _compiled_forward, _compiled, [x, w, norms[0].variance_epsilon], "RMSNorm",
                             "compile_norms")
