"""Sentence source for the synthesised corpus.

No text corpus can be downloaded here, so sentences come from a small
probabilistic grammar over a hand-written English vocabulary. The grammar
yields millions of distinct sentences, so train, dev and test can be given
disjoint sentence sets of any practical size. Every sentence uses only the
characters of the LibriSpeech alphabet (upper-case A-Z, apostrophe, space).
"""

from __future__ import annotations

import random

__all__ = ["ALPHABET", "SentenceGenerator", "normalize_transcript"]

#: Characters that may appear in a LibriSpeech-style transcript.
ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")

_NAMES = (
    "mary john alice robert helen thomas margaret william susan george anna james "
    "clara henry lucy arthur edith walter grace frank martha albert rose charles "
    "emily samuel nora peter ruth daniel agnes hugh laura oliver kate simon jane "
    "philip ellen victor sarah isaac dora felix mabel jasper ivy rupert hazel"
).split()
_NOUNS = (
    "house garden river village forest window letter table doctor captain king "
    "queen soldier farmer teacher mother father brother sister child horse dog "
    "bird ship road bridge mountain valley city market church castle door "
    "kitchen candle book story picture clock bottle basket coat hat boat wagon "
    "storm morning evening winter summer island harbour meadow field stone wall "
    "tower lamp chair bench fire smoke cloud apple bread cheese money friend "
    "stranger neighbour servant lady gentleman merchant sailor judge priest "
    "wolf fox sheep cow orchard cottage palace garden gate ladder rope wheel "
    "engine train station newspaper pocket purse ring key box trunk blanket "
    "pillow mirror carpet piano violin song dinner supper breakfast journey "
    "voyage battle army camp tent hill lake shore wave sand shell rock cave"
).split()
_ADJECTIVES = (
    "old young little great small large dark bright quiet noisy happy sad "
    "strange gentle cold warm heavy light narrow wide tall short green red blue "
    "white black golden silver wooden empty crowded rich poor clever foolish "
    "brave proud kind cruel honest curious patient careful lonely famous "
    "ancient modern broken hidden distant sudden silent bitter sweet pale"
).split()
_VERBS_PAST = (
    "opened closed found lost carried watched followed painted visited left "
    "remembered forgot wanted needed bought sold mended cleaned built burned "
    "crossed climbed reached pushed pulled lifted dropped described admired "
    "feared loved hated noticed ignored praised answered called greeted "
    "helped thanked warned promised showed brought took gave sent kept held"
).split()
_VERBS_INTRANS = (
    "laughed smiled waited listened slept trembled sighed whispered shouted "
    "wandered hurried rested vanished returned arrived departed paused "
    "hesitated nodded wept sang danced prayed struggled"
).split()
_ADVERBS = (
    "quickly slowly quietly suddenly carefully gladly softly loudly again "
    "already certainly perhaps nearly almost rather often seldom always never "
    "gently bravely eagerly sadly calmly"
).split()
_PLACES = (
    "in the garden|near the river|at the station|on the hill|under the bridge|"
    "by the window|across the field|behind the church|inside the castle|"
    "beyond the forest|along the shore|at the market|on the ship|in the kitchen|"
    "at the edge of the village|upon the old road|beside the fire|in the city"
).split("|")
_TIMES = (
    "that morning|in the evening|at midnight|the next day|long ago|after dinner|"
    "before sunrise|during the storm|in the spring|last winter|at noon|"
    "every sunday|once upon a time|for many years|all night"
).split("|")
_NUMBERS = ("two three four five six seven eight nine ten eleven twelve twenty thirty forty fifty a hundred").split()
_SUBJECT_PRONOUNS = "he she they we i you".split()
_CONNECTIVES = "and but so because while although when until".split()
_SAID = "said asked replied cried answered whispered explained".split()
_THOUGHTS = (
    "it was late|the road was long|nobody would come|the door was locked|"
    "the work was done|the house was empty|the letter had arrived|"
    "the storm had passed|the king was dead|they had been deceived|"
    "she'd never return|he'd seen the ship|we couldn't wait any longer|"
    "it wasn't his fault|they'd lost their way"
).split("|")


def _np(rng: random.Random) -> str:
    """A noun phrase: determiner, optional adjective(s), noun."""
    det = rng.choice(["the", "the", "a", "his", "her", "their", "my", "that", "this"])
    noun = rng.choice(_NOUNS)
    if det == "a" and noun[0] in "aeiou":
        det = "an"
    roll = rng.random()
    if roll < 0.35:
        adj = rng.choice(_ADJECTIVES)
        if det == "a" and adj[0] in "aeiou":
            det = "an"
        if det == "an" and adj[0] not in "aeiou":
            det = "a"
        return f"{det} {adj} {noun}"
    if roll < 0.45:
        return f"{rng.choice(_NUMBERS)} {rng.choice(_ADJECTIVES)} {noun}s"
    return f"{det} {noun}"


def _subject(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(_NAMES)
    if roll < 0.55:
        return rng.choice(_SUBJECT_PRONOUNS)
    return _np(rng)


def _clause(rng: random.Random) -> str:
    roll = rng.random()
    subj = _subject(rng)
    if roll < 0.45:
        parts = [subj, rng.choice(_VERBS_PAST), _np(rng)]
    elif roll < 0.7:
        parts = [subj, rng.choice(_ADVERBS), rng.choice(_VERBS_INTRANS)]
    elif roll < 0.85:
        parts = [subj, rng.choice(_VERBS_PAST), rng.choice(_NAMES) + "'s", rng.choice(_NOUNS)]
    else:
        parts = [subj, rng.choice(["was", "seemed", "felt", "became"]), rng.choice(_ADJECTIVES)]
    if rng.random() < 0.5:
        parts.append(rng.choice(_PLACES))
    if rng.random() < 0.3:
        parts.append(rng.choice(_TIMES))
    return " ".join(parts)


def _sentence(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.45:
        text = _clause(rng)
    elif roll < 0.75:
        text = f"{_clause(rng)} {rng.choice(_CONNECTIVES)} {_clause(rng)}"
    elif roll < 0.9:
        text = f"{rng.choice(_THOUGHTS)} {rng.choice(_SAID)} {rng.choice(_NAMES)}"
    else:
        text = f"{rng.choice(_TIMES)} {_clause(rng)}"
    return normalize_transcript(text)


def normalize_transcript(text: str) -> str:
    """Upper-case and squeeze whitespace, the LibriSpeech transcript convention.

    Examples
    --------
    >>> normalize_transcript("  it wasn't  his fault ")
    "IT WASN'T HIS FAULT"
    """
    return " ".join(text.upper().split())


class SentenceGenerator:
    """Deterministic stream of distinct sentences.

    Parameters
    ----------
    seed : int
        Seed of the grammar's random choices; the same seed gives the same
        sentences in the same order on every machine.
    min_words, max_words : int
        Sentences outside this range are discarded, which bounds utterance
        length (about 0.35 s per word when spoken).

    Examples
    --------
    >>> gen = SentenceGenerator(seed=1)
    >>> batch = gen.take(5)
    >>> len(set(batch)) == 5 and all(set(s) <= ALPHABET for s in batch)
    True
    """

    def __init__(self, seed: int = 0, min_words: int = 4, max_words: int = 22) -> None:
        self._rng = random.Random(seed)
        self._seen: set[str] = set()
        self.min_words = min_words
        self.max_words = max_words

    def take(self, count: int) -> list[str]:
        """Return the next ``count`` sentences, none repeated across calls."""
        out: list[str] = []
        attempts = 0
        while len(out) < count:
            attempts += 1
            if attempts > 200 * count + 10_000:
                raise RuntimeError(f"grammar exhausted after {len(self._seen)} distinct sentences")
            sent = _sentence(self._rng)
            n_words = sent.count(" ") + 1
            if sent in self._seen or not (self.min_words <= n_words <= self.max_words):
                continue
            self._seen.add(sent)
            out.append(sent)
        return out
