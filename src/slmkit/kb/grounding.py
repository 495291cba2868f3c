"""Names a text gives that its sources do not: entity grounding for generated copy.

A fluent small model's commonest invention is a name: an origin ("a single origin Japanese roast" of an
Ethiopian coffee), a product line ("our Daily Essentials lineup"), a person, a shop, a hashtag. The catalogue's
fact check (catalogue.py) sees figures, prices, codes and features; it cannot see these, because they are words.
Checking that every named entity of an output appears in its source is the standard test for this kind of
hallucination (Nan et al. 2021, "Entity-level factual consistency of abstractive text summarization"). Here an
English name is found the way a reader finds one:

- a capitalised word inside a sentence (not its first word, not a title line, not an all-capitals shout), or
- any capitalised word that no English dictionary has (pyspellchecker's frequency list, 160k words, MIT:
  "Spremer's Kitchen", "Sterkie"), which catches invented names where a sentence starts with one, or
- a hashtag or @handle,

that the sources (the products' names and features, the catalogue, the brief, the brand) do not contain. A word
the sources use, in any case, is never a violation; nor are the words every e-mail capitalises (greetings,
sign-offs, days, months). What it cannot see is an invented quality in lower case ("notes of chocolate" for a
coffee whose facts say jasmine): that needs an entailment model, which there is none of here.
"""

from __future__ import annotations

import functools
import re

from slmkit.kb.catalogue import Violation

# Capitalised in e-mails whatever the facts say: greetings, sign-offs, the calendar.
ALWAYS = set("""i dear hi hello hey greetings regards best warm warmest kind cheers thanks thank sincerely yours
team p s ps subject re fwd monday tuesday wednesday thursday friday saturday sunday january february march april may
june july august september october november december today tomorrow ok""".split())
RARE = 50  # pyspellchecker frequency at or below which a word counts as unknown English ("sterne", "kenyan": 50)

_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*[A-Za-z]|[A-Za-z]")
_TAG = re.compile(r"(?<![\w&])[#@][A-Za-z][\w.]*\w|(?<![\w&])[#@][A-Za-z]")
_SENTENCE_END = re.compile(r"[.!?:;…]\s*$|^\s*$")
_OPENERS = re.compile(r"[\s\"'“”‘’()\[\]*•–—-]+$")  # what may stand between a sentence's end and its first word


@functools.cache
def _dictionary():
    try:
        from spellchecker import SpellChecker
    except ImportError as e:
        raise ImportError("the writer's name check needs pyspellchecker: pip install 'slmkit[kb]'") from e
    return SpellChecker(distance=1).word_frequency


def _base(word: str) -> str:
    """The word as the vocabulary holds it: lower case, without a possessive."""
    return re.sub(r"['’]s$", "", word.lower())


def _vocabulary(text: str) -> set[str]:
    words = {_base(w) for w in _WORD.findall(text)}
    return words | {w.rstrip("s") for w in words} | {p for w in words for p in w.split("-")}


_DEMONYM = ("n", "an", "ian", "ese", "ish", "i", "ean")  # Ethiopia -> Ethiopian, Kenya -> Kenyan


def _known(word: str, vocabulary: set[str]) -> bool:
    """Whether the sources have the word: as it is, singular, its hyphenated parts, or the place it is the
    adjective of ("Ethiopian" for an Ethiopia coffee)."""
    base = _base(word)
    if base in ALWAYS or base in vocabulary or base.rstrip("s") in vocabulary:
        return True
    if "-" in base and all(part in vocabulary or part in ALWAYS for part in base.split("-")):
        return True
    return any(base[:-len(end)] in vocabulary or base[:-len(end)] + "a" in vocabulary
               for end in _DEMONYM if len(base) > len(end) + 3 and base.endswith(end))


def _english(word: str) -> bool:
    """Whether an English dictionary has the word, in American or British spelling (flavour, organise, centre)."""
    base, frequency = _base(word), _dictionary()
    spellings = {base, base.replace("our", "or"), re.sub(r"is(e|ed|es|ing|ation)", r"iz\1", base),
                 re.sub(r"tre(s?)$", r"ter\1", base)}
    return any(frequency[s] > RARE for s in spellings)


def _is_title(line: str) -> bool:
    """A heading or subject line in Title Case: most of its words capitalised, and no full stop at its end (which
    a short sentence of names has: "An Ethiopian coffee.")."""
    words = _WORD.findall(line)
    return (len(words) >= 2 and sum(w[0].isupper() for w in words) >= 0.6 * len(words)
            and not line.rstrip().endswith("."))


def unsupported_names(text: str, sources: str, title_lines: int = 0) -> list[Violation]:
    """The names in `text` that `sources` does not contain: one Violation("name") per name (a run of
    capitalised words, from its first unsupported one: "Daily Essentials") and one Violation("hashtag") per tag.
    `title_lines`: how many of the first lines are titles whatever their case (an e-mail's subject line: 1)."""
    vocabulary = _vocabulary(sources) | {_base(w) for w in _WORD.findall(text) if w.islower()}  # used lowercase
    tags = {t.lower() for t in _TAG.findall(sources)}
    found = [Violation("hashtag", t, "a hashtag or handle the brief does not give")
             for t in dict.fromkeys(_TAG.findall(text)) if t.lower() not in tags]
    names: dict[str, None] = {}
    for n, line in enumerate(text.splitlines()):
        line = _TAG.sub(lambda m: " " * len(m.group(0)), line)
        title = n < title_lines or _is_title(line)
        runs: list[list[re.Match]] = []  # capitalised words next to each other
        for m in _WORD.finditer(line):
            if not m.group(0)[0].isupper():
                continue
            if runs and not line[runs[-1][-1].end():m.start()].strip():
                runs[-1].append(m)
            else:
                runs.append([m])
        for run in runs:
            first = _SENTENCE_END.search(_OPENERS.sub("", line[:run[0].start()])) is not None
            unsupported = [_unsupported(m.group(0), vocabulary, "title" if title else "first" if first and i == 0
                                        else "inside", line[m.end():]) for i, m in enumerate(run)]
            if any(unsupported):
                names[" ".join(m.group(0) for m in run[unsupported.index(True):])] = None
    return found + [Violation("name", name, "a name the facts and the brief do not give") for name in names]


def _unsupported(word: str, vocabulary: set[str], where: str, after: str) -> bool:
    """A capitalised word the sources do not have that reads as a name: capitalised inside a sentence (an
    all-capitals word there is a shout, not a name); in a title, or in capitals, one no English dictionary knows;
    first in its sentence, one no dictionary knows that is used as a name (a comma, a possessive or a dash after
    it: "Sterne, please...", "Spremer's Kitchen"; not "Baristas love it", a word the dictionary lacks)."""
    if _known(word, vocabulary):
        return False
    if where == "inside" and not word.isupper():
        return True
    if len(word) < 4 or _english(word):
        return False
    return (where != "first" or word.isupper() or re.search(r"['’]s$", word) is not None
            or re.match(r"\s*[,–—-]", after) is not None)
