"""Needle retrieval: a random pass key hidden at several depths of essay text, asked for at the
end in the model's chat template; exact match of the greedy answer.

All prompts of one haystack length form one batch (one dense prefill, forked per configuration);
the answer is generated greedily through the decode path.
"""
import random
import re

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? Answer with the number only."


def prompt(tokenizer, haystack_ids, depth, key, chat=True):
    """Token ids of ``haystack_ids`` (essay text) with the needle inserted at a sentence start
    near ``depth`` (0 = start, 1 = end), then the question; in the chat template where ``chat``
    (the demo's prompt too)."""
    haystack = tokenizer.decode(haystack_ids)
    cut = haystack.rfind(". ", 0, int(len(haystack) * depth))  # the sentence end before depth
    cut = cut + 2 if cut >= 0 else 0
    document = haystack[:cut] + NEEDLE.format(key=key) + haystack[cut:]
    return tokenizer.encode_prompt(f"{document}\n\n{QUESTION}", chat=chat)


def prompts(tokenizer, ids, length, depths, seed, offset=0):
    """One prompt per depth over ``length`` tokens of ``ids`` (from ``offset``), each with its own
    random 5-digit key -> (list of token-id lists, list of keys)."""
    rng = random.Random(seed * 1000003 + length)
    keys = [str(rng.randrange(10000, 100000)) for _ in depths]
    haystack = ids[offset: offset + length]
    return [prompt(tokenizer, haystack, d, k) for d, k in zip(depths, keys)], keys


def answer(text):
    """The first number in ``text``, or "" if there is none."""
    found = re.search(r"\d+", text)
    return found.group(0) if found else ""


def score(tokenizer, generated, keys):
    """generated: list of token-id lists (greedy answers) -> {"correct": [bool], "answers": [str],
    "accuracy"}."""
    answers = [answer(tokenizer.decode(g)) for g in generated]
    correct = [a == k for a, k in zip(answers, keys)]
    return {"correct": correct, "answers": answers, "accuracy": sum(correct) / len(correct)}
