"""How many of KCache's per-head host V reads are duplicates within a GQA group?

For each decode query (the last ``--queries`` positions of a prompt, each attending causally to
all keys up to and including itself, as a decode step does), every layer and every KV group:
each of the G query heads picks its top-N keys by the exact score q_h . K (post-RoPE, as the model
attends). total = G * N (head, row) pairs; unique = |union of the G top-N sets|. Reported:
unique / total, the fraction of host reads left if a row chosen by several heads is read once.

"all": top N over every position 0..p. "cold": top N over positions [sinks, L - window),
L = p + 1 (KCache's default hot rows, sinks=4, window=60, excluded as the cache does).

Text: the essay corpus of the accuracy evaluation (kcache_ops.data.essays_text), tokenised as the
eval does; the prompt is the eval's first window of its "short" (1536-token) or "long"
(6144-token) perplexity group.

    python bench/head_overlap.py [--length short|long|both] [--n ...]   (~30 s short, ~50 s both,
                                                                        two cores)

Measured (SmolLM2-135M, G = 3, 8 queries per length; bench/NOTES.md, sparse_attn_v): at N = 64
0.64 / 0.62 of the reads stay (1.5K / 6K tokens), 0.68 / 0.66 with the hot rows excluded; chance
would be about 0.96.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from kcache_ops.cli.args import nonnegative_int, positive_int
from kcache_ops.data import essays_text
from kcache_ops.eval import perplexity
from kcache_ops.eval.suite import Settings
from kcache_ops.model.load import describe_model, load_model


def prompt_ids(tokenizer, which, queries):
    """Token ids of the eval's first perplexity window of group ``which``, extended by
    ``queries`` of its decode tokens, so the last ``queries`` positions are real decode steps
    (the first at position = prefill)."""
    s = Settings()
    ids = tokenizer.encode(essays_text(), add_special=False)
    if which == "short":
        prefill, steps, offset = s.prefill, s.steps, 0
    else:
        prefill, steps = s.long_prefill, s.long_steps
        offset = (s.ppl_rows + s.agree_rows) * (s.prefill + s.steps + 1)
    prompts, first, targets = perplexity.windows(ids, 1, prefill, steps, offset)
    return prompts[0] + [int(first[0])] + targets[0, :queries - 1].tolist(), offset


@torch.no_grad()
def capture_qk(model, tokens, queries):
    """Full causal forward; per layer, post-RoPE q of the last ``queries`` positions
    [Hq, Q, D] and k of all positions [Hkv, T, D] (float32)."""
    qs, ks = [], []

    def attend(i, q, k, v):  # q [1, Hq, T, D], k, v [1, Hkv, T, D], after RoPE
        qs.append(q[0, :, -queries:].float().clone())
        ks.append(k[0].float().clone())
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    t = tokens.shape[1]
    model._run(tokens, torch.arange(t)[None], attend)  # the model's own forward, same RoPE
    return qs, ks


def scores_and_masks(q, k, sinks, window):
    """q [Hq, Q, D], k [Hkv, T, D] of one layer (the queries at the last Q positions) -> (scores
    [Hq, Q, T], each head's queries over its KV head's keys; causal [Q, T], the keys a query
    attends, L = its position + 1; cold [Q, T], those of them ``sinks <= j < L − window``)."""
    hq, nq, _ = q.shape
    hkv, t, _ = k.shape
    scores = torch.einsum("hqd,htd->hqt", q, k.repeat_interleave(hq // hkv, 0))  # [Hq, Q, T]
    pos = torch.arange(t)  # [T]
    qpos = torch.arange(t - nq, t)  # [Q] position of each query
    causal = pos[None] <= qpos[:, None]  # [Q, T]
    cold = causal & (pos[None] >= sinks) & (pos[None] < qpos[:, None] + 1 - window)  # [Q, T]
    return scores, causal, cold


def overlap(q, k, ns, sinks, window):
    """q [Hq, Q, D], k [Hkv, T, D] of one layer -> {(mode, n): [Hkv, Q] unique/total}."""
    hq, nq, _ = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    scores, causal, cold = scores_and_masks(q, k, sinks, window)
    out = {}
    for mode, mask in (("all", causal), ("cold", cold)):
        s = scores.masked_fill(~mask[None], float("-inf"))
        avail = int(mask.sum(1).min())
        for n in ns:
            assert n <= avail, (n, avail)
            idx = s.topk(n, dim=-1).indices.view(hkv, g, nq, n)  # [Hkv, G, Q, N]
            idx = idx.permute(0, 2, 1, 3).reshape(hkv, nq, g * n)  # [Hkv, Q, G*N]
            srt = idx.sort(-1).values
            uniq = 1 + (srt[..., 1:] != srt[..., :-1]).sum(-1)  # [Hkv, Q]
            out[(mode, n)] = uniq.float() / (g * n)
    return out


def add_text_arguments(ap, queries):
    """The flags of the studies over the eval's essay windows (this one, step_reuse.py,
    reuse_hits.py): --length, --queries (default ``queries``), --sinks, --window, --threads."""
    ap.add_argument("--length", choices=("short", "long", "both"), default="short")
    ap.add_argument("--queries", type=positive_int, default=queries)
    ap.add_argument("--sinks", type=nonnegative_int, default=4)
    ap.add_argument("--window", type=nonnegative_int, default=60)
    ap.add_argument("--threads", type=positive_int, default=2)


def essay_queries(a):
    """Loads the embedded model and, for each length of ``a.length``, runs its window forward
    and prints where the text lies -> yields (which, the model's config, qs, ks, tokenizer,
    ids): per layer q [Hq, Q, D] of the last ``a.queries`` positions and k [Hkv, T, D]."""
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model, tokenizer = load_model(device="cpu", dtype=torch.float32)
    c = model.config
    print(f"model: {describe_model()}; layers {c.num_layers}, Hq {c.num_heads}, "
          f"Hkv {c.num_kv_heads}, D {c.head_dim}; load {time.time() - t0:.1f}s")
    for which in (("short", "long") if a.length == "both" else (a.length,)):
        t1 = time.time()
        ids, offset = prompt_ids(tokenizer, which, a.queries)
        qs, ks = capture_qk(model, torch.tensor([ids]), a.queries)
        t = len(ids)
        print(f"\n== {which}: essay tokens [{offset}, {offset + t}) ({t} tokens), {a.queries} "
              f"decode queries at positions {t - a.queries}..{t - 1}; forward "
              f"{time.time() - t1:.1f}s")
        yield which, c, qs, ks, tokenizer, ids
        print(f"   {which} done in {time.time() - t1:.1f}s")
    print(f"\ntotal {time.time() - t0:.1f}s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_arguments(ap, queries=8)
    ap.add_argument("--n", type=positive_int, nargs="+", default=[64, 128, 256])
    a = ap.parse_args()
    for which, c, qs, ks, tokenizer, ids in essay_queries(a):
        print(f"   text starts: {tokenizer.decode(ids[:24])!r}")
        print(f"   text ends:   {tokenizer.decode(ids[-24:])!r}")
        per = [overlap(q, k, a.n, a.sinks, a.window) for q, k in zip(qs, ks)]
        print(f"   unique/total (G={c.num_heads // c.num_kv_heads}); mean over layers x groups x "
              f"queries; per-layer means min (layer) / max (layer); group-query min / max")
        print(f"   {'mode':5} {'N':>4} {'mean':>6} {'lay min':>12} {'lay max':>12} "
              f"{'min':>6} {'max':>6}")
        for mode in ("all", "cold"):
            for n in a.n:
                r = torch.stack([p[(mode, n)] for p in per])  # [layers, Hkv, Q]
                lay = r.mean((1, 2))
                lo, hi = int(lay.argmin()), int(lay.argmax())
                print(f"   {mode:5} {n:>4} {r.mean():6.3f} {lay[lo]:6.3f} ({lo:2d})  "
                      f"{lay[hi]:6.3f} ({hi:2d})  {r.min():6.3f} {r.max():6.3f}")
        if a.n:
            n = a.n[0]
            for mode in ("all", "cold"):
                lay = torch.stack([p[(mode, n)].mean() for p in per])
                print(f"   per layer, {mode}, N={n}: " + " ".join(f"{x:.2f}" for x in lay))


if __name__ == "__main__":
    main()
