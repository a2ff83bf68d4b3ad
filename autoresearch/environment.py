"""
The AUTORESEARCH_* environment switches, all read by one rule. DO NOT MODIFY
(fixed harness).

    AUTORESEARCH_CACHE       a folder, default ~/.cache/autoresearch (autoresearch/paths.py)
    AUTORESEARCH_SMOKE       yes or no, default no: the tiny smoke run (constants.py)
    AUTORESEARCH_FUSED       yes or no, default yes: the Triton kernels (autoresearch/kernels.py)
    AUTORESEARCH_ATTENTION   auto, fa4, fa3, flex or sdpa, default auto (autoresearch/attention.py)
    AUTORESEARCH_BASE_URL    where shards download from (autoresearch/download.py)
    AUTORESEARCH_BACKOFF     seconds before the first download retry, default 2 (the tests shrink it)
    AUTORESEARCH_SEED        a whole number, default 42: the run's seed (autoresearch/seeding.py)

The rule: unset, empty and blank are the same, the default. A yes-or-no takes
1/true/yes/on or 0/false/no/off, a choice takes one of its words, both in any
case and with spaces around; a number must parse. Anything else stops with one
line naming the variable, its value and what it takes: a typo must never pick a
mode silently. (spawn.sh's AUTORESEARCH_RUN and AUTORESEARCH_AGENT_CMD are the
launcher's, read in shell.)

Imported by constants.py and the package's modules; it imports nothing of the
project. Every AUTORESEARCH_* read in Python goes through here (a test checks).
"""

import math
import os

YES, NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _raw(name, env):
    return (os.environ if env is None else env).get(name, "")


def text(name, default, env=None):
    """The variable's value; the default when it is unset, empty or blank. env: a mapping
    to read instead of os.environ (the launcher reads the settings it passes on)."""
    value = _raw(name, env)
    return value if value.strip() else default


def switch(name, default, env=None):
    """A yes or a no: True for 1/true/yes/on, False for 0/false/no/off, the default when unset or empty."""
    value = _raw(name, env)
    word = value.strip().lower()
    if not word:
        return default
    if word not in YES + NO:
        raise SystemExit(f"error: {name}={value!r} is not a yes or a no: use {'/'.join(YES)}, "
                         f"or {'/'.join(NO)} (or leave it unset)")
    return word in YES


def choice(name, words, default, env=None):
    """One of words (any case), the default when unset or empty."""
    value = _raw(name, env)
    word = value.strip().lower() or default
    if word not in words:
        raise SystemExit(f"error: {name}={value!r}: use {', '.join(words)} (or leave it unset)")
    return word


def number(name, default, minimum=0.0, env=None):
    """A finite number >= minimum, the default when unset or empty."""
    value = _raw(name, env)
    if not value.strip():
        return default
    try:
        result = float(value)
    except ValueError:
        result = math.nan
    if not math.isfinite(result) or result < minimum:
        raise SystemExit(f"error: {name}={value!r} is not a number of at least {minimum:g} (or leave it unset)")
    return result
