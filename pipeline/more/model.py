"""`MoreCausalLM`: an HF causal LM with MoRE layers, per-token task ids, contrastive loss and a frozen-able selection.

The contrastive representation is read from the model's `hidden_states` (decoder-layer OUTPUTS, which carry
gradient even under reentrant gradient checkpointing, whose first forward runs each layer under no_grad). Nothing is
captured from inside a layer as a side channel.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from pipeline.config.more import MoreConfig
from pipeline.data.mask import LOSS_CHUNK, supervised_positions
from pipeline.models.packed_attention import NAME as PACKED_ATTENTION, packed_segments
from pipeline.more.inject import _register_external, inject_layers, parameter_report
from pipeline.more.layer import MoreContext, MoreLinear, is_linear4bit
from pipeline.more.selector import MoreSelector


@dataclass
class MoreOutput(ModelOutput):
    """A dict-like ModelOutput so DeepSpeed ZeRO-3 sees the tensors inside (its hooks walk dicts/tuples)."""

    logits: Optional[torch.Tensor] = None
    contrastive_loss: Optional[torch.Tensor] = None  # unweighted InfoNCE (None when not computed)
    aux_loss: Optional[torch.Tensor] = None  # contrastive.weight * contrastive_loss: add it to the LM loss
    hidden_states: Optional[tuple] = None
    # supervised_loss=True: CE at the positions that predict a supervised token, instead of logits
    token_loss: Optional[torch.Tensor] = None  # (N,) fp32
    token_index: Optional[torch.Tensor] = None  # (N,) flat indices into (B, L) of the predicting positions


def gathered(params: Sequence[nn.Parameter], modifier_rank=None):
    """Context in which ZeRO-3 partitioned `params` hold their full data (no-op without ZeRO-3)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def pool_samples(hidden: torch.Tensor, segment_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 task_ids: Optional[torch.Tensor], mode: str = "prompt_mean"):
    """Per-sample representation from (B, L, d) hidden states of packed rows.

    Returns (reps (S, d), sample_task (S,) or None, keep (S,) bool): samples are the distinct segment ids;
    `prompt_mean` averages the sample's prompt tokens, `last_prompt` takes its last prompt token.
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    seg = segment_ids.reshape(-1).to(h.device).long()
    pm = prompt_mask.reshape(-1).to(h.device).bool() & (seg >= 0)
    S = int(seg.max().item()) + 1 if seg.numel() and seg.max() >= 0 else 0
    if S == 0:
        return h.new_zeros(0, d), None, torch.zeros(0, dtype=torch.bool)
    sel = pm.nonzero().squeeze(1)
    sseg = seg[sel]
    counts = torch.bincount(sseg, minlength=S)
    if mode == "prompt_mean":
        reps = h.new_zeros(S, d, dtype=torch.float32).index_add_(0, sseg, h.index_select(0, sel).float())
        reps = reps / counts.clamp(min=1).unsqueeze(1)
    elif mode == "last_prompt":
        last = torch.full((S,), -1, dtype=torch.long, device=h.device).scatter_reduce(0, sseg, sel, "amax")
        reps = h.index_select(0, last.clamp(min=0)).float()
    else:
        raise ValueError(f"unknown representation {mode!r}")
    keep = counts > 0
    sample_task = None
    if task_ids is not None:
        t = task_ids.reshape(-1).to(h.device).long()
        sample_task = torch.full((S,), -1, dtype=torch.long, device=h.device).scatter_(0, sseg, t[sel])
        keep = keep & (sample_task >= 0)
    return reps, sample_task, keep


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_FORWARD_ARGS = ("input_ids", "attention_mask", "position_ids", "task_ids", "segment_ids", "prompt_mask",
                 "output_hidden_states", "inputs_embeds", "labels", "supervised_loss", "use_cache", "return_dict")


def _head_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def supervised_ce(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) CE of the LM head at N selected positions, LOSS_CHUNK positions at a time. With more than one chunk
    each is recomputed in backward (checkpointed), so no (N x vocab) logits are kept."""
    chunk = LOSS_CHUNK
    if hidden.shape[0] <= chunk:
        return _head_ce(head, hidden, targets)
    from torch.utils.checkpoint import checkpoint

    return torch.cat([checkpoint(_head_ce, head, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                      for i in range(0, hidden.shape[0], chunk)])


# Causal LMs whose logits are lm_head(decoder output) with nothing before or after (transformers 5 modeling code).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "ministral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                                    "phi", "phi3", "gemma", "olmo2", "smollm3", "stablelm", "starcoder2", "deepseek_v3",
                                    "glm4"})


class MoreCausalLM(nn.Module):
    def __init__(self, base_model: nn.Module, config: MoreConfig, task_names: List[str],
                 base_model_id: Optional[str] = None):
        super().__init__()
        if len(set(task_names)) != len(task_names) or not task_names:
            raise ValueError(f"task_names must be distinct and non-empty, got {task_names}")
        self.config = config
        self.task_names = list(task_names)
        hf_cfg = getattr(base_model, "config", None)
        hidden = getattr(hf_cfg, "hidden_size", None)
        self.quantized_base = any(is_linear4bit(m) for m in base_model.modules())
        self.base_model_id = base_model_id or getattr(hf_cfg, "_name_or_path", None) or None
        self._ctx = MoreContext(len(task_names))
        g = torch.Generator().manual_seed(config.init_seed)
        shared = config.task_embedding == "shared"
        if shared and hidden is None:
            raise ValueError("shared task embeddings need base_model.config.hidden_size")
        self.base_model = base_model
        self.selector = MoreSelector(len(task_names), config.task_embedding_dim, hidden or 1, shared, generator=g)
        dev = next(base_model.parameters()).device
        self.selector.to(dev)
        self._ctx.selector = self.selector
        layers = inject_layers(base_model, config, len(task_names), self._ctx)
        object.__setattr__(self, "layers", layers)  # {name in base_model: MoreLinear}, not re-registered
        if shared:
            for layer in layers.values():
                _register_external(layer, self.selector.task_embedding)
        self.report = parameter_report(self)
        self._training_step: Optional[int] = None
        self._train_forwards = 0
        if config.selector_frozen:  # ablation: the reference's behaviour, ranks fixed at the initial choice
            self.freeze_selection()

    # ------------------------------------------------------------------ parameters
    def adapter_parameters(self) -> List[nn.Parameter]:
        """LoRA pairs A, B of every layer."""
        return [p for l in self.layers.values() for p in (l.lora_A, l.lora_B)]

    def selector_parameters(self) -> List[nn.Parameter]:
        """Task embeddings, gates and the contrastive head: put them in their own group (lr x multiplier)."""
        ps = [p for l in self.layers.values() for p in l.gate.parameters()]
        ps += [l.task_embedding for l in self.layers.values() if l.task_embedding is not None]
        ps += list(self.selector.parameters())
        return ps

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> List[dict]:
        """Optimizer groups: adapters at lr, selector at lr * selector_lr_multiplier (no weight decay)."""
        return [dict(params=self.adapter_parameters(), lr=lr, weight_decay=weight_decay, name="more_adapter"),
                dict(params=self.selector_parameters(), lr=lr * self.config.selector_lr_multiplier,
                     weight_decay=0.0, name="more_selector")]

    def trainable_named_parameters(self) -> Iterator[tuple]:
        ids = {id(p) for p in self.adapter_parameters() + self.selector_parameters()}
        for n, p in self.named_parameters():
            if id(p) in ids:
                yield n, p

    # ------------------------------------------------------------------ HF pass-throughs
    @property
    def hf_config(self):
        return self.base_model.config

    def gradient_checkpointing_enable(self, use_reentrant: bool = True):
        """Inputs must require grad so checkpointed layers' outputs do.

        Under ZeRO-3 use `use_reentrant=False`: with reentrant checkpointing each recomputed layer runs its own
        backward, so a parameter read in two places (the shared task table, an embedding also used by the
        contrastive loss) fires ZeRO-3's reduce hook twice and DeepSpeed asserts.
        """
        kwargs = {"use_reentrant": use_reentrant}
        if hasattr(self.base_model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.base_model.enable_input_require_grads()

    # ------------------------------------------------------------------ task context
    def _set_tokens(self, task_ids):
        ctx = self._ctx
        ctx.fixed_task = None
        ctx.token_index = None
        if task_ids is None:
            return
        if isinstance(task_ids, int) or (torch.is_tensor(task_ids) and task_ids.dim() == 0):
            t = int(task_ids)
            if not 0 <= t < len(self.task_names):
                raise ValueError(f"task id {t} out of range 0..{len(self.task_names) - 1}")
            ctx.fixed_task = t
            return
        t = task_ids.reshape(-1).long()
        if t.numel() and int(t.max()) >= len(self.task_names):
            raise ValueError(f"task id {int(t.max())} out of range 0..{len(self.task_names) - 1}")
        ctx.token_index = torch.where(t < 0, torch.full_like(t, len(self.task_names)), t)

    @contextlib.contextmanager
    def task_context(self, task: int):
        """Every token uses task `task` (e.g. around `self.base_model.generate(...)`)."""
        old = (self._ctx.fixed_task, self._ctx.token_index)
        self._set_tokens(int(task))
        try:
            yield self
        finally:
            self._ctx.fixed_task, self._ctx.token_index = old

    @contextlib.contextmanager
    def disable_adapters(self):
        old = self._ctx.disabled
        self._ctx.disabled = True
        try:
            yield self
        finally:
            self._ctx.disabled = old

    @contextlib.contextmanager
    def forced_rank(self, rank: Optional[int]):
        """Every task uses the rank-`rank` prefix in every layer (no selector)."""
        old = self._ctx.forced_rank
        self._ctx.forced_rank = rank
        try:
            yield self
        finally:
            self._ctx.forced_rank = old

    def freeze_selection(self, ranks: Optional[Dict[str, Dict[str, int]]] = None):
        """Fix each layer's per-task rank (given map, or the current argmax); `None` map -> current choice."""
        ranks = ranks if ranks is not None else rank_map(self)
        for name, layer in self.layers.items():
            layer.frozen_ranks = torch.tensor([int(ranks[t][name]) for t in self.task_names])

    def unfreeze_selection(self):
        for layer in self.layers.values():
            layer.frozen_ranks = None

    def set_training_step(self, step: int) -> None:
        """The trainer's optimizer step (drives `selector_warmup_steps`)."""
        self._training_step = int(step)

    def selector_warming_up(self) -> bool:
        step = self._training_step if self._training_step is not None else self._train_forwards
        return step < (self.config.selector_warmup_steps or 0)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, task_ids=None, segment_ids=None,
                prompt_mask=None, output_hidden_states: bool = False, inputs_embeds=None, labels=None,
                supervised_loss: bool = False, use_cache: Optional[bool] = None, return_dict: Optional[bool] = None,
                **unknown) -> MoreOutput:
        """Logits (+ the contrastive loss when task_ids are per token and segment_ids and prompt_mask are given).

        `supervised_loss=True` (needs `labels`, aligned with input_ids, -100 where unsupervised): no logits; the LM
        head runs only at the positions that predict a supervised token (next-token targets, packed-sample starts
        excluded) and the output holds their CE (`token_loss`, `token_index`). On GLUE-style data that is ~2 of ~70
        positions per sample, where the full head would cost about a fifth of a small model's FLOPs.
        Without it, `labels` is accepted because the training batch carries it, and ignored. `use_cache` (no KV
        cache here: generate through `generate`) and `return_dict` (a MoreOutput, which also indexes like a tuple)
        are accepted for HF-style callers. Any other keyword is an error: a
        misspelt `prompt_masks=` or `segment_id=` would otherwise switch the contrastive loss off silently.
        """
        if unknown:
            import difflib
            names = sorted(unknown)
            hints = [f"{n!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(n, _FORWARD_ARGS, 1))
                     else repr(n) for n in names]
            raise TypeError(f"MoreCausalLM.forward() got unexpected keyword argument(s) {', '.join(hints)}; it takes "
                            f"{', '.join(_FORWARD_ARGS)}")
        if use_cache:
            raise ValueError("MoreCausalLM.forward keeps no KV cache (use_cache=True): use model.generate(..., task=t)")
        if return_dict is False:
            raise ValueError("MoreCausalLM.forward always returns a MoreOutput (return_dict=False is not supported)")
        cc = self.config.contrastive
        want_cl = (cc.weight > 0 and task_ids is not None and torch.is_tensor(task_ids) and task_ids.dim() > 0
                   and segment_ids is not None and prompt_mask is not None)
        self._set_tokens(task_ids)
        self._ctx.selector_detached = self.training and self.selector_warming_up()
        if self.training and torch.is_grad_enabled():
            self._train_forwards += 1
        want_hidden = bool(want_cl or output_hidden_states)
        if supervised_loss and labels is None:
            raise ValueError("MoreCausalLM.forward(supervised_loss=True) needs labels")
        packed = {}
        if self.base_model.config._attn_implementation == PACKED_ATTENTION:  # sample boundaries instead of a mask
            if segment_ids is None:
                raise ValueError(f"attn_implementation={PACKED_ATTENTION!r} needs segment_ids in the forward call")
            packed, attention_mask = {"packed_segments": packed_segments(segment_ids)}, None
        if supervised_loss and self._plain_lm_head():
            out = self.base_model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                                position_ids=position_ids, inputs_embeds=inputs_embeds,
                                                use_cache=False, output_hidden_states=want_hidden, **packed)
            hidden = out.last_hidden_state
        else:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds, use_cache=False, output_hidden_states=want_hidden,
                                  **packed)
            hidden = None
        logits, token_loss, token_index = (None if supervised_loss else out.logits), None, None
        if supervised_loss:
            token_index, targets = supervised_positions(labels, position_ids)
            if hidden is not None:
                token_loss = supervised_ce(self.base_model.get_output_embeddings(),
                                           hidden.reshape(-1, hidden.shape[-1]).index_select(0, token_index), targets)
            else:  # a head with its own post-processing (soft-capping, logit scale) or adapted: full logits
                flat = out.logits.reshape(-1, out.logits.shape[-1]).index_select(0, token_index)
                token_loss = F.cross_entropy(flat.float(), targets, reduction="none")
        cl = aux = None
        if want_cl:
            sims, sample_task, keep = self.task_similarities(out.hidden_states, segment_ids, prompt_mask, task_ids)
            if keep.any():
                cl = F.cross_entropy(sims[keep] / cc.temperature, sample_task[keep])
            else:
                cl = sims.sum() * 0.0
            aux = cc.weight * cl
        return MoreOutput(logits=logits, contrastive_loss=cl, aux_loss=aux, token_loss=token_loss,
                          token_index=token_index, hidden_states=out.hidden_states if output_hidden_states else None)

    def _plain_lm_head(self) -> bool:
        """logits == lm_head(the decoder's last hidden state), so the head may run at supervised positions only:
        for the model types in PLAIN_HEAD_MODEL_TYPES (checked in their transformers code), not for an adapted head
        (its task mask is per token of the full sequence). Other types post-process the logits or the hidden state
        (soft-capping: Gemma 2+; a logit scale: Cohere, Granite, MiniCPM3; a multiplier: Falcon-H1) and get the full
        logits: correct, slower."""
        head = self.base_model.get_output_embeddings()
        return (getattr(self.hf_config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES and head is not None
                and not isinstance(head, MoreLinear) and hasattr(self.base_model, "get_decoder"))

    def task_similarities(self, hidden_states, segment_ids, prompt_mask, task_ids=None):
        """Cosine similarity (S x T) of each packed sample to each task, from the model's hidden states.

        shared: projected pooled `hidden_states[contrastive.layer]` vs the shared table (through
        `self.selector(...)` so ZeRO-3 gathers it). per_layer: mean over adapted modules reading the residual stream
        (in_features == hidden) of cos(pooled input of their decoder layer, their own embeddings), as the reference
        compares each linear's input with its embeddings.
        """
        mode = self.config.contrastive.representation
        if self.selector.shared:
            reps, st, keep = pool_samples(hidden_states[self.config.contrastive.layer], segment_ids, prompt_mask,
                                          task_ids, mode)
            return self.selector(reps), st, keep
        hidden = self.hf_config.hidden_size
        pooled, sims, st, keep = {}, [], None, None
        for name, layer in self.layers.items():
            m = _LAYER_RE.search(name)
            if m is None or layer.in_features != hidden:
                continue
            i = int(m.group(1))
            if i not in pooled:
                pooled[i], st, keep = pool_samples(hidden_states[i], segment_ids, prompt_mask, task_ids, mode)
            sims.append(layer(pooled[i], task_similarity=True))
        if not sims:
            raise ValueError("per_layer contrastive needs adapted modules of width hidden_size inside `layers.N.`")
        return torch.stack(sims).mean(0), st, keep

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, *args, task: int, **kwargs):
        """The base's generate with task `task`'s adapter; a model trained with packed_sdpa (whose attention needs
        the samples' boundaries) generates through sdpa, with the KV cache and attention mask as usual."""
        cfg = self.base_model.config
        attention = cfg._attn_implementation
        try:
            if attention == PACKED_ATTENTION:
                cfg._attn_implementation = "sdpa"
            with self.task_context(task):
                return self.base_model.generate(*args, **kwargs)
        finally:
            cfg._attn_implementation = attention


def rank_map(model) -> Dict[str, Dict[str, int]]:
    """{task: {layer name in the base model: chosen rank}}; gathers ZeRO-3 partitioned selector parameters
    (collective: every rank must call it)."""
    model = getattr(model, "module", model)  # a DeepSpeed engine
    out = {t: {} for t in model.task_names}
    with gathered(model.selector_parameters()):
        for name, layer in model.layers.items():
            ranks = layer.chosen_ranks()
            for i, t in enumerate(model.task_names):
                out[t][name] = int(ranks[i])
    return out
