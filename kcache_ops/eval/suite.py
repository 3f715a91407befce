"""The whole accuracy evaluation: build the prompt batches, prefill each once, run dense and every
KCache configuration on forks of it, and save the results after each configuration (so a run cut
short keeps what finished).

Batches ("groups"), each from its own stretch of the essay text (no token used twice, but the
needle haystacks of different lengths share their start):

* ``short``: the 1.5K perplexity windows and the agreement prompts together (both decode
  ``steps`` tokens);
* ``long``: the 6K perplexity windows (``long_prefill`` tokens, ``long_steps`` teacher-forced
  steps); the cache's costs (:func:`.summary.costs`) are read after this group;
* ``needle-<L>``: one prompt per phrasing and depth at haystack length L.
"""
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ..caches import check_kcache
from ..data import essays_text
from ..results import write_json
from . import agreement, needle, perplexity, summary
from .grid import display_name
from .runner import Config, fork, prefill_snapshot, step_through


@dataclass
class Settings:
    """Sizes of the evaluation (see ``python -m kcache_ops eval --help``)."""
    ppl_rows: int = 6
    agree_rows: int = 2
    prefill: int = 1536
    steps: int = 256
    long_rows: int = 3
    long_prefill: int = 6144
    long_steps: int = 96
    needle_lengths: tuple = (1024, 2048, 4096, 8000)
    needle_depths: tuple = (0.1, 0.5, 0.9)
    needle_phrasings: tuple = tuple(needle.PHRASINGS)
    answer_steps: int = 16
    seed: int = 0


def build_groups(tokenizer, settings):
    """The prompt batches -> list of dicts {"name", "prompts", "first" [B] or None (greedy from
    the prefill), "forced" [B, S] (-1 = greedy), and per kind: "ppl_rows" / "keys", "phrasing"}.

    Raises ValueError where the essay text is too short for every window and haystack."""
    s = settings
    ids = tokenizer.encode(essays_text(), add_special=False)
    short = (s.ppl_rows + s.agree_rows) * (s.prefill + s.steps + 1)
    long = s.long_rows * (s.long_prefill + s.long_steps + 1)
    if short + long + max(s.needle_lengths) > len(ids):  # the flags that ask for each part
        raise ValueError(
            f"eval needs {short + long + max(s.needle_lengths)} tokens of essay text, the text "
            f"has {len(ids)}: {short} for the short windows ((--ppl-rows + --agree-rows) x "
            f"(--prefill + --steps + 1)), {long} for the long ones (--long-rows x (--long-prefill "
            f"+ --long-steps + 1)), {max(s.needle_lengths)} for the longest needle haystack "
            "(--needle-lengths)")
    prompts, first, targets = perplexity.windows(ids, s.ppl_rows + s.agree_rows, s.prefill,
                                                 s.steps)
    forced = targets.clone()  # [rows, S]
    forced[s.ppl_rows:] = -1  # agreement rows: dense decides (greedy), then the others follow
    groups = [{"name": "short", "prompts": prompts, "first": first, "forced": forced,
               "ppl_rows": s.ppl_rows}]
    offset = short
    prompts, first, targets = perplexity.windows(ids, s.long_rows, s.long_prefill, s.long_steps,
                                                 offset)
    groups.append({"name": "long", "prompts": prompts, "first": first, "forced": targets,
                   "ppl_rows": s.long_rows})  # [rows, long_steps]
    offset += long  # the haystacks: text not used above
    for length in s.needle_lengths:
        ps, keys, phrasing = needle.prompts(tokenizer, ids, length, s.needle_depths, s.seed,
                                            offset, s.needle_phrasings)
        groups.append({"name": f"needle-{length}", "prompts": ps, "first": None,
                       "forced": torch.full((len(ps), s.answer_steps), -1, device="cpu"),
                       "keys": keys,
                       "phrasing": phrasing})
    return groups


def run_group(model, tokenizer, group, snapshot, config, dense_result, progress):
    """One configuration on one group -> (a dict of its measures (and "mass" where recorded), the
    cache it ran on)."""
    forced = group["forced"]  # [B, S]
    if group["name"] == "short" and dense_result is not None:
        forced = forced.clone()
        forced[group["ppl_rows"]:] = torch.tensor(dense_result["short"]["greedy"], device="cpu")
    first = group["first"]
    if first is None:  # greedy from the prefill's last logits (the same for every backend)
        first = snapshot.logits.argmax(-1)  # [B]
    cache = fork(model, snapshot, config, forced.shape[1], record_mass=True)
    argmax, logprob = step_through(model, cache, first, forced, progress)  # [B, S] each
    out = {}
    if config.backend == "kcache":
        out["mass"] = cache.attention_mass().tolist()
    if "ppl_rows" in group:
        rows = group["ppl_rows"]
        out["perplexity"] = perplexity.summarize(logprob[:rows])
        if rows < len(group["prompts"]):
            if dense_result is None:
                out["greedy"] = argmax[rows:].tolist()
            else:
                out["agreement"] = agreement.summarize(argmax[rows:], forced[rows:])
        return out, cache
    eos = set(tokenizer.eos_ids)
    generated = []
    for f, row in zip(first.tolist(), argmax.tolist()):
        tokens = [f] + row  # the greedy tokens in order (each argmax but the last was fed back)
        cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        generated.append(tokens[:cut])
    out.update(needle.score(tokenizer, generated, group["keys"]))
    out["phrasing"] = group["phrasing"]
    return out, cache


def evaluate(model, tokenizer, settings, configs, save, log=print):
    """Run dense, then each KCache configuration, on every group; after each configuration call
    ``save(results)`` with the list of finished results (dicts with "config", "seconds", "costs",
    per group name its measures, and "summary" (:func:`.summary.summarize`))."""
    groups = build_groups(tokenizer, settings)
    trained = model.config.max_position_embeddings
    for g in groups:
        longest = max(map(len, g["prompts"])) + g["forced"].shape[1]  # its caches' capacity
        if longest > trained:  # as generate warns: RoPE runs on, the model was not trained there
            warnings.warn(f"eval: the {g['name']} group's prompts and steps reach {longest} "
                          f"positions, past the {trained} the model was trained on; its "
                          "measures there say little", stacklevel=2)
        for config in configs:  # what only the capacity decides, before the dense runs
            if config.backend == "kcache":
                check_kcache(model.config, model.device, model.dtype, config.options, longest)
        if hasattr(model, "check_capacity"):  # a transformers model: a sliding window, say
            model.check_capacity(longest)
    snapshots = {}
    for g in tqdm(groups, desc="prefill (dense, once per batch)", unit="batch"):
        snapshots[g["name"]] = prefill_snapshot(model, g["prompts"])
    steps = sum(g["forced"].shape[1] for g in groups)
    results, dense = [], None
    for config in [Config.dense()] + list(configs):
        start = time.perf_counter()
        result = {"config": config.to_dict(), "mass": {}}
        with tqdm(total=steps, desc=f"{display_name(config):28s}", unit="step",
                  leave=False) as bar:
            for g in groups:
                out, cache = run_group(model, tokenizer, g, snapshots[g["name"]], config, dense,
                                       bar)
                if "mass" in out:
                    result["mass"][g["name"]] = out.pop("mass")
                result[g["name"]] = out
                if g["name"] == "long":
                    result["costs"] = summary.costs(cache, model.config, config)
                del cache
        result["seconds"] = time.perf_counter() - start
        if dense is None:
            dense = result
        result["summary"] = summary.summarize(result, dense)
        results.append(result)
        log(line(result))
        save(results)
    return results


def line(result):
    """One printed line per configuration: Δ ppl at both contexts, needle hits, agreement, host
    rows and bytes per step, device bytes per token (and its ratio to dense), seconds."""
    s = result["summary"]
    parts = [f"{display_name(Config.from_dict(result['config'])):34s}",
             "Δppl " + " ".join(f"{c} {s['dppl'][c]:+6.2f}%" for c in summary.CONTEXTS),
             f"needle {s['needle']}/{s['needle_total']}"]
    if "agreement" in result["short"]:
        a = result["short"]["agreement"]
        parts.append(f"agree {100 * a['match_rate']:5.1f}%")
    parts += [f"host {s['host_rows']:.1f} rows {s['host_bytes_per_step'] / 1024:7.1f} KiB/step",
              f"device {s['device_bytes_per_token'] / 1024:6.1f} KiB/token "
              f"({s['device_ratio']:.2f}x dense)", f"{result['seconds']:6.1f}s"]
    return "  ".join(parts)


def save_json(path, settings, info, results, command, planned, recommended):
    """Write the settings, the machine, the command, the planned configurations (``planned``, a
    list of Config), the results and the recommendation (:func:`.recommend.recommend`) to
    ``path``."""
    write_json(path, {"settings": asdict(settings), "machine": info, "command": command,
                      "planned": [c.to_dict() for c in planned], "recommended": recommended,
                      "results": results})
