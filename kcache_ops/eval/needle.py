"""Needle retrieval: a random 5-digit key hidden at several depths of essay text in several
wordings (:data:`PHRASINGS`), asked for at the end in the model's chat template; exact match of
the first number of the greedy answer.

All prompts of one haystack length (every phrasing at every depth) form one batch (one dense
prefill, forked per configuration); the answer is generated greedily through the decode path.
"""
import random
import re

# name -> (the needle sentence with {key}, the question): the pass key of the original benchmark,
# and two wordings a new user might write (the question without the "number only" hint)
PHRASINGS = {
    "pass key": ("The pass key is {key}. Remember it. {key} is the pass key. ",
                 "What is the pass key? Answer with the number only."),
    "vault": ("The secret code for the vault is {key}. ",
              "What is the secret code for the vault?"),
    "magic number": ("Remember this number: {key}. It is the magic number. ",
                     "What was the magic number?"),
}


def prompt(tokenizer, haystack_ids, depth, key, chat=True, phrasing="pass key"):
    """Token ids of ``haystack_ids`` (essay text) with the needle sentence of ``phrasing`` (a
    name in :data:`PHRASINGS`) inserted at a sentence start near ``depth`` (0 = start, 1 = end),
    then its question; in the chat template where ``chat`` (the demo's prompt too)."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"needle: phrasing must be one of {', '.join(PHRASINGS)}, got "
                         f"{phrasing!r}")
    sentence, question = PHRASINGS[phrasing]
    haystack = tokenizer.decode(haystack_ids)
    cut = haystack.rfind(". ", 0, int(len(haystack) * depth))  # the sentence end before depth
    cut = cut + 2 if cut >= 0 else 0
    document = haystack[:cut] + sentence.format(key=key) + haystack[cut:]
    return tokenizer.encode_prompt(f"{document}\n\n{question}", chat=chat)


def prompts(tokenizer, ids, length, depths, seed, offset=0, phrasings=tuple(PHRASINGS)):
    """One prompt per phrasing and depth (phrasing-major) over ``length`` tokens of ``ids`` (from
    ``offset``), each with its own random 5-digit key -> (list of token-id lists, list of keys,
    list of phrasing names)."""
    rng = random.Random(seed * 1000003 + length)
    cases = [(p, d) for p in phrasings for d in depths]
    keys = [str(rng.randrange(10000, 100000)) for _ in cases]
    haystack = ids[offset: offset + length]
    return ([prompt(tokenizer, haystack, d, k, phrasing=p) for (p, d), k in zip(cases, keys)], keys,
            [p for p, _ in cases])


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
