"""Method fidelity (issue 7): does MoRE's rank selector choose well? A controlled multi-task experiment whose
answer is known.

Set-up (plain PyTorch, one process, CPU, fp32):
- base: a frozen tiny Llama (fixed seed), every linear of every decoder layer adapted (7 per layer);
- teachers: task t = base + a PLANTED update on every target linear W:
      dW_t = sum_{j <= r_t} s_W * u_j v_j^T       (U: out x R, V: R x in orthonormal, drawn per layer)
  i.e. task t's update is the rank-r_t PREFIX of one rank-R update, with planted ranks r_t (default 1, 2, 4, 8).
  Component magnitudes are shared across tasks (s_W = --magnitude x the spectral norm of W), so one shared
  max-rank pair (A, B) with nested prefixes - MoRE's hypothesis class - holds every teacher exactly. A task-specific
  magnitude could not be represented by MoRE (no per-task parameter in the adapter) and would make the "known
  answer" unreachable; equal magnitudes make every component equally visible, so the planted rank is identifiable:
  a task using rank r > r_t gets components r_t+1..r, which other tasks need and the shared pair therefore holds
  (pure noise for task t); r < r_t misses components. A single shared LoRA (ignores the task id) can only fit a
  compromise of the four different updates.
- students distil the teachers: MSE between student and teacher logits, fresh uniform-random token sequences every
  step, mixed-task batches (each sequence one task; per-token task ids for MoRE). Every variant sees the same
  batches, the same number of steps, the same optimiser (Adam, cosine schedule) and learning rate for its A/B:
    more          MoRE, max rank R, selector learning (settings below)
    per_task_lora one PEFT LoRA of rank R per task (T x the parameters), each trained on its task's rows
    shared_lora   one PEFT LoRA of rank R for all tasks (task id ignored)
    more_frozen   MoRE with the selection frozen at its random initial choice (gate_init=random, no selector
                  learning): what the reference code effectively does (the reference code, NLPfreshman0/MoRE)
- held-out: fixed random sequences; per variant and task the logit MSE against that task's teacher, also divided
  by the base's MSE (the fraction of the planted effect left unexplained).

Identifiability: with planted ranks 1, 2, 4, 8 and max rank 8 the prefix differences (1, 1, 2, 4) sum to 8, so the
ONLY exact fit uses exactly the planted ranks (if max_rank exceeded the largest planted rank, "every task one rank
higher" would fit equally well and only a rank cost could break the tie). Layers whose planted update barely moves
the logits (column `vis` of the per-layer table, e.g. layer-1 q/k) carry almost no signal for their rank.

Selector settings (defaults; MoRE-only runs of 1200 steps at lr 1e-2, one seed, mean normalized held-out loss /
fraction of ranks == planted): library defaults (max-rank warm-up, selector lr x10) 0.067 / 0.48; + expected-rank
cost 0.03: 0.070 / 0.54; random-rank warm-up, selector lr x10: 0.078 / 0.43; random-rank warm-up, selector lr x1:
0.044 / 0.59 (chosen); same with x3 and gate temperature 3: 0.053 / 0.55.
- selector warm-up (20 % of steps) with RANDOM ranks per (task, layer) every step (`--warmup-ranks random`, nested
  dropout, done in this script via the frozen-rank hook): a max-rank warm-up leaves A/B's components in an arbitrary
  rotation, so prefixes mean nothing when the gate starts choosing; random truncation orders them by how many
  tasks use them (component j of the planted nesting lands in slot j).
- gate_init=max_rank after the warm-up, ste=all_experts, gate temperature 1, selector lr = lr x 1 (x10, the library
  default, flips ranks faster than A/B re-adapt and ended worse here).
- no rank cost by default (`--rank-cost`): the errors of tasks 1-4 are mostly ranks ABOVE the planted one (a local
  optimum where A/B co-adapted to the too-large prefix; the rank-8 task sometimes stays at 5-7); a small cost lowers
  the mean ranks but did not lower the loss.

    .venv/bin/python bench/fidelity.py            # default run (~4.3 CPU-minutes: 1 thread; 9 min wall on busy cores)
    .venv/bin/python bench/fidelity.py --quick    # ~30 CPU-seconds; used by tests/test_fidelity_quick.py
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config.more import MoreConfig  # noqa: E402
from pipeline.models.tiny import tiny_llama_config  # noqa: E402
from pipeline.more import inject, rank_map  # noqa: E402

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["more", "per_task_lora", "shared_lora", "more_frozen"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 1000, quick 120)")
    ap.add_argument("--quick", action="store_true", help="small run for tests (well under a minute)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the base, the planted updates and the data")
    ap.add_argument("--planted", default="1,2,4,8", help="planted rank of each task (comma list; max = --rank)")
    ap.add_argument("--rank", type=int, default=8, help="max rank of MoRE and rank of every LoRA")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--init-std", type=float, default=0.1,
                    help="initializer_range of the random base (0.02 leaves attention uniform: q/k invisible)")
    ap.add_argument("--magnitude", type=float, default=0.5,
                    help="planted singular value of every component, relative to the layer's spectral norm")
    ap.add_argument("--batch", type=int, default=32, help="sequences per step (a multiple of the task count)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--eval-seqs", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--warmup-frac", type=float, default=0.05, help="lr warm-up (fraction of steps), then cosine")
    # selector settings (MoRE)
    ap.add_argument("--gate-init", choices=["max_rank", "random"], default="max_rank")
    ap.add_argument("--selector-warmup", type=float, default=0.2,
                    help="selector warm-up, fraction of steps (< 1) or steps (>= 1)")
    ap.add_argument("--warmup-ranks", choices=["random", "max"], default="random",
                    help="ranks MoRE uses during the selector warm-up: `random` = a fresh uniform rank per (task, "
                         "layer) every step (nested dropout: orders the shared components by how many tasks use "
                         "them), `max` = the gate's initial choice (max rank with gate_init=max_rank)")
    ap.add_argument("--selector-lr-mult", type=float, default=1.0)
    ap.add_argument("--gate-temperature", type=float, default=1.0)
    ap.add_argument("--ste", choices=["all_experts", "selected"], default="all_experts")
    ap.add_argument("--rank-cost", type=float, default=0.0,
                    help="weight of an expected-rank penalty (sum over layers/tasks of E_p[r]/R, mean); 0 = off")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: these shapes are too small to gain from more, and on shared cores "
                    "OpenMP spin-waiting made 2 threads ~20x slower)")
    ap.add_argument("--snapshots", type=int, default=10, help="rank-map snapshots of MoRE during training")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fidelity.json"))
    ap.add_argument("--md", default=None, help="markdown table (default: --out with .md)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = args.steps or 120
        args.batch, args.seq, args.eval_seqs, args.snapshots = 16, 16, 32, 5
    args.steps = args.steps or 1000
    return args


# ---------------------------------------------------------------------------------------------- models
def build_base(args):
    from transformers import LlamaForCausalLM
    cfg = tiny_llama_config(args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                            num_kv_heads=args.heads, intermediate_size=args.ffn,
                            max_position_embeddings=max(64, args.seq))
    cfg.initializer_range = args.init_std
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    m = LlamaForCausalLM(cfg).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def more_config(args, **kw) -> MoreConfig:
    return MoreConfig(max_rank=args.rank, alpha=2.0 * args.rank, target_modules=list(LINEARS),
                      contrastive=dict(weight=0.0), **kw)


def build_teacher(base, args, tasks, planted):
    """base + planted nested updates, as a MoRE model with frozen ranks = planted ranks (scale folded into B)."""
    R = args.rank
    cfg = more_config(args, selector_warmup_steps=0)
    teacher = inject(copy.deepcopy(base), cfg, tasks).eval()
    g = torch.Generator().manual_seed(10_000 + args.seed)
    with torch.no_grad():
        for name, layer in teacher.layers.items():
            W = layer.base_layer.weight
            U, _ = torch.linalg.qr(torch.randn(layer.out_features, R, generator=g))
            V, _ = torch.linalg.qr(torch.randn(layer.in_features, R, generator=g))
            s = args.magnitude * torch.linalg.matrix_norm(W, ord=2)
            layer.lora_A.copy_(V.t())
            layer.lora_B.copy_(U * (s / layer.scale))
    teacher.freeze_selection({t: {n: planted[t][n] for n in teacher.layers} for t in tasks})
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def peft_lora(base, args):
    from peft import LoraConfig, get_peft_model
    m = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank,
                                                       target_modules=list(LINEARS), lora_dropout=0.0))
    return m.train()


def schedule(args):
    warm = max(1, int(args.warmup_frac * args.steps))

    def f(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))
    return f


def mse(a, b):
    return F.mse_loss(a.float(), b.float())


class Variant:
    """A trainable student (or T of them) with its own optimizer, timer and logits function."""

    def __init__(self, name, models, optimizers, args):
        self.name, self.models, self.opts = name, models, optimizers
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule(args)) for o in optimizers]
        self.train_s = 0.0

    def params(self):
        return sum(p.numel() for m in self.models for p in m.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- data
def random_batch(g, args, T):
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    tasks = torch.arange(args.batch) % T
    tasks = tasks[torch.randperm(args.batch, generator=g)]
    return ids, tasks


def random_ranks(model, g):
    """Nested-dropout warm-up: every (task, layer) uses a uniformly drawn expert this step (the gate is bypassed)."""
    for layer in model.layers.values():
        er = torch.tensor(layer.expert_ranks)
        layer.frozen_ranks = er[torch.randint(len(er), (layer.num_tasks,), generator=g)]


def task_ids(tasks, seq):
    return tasks[:, None].expand(-1, seq).contiguous()


# ---------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    ranks_planted = [int(r) for r in args.planted.split(",")]
    T = len(ranks_planted)
    if max(ranks_planted) > args.rank or min(ranks_planted) < 1:
        raise SystemExit(f"--planted ranks must lie in 1..{args.rank}")
    if args.batch % T:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the task count {T}")
    tasks = [f"task{i}_r{r}" for i, r in enumerate(ranks_planted)]

    base = build_base(args)
    probe = inject(copy.deepcopy(base), more_config(args), tasks)
    layer_names = list(probe.layers)
    del probe
    planted = {t: {n: ranks_planted[i] for n in layer_names} for i, t in enumerate(tasks)}
    teacher = build_teacher(base, args, tasks, planted)

    sel_warm = int(args.selector_warmup if args.selector_warmup >= 1 else args.selector_warmup * args.steps)
    cfg_more = more_config(args, gate_init=args.gate_init, selector_warmup_steps=sel_warm,
                           selector_lr_multiplier=args.selector_lr_mult, gate_temperature=args.gate_temperature,
                           ste=args.ste, init_seed=args.seed)
    more = inject(copy.deepcopy(base), cfg_more, tasks).train()
    more_opt = torch.optim.Adam(more.param_groups(args.lr))
    frozen = inject(copy.deepcopy(base), more_config(args, gate_init="random", init_seed=args.seed), tasks).train()
    frozen.freeze_selection()  # the argmax of the random initial gates, never revisited
    for p in frozen.selector_parameters():
        p.requires_grad_(False)
    frozen_opt = torch.optim.Adam(frozen.adapter_parameters(), lr=args.lr)
    shared = peft_lora(base, args)
    shared_opt = torch.optim.Adam([p for p in shared.parameters() if p.requires_grad], lr=args.lr)
    per_task = [peft_lora(base, args) for _ in tasks]
    per_opts = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=args.lr) for m in per_task]

    V = {"more": Variant("more", [more], [more_opt], args),
         "per_task_lora": Variant("per_task_lora", per_task, per_opts, args),
         "shared_lora": Variant("shared_lora", [shared], [shared_opt], args),
         "more_frozen": Variant("more_frozen", [frozen], [frozen_opt], args)}
    frozen_initial = rank_map(frozen)
    more_initial = rank_map(more)

    def logits_of(name, ids, tasks_vec):
        if name == "more":
            return more(input_ids=ids, task_ids=task_ids(tasks_vec, ids.shape[1])).logits
        if name == "more_frozen":
            return frozen(input_ids=ids, task_ids=task_ids(tasks_vec, ids.shape[1])).logits
        if name == "shared_lora":
            return shared(input_ids=ids, use_cache=False).logits
        raise ValueError(name)

    def rank_cost():
        """Mean over layers and tasks of the expected rank E_p[r] / R (gradient to the gates only)."""
        rs = None
        terms = []
        for layer in more.layers.values():
            if rs is None:
                rs = torch.tensor(layer.expert_ranks, dtype=torch.float32) / args.rank
            terms.append((layer.probs() * rs).sum(-1).mean())
        return torch.stack(terms).mean()

    g = torch.Generator().manual_seed(args.seed + 1)
    gr = torch.Generator().manual_seed(args.seed + 2)
    snap_every = max(1, args.steps // max(1, args.snapshots))
    trajectory, train_log = [], []
    for step in range(args.steps):
        ids, tvec = random_batch(g, args, T)
        with torch.no_grad():
            target = teacher(input_ids=ids, task_ids=task_ids(tvec, args.seq)).logits
        losses = {}
        for name, var in V.items():
            t0 = time.perf_counter()
            if name == "per_task_lora":
                tot = 0.0
                for ti, (m, opt) in enumerate(zip(per_task, per_opts)):
                    rows = (tvec == ti).nonzero().squeeze(1)
                    loss = mse(m(input_ids=ids[rows], use_cache=False).logits, target[rows])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    tot += loss.item() / T
                losses[name] = tot
            else:
                if name == "more":
                    more.set_training_step(step)
                    if args.warmup_ranks == "random" and sel_warm > 0:
                        if step < sel_warm:
                            random_ranks(more, gr)
                        elif step == sel_warm:
                            more.unfreeze_selection()
                loss = mse(logits_of(name, ids, tvec), target)
                losses[name] = loss.item()
                if name == "more" and args.rank_cost > 0 and not more.selector_warming_up():
                    loss = loss + args.rank_cost * rank_cost()
                var.opts[0].zero_grad(set_to_none=True)
                loss.backward()
                var.opts[0].step()
            for s in var.scheds:
                s.step()
            var.train_s += time.perf_counter() - t0
        if step % snap_every == 0 or step == args.steps - 1:
            rm = rank_map(more)
            frac = sum(rm[t][n] == planted[t][n] for t in tasks for n in layer_names) / (T * len(layer_names))
            mean_r = {t: sum(rm[t].values()) / len(layer_names) for t in tasks}
            trajectory.append(dict(step=step, frac_planted=frac, mean_rank=mean_r))
            train_log.append(dict(step=step, **{k: round(v, 6) for k, v in losses.items()}))
            print(f"step {step:5d}  " + "  ".join(f"{k}={v:.5f}" for k, v in losses.items())
                  + f"  | more: rank==planted {frac:.2f}, mean ranks "
                  + " ".join(f"{mean_r[t]:.1f}" for t in tasks), flush=True)

    # ------------------------------------------------------------------ held-out evaluation
    ge = torch.Generator().manual_seed(args.seed + 12345)
    eval_ids = torch.randint(3, args.vocab, (args.eval_seqs, args.seq), generator=ge)
    for m in [more, frozen, shared, *per_task]:
        m.eval()
    results = {v: {} for v in VARIANTS}
    base_loss, visibility = {}, {}
    with torch.no_grad():
        for ti, t in enumerate(tasks):
            tv = torch.full((args.eval_seqs,), ti)
            tgt = teacher(input_ids=eval_ids, task_ids=task_ids(tv, args.seq)).logits
            with teacher.disable_adapters():
                base_loss[t] = mse(teacher(input_ids=eval_ids, task_ids=task_ids(tv, args.seq)).logits, tgt).item()
            for name in ["more", "shared_lora", "more_frozen"]:
                results[name][t] = mse(logits_of(name, eval_ids, tv), tgt).item()
            results["per_task_lora"][t] = mse(per_task[ti](input_ids=eval_ids, use_cache=False).logits, tgt).item()
        # how much each layer's planted update moves the logits (rank-8 task): layers with ~0 are unidentifiable
        tmax = tasks[max(range(T), key=lambda i: ranks_planted[i])]
        tv = torch.full((args.eval_seqs,), tasks.index(tmax))
        tgt = teacher(input_ids=eval_ids, task_ids=task_ids(tv, args.seq)).logits
        for n in layer_names:
            layer = teacher.layers[n]
            keep = layer.frozen_ranks.clone()
            layer.frozen_ranks = torch.zeros_like(keep)
            visibility[n] = mse(teacher(input_ids=eval_ids, task_ids=task_ids(tv, args.seq)).logits, tgt).item() \
                / base_loss[tmax]
            layer.frozen_ranks = keep
    chosen = {"more": rank_map(more), "more_frozen": rank_map(frozen)}

    def frac_eq(rm, t=None):
        ts = [t] if t else tasks
        return sum(rm[x][n] == planted[x][n] for x in ts for n in layer_names) / (len(ts) * len(layer_names))

    def trainable(name):
        return V[name].params()

    rep = more.report
    params = {"more": dict(total=rep["adapter"] + rep["gates"] + rep["task_embeddings"], adapter=rep["adapter"],
                           gates=rep["gates"], task_embeddings=rep["task_embeddings"],
                           unused_contrastive_head=rep["contrastive_head"]),
              "per_task_lora": dict(total=trainable("per_task_lora")),
              "shared_lora": dict(total=trainable("shared_lora")),
              "more_frozen": dict(total=frozen.report["adapter"], adapter=frozen.report["adapter"])}
    summary = {}
    for name in VARIANTS:
        summary[name] = dict(mean_loss=sum(results[name].values()) / T,
                             mean_normalized=sum(results[name][t] / base_loss[t] for t in tasks) / T,
                             params=params[name]["total"], train_s=round(V[name].train_s, 2))
    for name in ["more", "more_frozen"]:
        summary[name]["frac_rank_eq_planted"] = frac_eq(chosen[name])
    ratio = {name: summary[name]["mean_loss"] / summary["per_task_lora"]["mean_loss"] for name in VARIANTS}
    per_task_ratio = {t: results["more"][t] / results["per_task_lora"][t] for t in tasks}
    goals = {
        "more within 5% of per_task_lora (mean loss)": ratio["more"] <= 1.05,
        "more < shared_lora (every task)": all(results["more"][t] < results["shared_lora"][t] for t in tasks),
        "more < more_frozen (every task)": all(results["more"][t] < results["more_frozen"][t] for t in tasks),
        "chosen rank == planted for most layers (> 50%)": summary["more"]["frac_rank_eq_planted"] > 0.5,
    }
    wall = time.perf_counter() - t_start

    out = dict(
        config={k: v for k, v in vars(args).items() if k not in ("out", "md")} | dict(
            selector_warmup_steps=sel_warm, more_config=cfg_more.model_dump(), tasks=tasks, layers=layer_names,
            loss="MSE(student logits, teacher logits), mean over tokens and vocab; held-out random sequences"),
        planted_ranks={t: ranks_planted[i] for i, t in enumerate(tasks)},
        base_loss=base_loss, losses=results, normalized={v: {t: results[v][t] / base_loss[t] for t in tasks}
                                                          for v in VARIANTS},
        ratio_to_per_task_lora=ratio, more_over_per_task_by_task=per_task_ratio,
        chosen_ranks=chosen, initial_ranks={"more": more_initial, "more_frozen": frozen_initial},
        frac_rank_eq_planted={v: {"all": frac_eq(chosen[v]), **{t: frac_eq(chosen[v], t) for t in tasks}}
                              for v in ["more", "more_frozen"]},
        layer_visibility=visibility, params=params, summary=summary, goals=goals, trajectory=trajectory,
        train_log=train_log, wall_s=round(wall, 2), threads=args.threads, torch=torch.__version__,
        machine=platform.processor() or platform.machine(), command="python bench/fidelity.py "
        + " ".join(argv if argv is not None else sys.argv[1:]))
    md = markdown(out, tasks, layer_names)
    print("\n" + md)
    p = Path(args.out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(out, indent=2))
    Path(args.md or p.with_suffix(".md")).write_text(md)
    return out


def _short(n):
    return n.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "").replace("_proj", "")


def markdown(r, tasks, layer_names):
    L, s = [], r["summary"]
    c = r["config"]
    sw = c["selector_warmup_steps"]
    L.append(f"# Method fidelity: planted ranks vs MoRE's choice\n")
    L.append(f"`{r['command'].strip()}` - {c['steps']} steps, batch {c['batch']} x {c['seq']} random tokens, "
             f"tiny Llama d={c['hidden']} x {c['layers']} layers, {len(layer_names)} adapted linears, "
             f"{r['threads']} threads, wall {r['wall_s']:.0f} s, torch {r['torch']}.\n")
    L.append("Held-out logit MSE against each task's teacher (normalized: / the base's MSE = fraction of the planted "
             "effect left unexplained). `rank==planted`: fraction of the task's layers whose chosen rank is the "
             "planted one.\n")
    L.append("| task | planted | MoRE | per-task LoRA | shared LoRA | MoRE frozen sel. | MoRE / per-task | "
             "MoRE rank==planted | frozen rank==planted |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    fr = r["frac_rank_eq_planted"]
    for t in tasks:
        lo, nz = r["losses"], r["normalized"]
        cell = {v: f"{lo[v][t]:.2e} ({nz[v][t]:.3f})" for v in VARIANTS}
        L.append(f"| {t} | {r['planted_ranks'][t]} | {cell['more']} | {cell['per_task_lora']} | "
                 f"{cell['shared_lora']} | {cell['more_frozen']} | {r['more_over_per_task_by_task'][t]:.2f} | "
                 f"{fr['more'][t]:.2f} | {fr['more_frozen'][t]:.2f} |")
    L.append(f"| **mean** | | {s['more']['mean_loss']:.2e} ({s['more']['mean_normalized']:.3f}) | "
             f"{s['per_task_lora']['mean_loss']:.2e} ({s['per_task_lora']['mean_normalized']:.3f}) | "
             f"{s['shared_lora']['mean_loss']:.2e} ({s['shared_lora']['mean_normalized']:.3f}) | "
             f"{s['more_frozen']['mean_loss']:.2e} ({s['more_frozen']['mean_normalized']:.3f}) | "
             f"{r['ratio_to_per_task_lora']['more']:.2f} | {fr['more']['all']:.2f} | {fr['more_frozen']['all']:.2f} |")
    L.append("")
    L.append("| variant | trainable params | train time (s) | mean loss / per-task LoRA |")
    L.append("|---|---|---|---|")
    for v in VARIANTS:
        L.append(f"| {v} | {s[v]['params']:,} | {s[v]['train_s']:.1f} | {r['ratio_to_per_task_lora'][v]:.2f} |")
    p = r["params"]["more"]
    L.append(f"\nMoRE params = A/B {p['adapter']:,} + gates {p['gates']:,} + task embeddings "
             f"{p['task_embeddings']:,} (its contrastive head, {p['unused_contrastive_head']:,}, is unused here: "
             f"contrastive weight 0, every task sees the same random inputs).\n")
    L.append("Goals: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in r["goals"].items()) + "\n")
    L.append("Chosen rank per layer (MoRE, final / frozen selector), planted rank in the header; `vis` = MSE when "
             "that one layer's planted update is removed from the rank-max teacher, / base MSE (how visible the layer "
             "is in the logits).\n")
    L.append("| layer | vis | " + " | ".join(f"{t} ({r['planted_ranks'][t]})" for t in tasks) + " |")
    L.append("|---|---|" + "---|" * len(tasks))
    for n in layer_names:
        cells = [f"{r['chosen_ranks']['more'][t][n]} / {r['chosen_ranks']['more_frozen'][t][n]}" for t in tasks]
        L.append(f"| {_short(n)} | {r['layer_visibility'][n]:.3f} | " + " | ".join(cells) + " |")
    L.append("\nMoRE during training (fraction of (task, layer) choices equal to the planted rank; mean chosen rank "
             f"per task; warm-up steps use {c['warmup_ranks']} ranks, the gate takes over at step {sw}):\n")
    L.append("| step | rank==planted | " + " | ".join(tasks) + " |")
    L.append("|---|---|" + "---|" * len(tasks))
    for tr in r["trajectory"]:
        warm = " (warm-up)" if tr["step"] < sw else ""
        L.append(f"| {tr['step']}{warm} | {tr['frac_planted']:.2f} | "
                 + " | ".join(f"{tr['mean_rank'][t]:.1f}" for t in tasks) + " |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
