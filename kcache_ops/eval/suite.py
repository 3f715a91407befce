"""The whole accuracy evaluation: build the prompt batches, prefill each once, run dense and every
KCache configuration on forks of it, and save the results after each configuration (so a run cut
short keeps what finished).

Batches ("groups"): ``long`` holds the perplexity windows and the agreement prompts together
(both decode ``steps`` tokens); ``needle-<L>`` holds one prompt per depth at haystack length L.
"""
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ..data import essays_text
from ..results import write_json
from . import agreement, needle, perplexity
from .runner import Config, fork, prefill_snapshot, step_through


@dataclass
class Settings:
    """Sizes of the evaluation (see ``python -m kcache_ops eval --help``)."""
    ppl_rows: int = 6
    agree_rows: int = 2
    prefill: int = 1536
    steps: int = 256
    needle_lengths: tuple = (1024, 2048, 4096, 8000)
    needle_depths: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    answer_steps: int = 16
    seed: int = 0


def build_groups(tokenizer, settings):
    """The prompt batches -> list of dicts {"name", "prompts", "first" [B] or None (greedy from
    the prefill), "forced" [B, S] (-1 = greedy), "kind", and per kind: targets / keys}."""
    s = settings
    ids = tokenizer.encode(essays_text(), add_special=False)
    width = s.prefill + s.steps + 1
    prompts, first, targets = perplexity.windows(ids, s.ppl_rows + s.agree_rows, s.prefill,
                                                 s.steps)
    forced = targets.clone()  # [rows, S]
    forced[s.ppl_rows:] = -1  # agreement rows: dense decides (greedy), then the others follow
    groups = [{"name": "long", "prompts": prompts, "first": first, "forced": forced,
               "ppl_rows": s.ppl_rows}]
    offset = (s.ppl_rows + s.agree_rows) * width  # the haystacks come from text not used above
    for length in s.needle_lengths:
        ps, keys = needle.prompts(tokenizer, ids, length, s.needle_depths, s.seed, offset)
        groups.append({"name": f"needle-{length}", "prompts": ps, "first": None,
                       "forced": torch.full((len(ps), s.answer_steps), -1), "keys": keys,
                       "length": length})
    return groups


def run_group(model, tokenizer, group, snapshot, config, dense_result, progress):
    """One configuration on one group -> a dict of its measures (and "mass" where recorded)."""
    forced = group["forced"]  # [B, S]
    if group["name"] == "long" and dense_result is not None:
        forced = forced.clone()
        forced[group["ppl_rows"]:] = torch.tensor(dense_result["long"]["greedy"])
    first = group["first"]
    if first is None:  # greedy from the prefill's last logits (the same for every backend)
        first = snapshot.logits.argmax(-1)  # [B]
    cache = fork(model, snapshot, config, forced.shape[1], record_mass=True)
    argmax, logprob = step_through(model, cache, first, forced, progress)  # [B, S] each
    out = {}
    if config.backend == "kcache":
        out["mass"] = cache.attention_mass().tolist()
    if group["name"] == "long":
        rows = group["ppl_rows"]
        out["perplexity"] = perplexity.summarize(logprob[:rows])
        if dense_result is None:
            out["greedy"] = argmax[rows:].tolist()
        else:
            out["agreement"] = agreement.summarize(argmax[rows:], forced[rows:])
        return out
    eos = set(tokenizer.eos_ids)
    generated = []
    for f, row in zip(first.tolist(), argmax.tolist()):
        tokens = [f] + row  # the greedy tokens in order (each argmax but the last was fed back)
        cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        generated.append(tokens[:cut])
    out.update(needle.score(tokenizer, generated, group["keys"]))
    return out


def evaluate(model, tokenizer, settings, configs, save, log=print):
    """Run dense, then each KCache configuration, on every group; after each configuration call
    ``save(results)`` with the list of finished results (dicts with "config", "seconds", and per
    group name its measures)."""
    groups = build_groups(tokenizer, settings)
    snapshots = {}
    for g in tqdm(groups, desc="prefill (dense, once per batch)", unit="batch"):
        snapshots[g["name"]] = prefill_snapshot(model, g["prompts"])
    steps = sum(g["forced"].numel() // len(g["prompts"]) for g in groups)
    results, dense = [], None
    for config in [Config.dense()] + list(configs):
        start = time.perf_counter()
        result = {"config": config.to_dict(), "mass": {}}
        with tqdm(total=steps, desc=f"{config.name:28s}", unit="step", leave=False) as bar:
            for g in groups:
                out = run_group(model, tokenizer, g, snapshots[g["name"]], config, dense, bar)
                if "mass" in out:
                    result["mass"][g["name"]] = out.pop("mass")
                result[g["name"]] = out
        result["seconds"] = time.perf_counter() - start
        if dense is None:
            dense = result
        results.append(result)
        log(line(result, dense))
        save(results)
    return results


def line(result, dense):
    """One printed line per configuration."""
    name = Config.from_dict(result["config"]).name
    ppl = result["long"]["perplexity"]
    parts = [f"{name:28s}", f"ppl {ppl['ppl']:8.4f} "
             f"({perplexity.delta(ppl, dense['long']['perplexity']):+6.2f}%)"]
    needles = [v for k, v in result.items() if k.startswith("needle-")]
    if needles:
        hits = sum(sum(n["correct"]) for n in needles)
        parts.append(f"needle {hits}/{sum(len(n['correct']) for n in needles)}")
    if "agreement" in result["long"]:
        a = result["long"]["agreement"]
        parts.append(f"agree {100 * a['match_rate']:5.1f}% first-diff "
                     f"{a['first_divergence']:6.1f}")
    parts.append(f"{result['seconds']:6.1f}s")
    return "  ".join(parts)


def save_json(path, settings, info, results, command):
    """Write the settings, the machine, the command and the results to ``path``."""
    write_json(path, {"settings": asdict(settings), "machine": info, "command": command,
                      "results": results})
