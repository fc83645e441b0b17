"""'Did you mean ...?' for names typed by people: config keys, types, metric names."""

import difflib
from collections.abc import Iterable

LONGEST = 100  # a longer word is no typo: no suggestion (and no quadratic distance over megabytes)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance counting a swap of neighbours as one edit (typos like 'Adma')."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def suggest(word: str, options: Iterable) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when nothing is close."""
    options = [str(o) for o in options if len(str(o)) <= LONGEST]
    if len(word) > LONGEST:
        return ""
    close = difflib.get_close_matches(word, options, n=5, cutoff=0.6)
    close += [o for o in options if edit_distance(o.lower(), word.lower()) <= max(1, len(word) // 3)]
    if not close:
        return ""
    best = min(close, key=lambda o: (edit_distance(o.lower(), word.lower()), close.index(o)))
    return f" (did you mean '{best}'?)"
