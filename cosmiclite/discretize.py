"""Data discretization for humans: caption -> groups with token spans (CosmicMan, CVPR 2024, Sec. 4.2).

The paper splits every caption into a fixed set of groups that follow the body,

    C = {C_body, C_outfit},  C_body = c_(s_1, e_1),  C_outfit = {c_(s_2, e_2), ..., c_(s_N, e_N), c_other}

where (s_n, e_n) are the start and end indices of group n's concepts in the text encoder's token
sequence. HOLA (Eq. 3) then pulls the cross-attention maps m_j of exactly the tokens j in [s_n, e_n)
onto the group's mask h_n — so a span that is off by one token supervises the wrong word.

Two discretizers live here:

* `discretize(caption)` for captions composed from labels (`captions.compose`): every phrase already
  knows its group, so the spans are exact. They are computed almost for free: CLIP's BPE works on one
  pre-token (word or punctuation run) at a time and ", " always separates two pre-tokens, so a phrase's
  ids never depend on its neighbours. Each distinct phrase is tokenized once and cached; a caption's ids
  are its phrases' ids joined with the comma's id. (The equivalence is checked on a probe caption when a
  `Discretizer` is built, and by the tests on thousands of captions; captions whose phrases could merge
  with the comma take the exact character-offset path instead.)
* `discretize_text(text)` for free-form captions not built from labels: a lexicon keyed on the
  protocol's answer words and each group's nouns ("oxford shoes" -> shoes, "pleated skirt" -> bottoms,
  "wooden fence" -> other) finds the longest matches; adjectives that several groups share ("red",
  "leather") go with the noun they modify; token spans come from character offsets. It is quick because
  a text is cut at punctuation into clauses whose groups are cached, and the ids of
  each CLIP pre-token (word) are cached too.

Spans are half-open over the 77 `input_ids`, the start token counted (so the first word is index 1).
A caption longer than 77 tokens is truncated as every SD pipeline truncates it; groups cut by the
truncation are reported in `lost_groups` (with a `TruncationWarning`) and given no span — a partly cut
group is lost too, never given a shortened, silently wrong span.

But: the free-text lexicon is a heuristic. It knows the protocol's vocabulary and about 150 common
nouns (GROUP_NOUNS), not English; a group named in two places of a free text gives two entries, and a
phrase with no noun it knows (a lone colour) gets no group.
"""
from __future__ import annotations

import bisect
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

from .captions import END, SEP, Caption
from .protocol import Protocol, load_protocol
from .tokenizer import clip_tokenizer


class TruncationWarning(UserWarning):
    """A caption did not fit the tokenizer's 77 tokens; some groups lost their span."""


@dataclass(frozen=True)
class GroupSpan:
    """One group c_(s,e): its name, its phrases and its half-open token span over `input_ids`."""
    name: str
    phrases: tuple[str, ...]
    span: tuple[int, int]

    def to_dict(self) -> dict:
        return {"name": self.name, "phrases": list(self.phrases), "span": list(self.span)}


@dataclass(frozen=True)
class Discretized:
    """A caption's 77 token ids and its groups with spans (Sec. 4.2); `lost_groups` were truncated away."""
    caption: str
    input_ids: tuple[int, ...]
    groups: tuple[GroupSpan, ...]
    lost_groups: tuple[str, ...] = ()
    n_tokens: int = 0  # length before truncation, start and end tokens included

    def span(self, name: str) -> tuple[int, int] | None:
        """The span of group `name` (its first entry if it appears twice), None if absent or lost."""
        return next((g.span for g in self.groups if g.name == name), None)

    def spans(self, names: Sequence[str]) -> list[tuple[int, int]]:
        """One (s, e) per name, (-1, -1) where the group is absent: the layout `data.collate` batches."""
        return [self.span(n) or (-1, -1) for n in names]

    def to_dict(self) -> dict:
        """The JSON contract of `cosmiclite caption --json` / `cosmiclite discretize --json`."""
        return {"caption": self.caption, "input_ids": list(self.input_ids),
                "groups": [g.to_dict() for g in self.groups], "lost_groups": list(self.lost_groups),
                "n_tokens": self.n_tokens}


# --- the free-text lexicon ------------------------------------------------------------------------------
_WORD = re.compile(r"[^\W_]+")       # letter/digit runs: their edges are always CLIP token edges
_CLAUSE = r"[,.;:!?]"                # punctuation that ends a noun phrase
_TOKEN = re.compile(rf"([^\W_]+)|({_CLAUSE})")
# CLIP's pre-tokenizer (transformers' CLIPTokenizer) for plain ASCII text, where \p{L} is [a-z] and \p{N} [0-9]
_ASCII_PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", re.IGNORECASE)
_STOP = frozenset("a an the and or with without wearing wears wear in on of at to by near from for next "
                  "behind under over against beside is are has have her his their its this that who while".split())

# Nouns a free caption uses for a group beyond the protocol's own answer words (which are added from
# protocol.yaml automatically). Heads name a thing; adjectives shared by groups attach to them.
GROUP_NOUNS: dict[str, tuple[str, ...]] = {
    "body": ("woman", "women", "man", "men", "person", "people", "girl", "boy", "lady", "gentleman", "guy",
             "kid", "teenager", "model", "body", "figure", "shot", "full-body",
             "half-body", "upper-body", "young", "old", "skin"),
    "other": ("background", "backdrop", "fence", "wall", "street", "road", "tree", "trees", "park",
              "beach", "sky", "building", "grass", "room", "studio", "floor", "city", "garden", "field",
              "sea", "water", "forest", "door", "window", "bench", "car", "scenery", "sidewalk", "shop"),
    "hair": ("hair", "hairstyle", "haircut", "bangs", "fringe", "braid", "braids", "ponytail", "bun"),
    "face": ("face", "expression", "smile", "eyes", "lips", "mouth", "beard", "mustache", "makeup"),
    "eyewear": ("glasses", "sunglasses", "eyeglasses", "spectacles", "eyewear", "goggles"),
    "hat": ("hat", "cap", "helmet", "beanie", "beret", "fedora", "headwear"),
    "tops": ("top", "shirt", "t-shirt", "tee", "blouse", "sweater", "jumper", "cardigan", "hoodie",
             "jacket", "coat", "blazer", "vest", "sleeve", "sleeves", "collar", "neckline", "polo",
             "sweatshirt", "tank", "turtleneck"),
    "dress": ("dress", "gown", "frock", "sundress"),
    "bottoms": ("pants", "trousers", "jeans", "shorts", "skirt", "leggings", "bottoms", "slacks", "chinos"),
    "belt": ("belt", "waistband"),
    "legs": ("legs", "leg", "socks", "tights", "stockings", "knees", "thighs"),
    "shoes": ("shoes", "shoe", "sneakers", "boots", "heels", "sandals", "loafers", "trainers", "footwear",
              "slippers", "pumps", "flats"),
    "arms": ("arms", "arm", "hands", "hand", "gloves", "wrist", "watch", "bracelet", "tattoo", "fingers"),
    "bag": ("bag", "backpack", "handbag", "purse", "tote", "clutch", "satchel", "briefcase"),
    "scarf": ("scarf", "shawl", "stole"),
}


def _words(s: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(s.lower()))


@dataclass(frozen=True)
class _Entry:
    head: bool                 # a thing (shirt, woman, fence) rather than an attribute of one (red)
    groups: tuple[str, ...]    # the groups it may belong to (several for shared adjectives)


class Lexicon:
    """Word sequences -> caption group, built from the protocol (answers, phrases, groups) + GROUP_NOUNS.

    An answer of an "object" question (shoes_type: "oxford shoes") or any entry ending in a noun is a
    head; texture/shape answers ("red", "pleated", "above-chest") are attributes, which may be shared by
    several groups ("red": hair, tops, shoes, ...).
    """

    def __init__(self, protocol: Protocol | None = None, nouns: dict[str, Iterable[str]] | None = None):
        protocol = protocol or load_protocol()
        nouns = GROUP_NOUNS if nouns is None else nouns
        head_words = {w for ws in nouns.values() for w in ws}
        raw: dict[tuple[str, ...], tuple[bool, set[str]]] = {}

        def add(text: str, group: str, head: bool):
            key = _words(text)
            if not key or key in {("yes",), ("no",)}:
                return
            head = head or "-".join(key) in head_words or key[-1] in head_words
            old_head, groups = raw.get(key, (False, set()))
            raw[key] = (old_head or head, groups | {group})

        for g in protocol.groups:
            for word in nouns.get(g.name, ()):
                add(word, g.name, True)
        for q in protocol.questions:
            for a in q.answers:
                words = q.phrase(a)
                if not words:  # "nothing", "no bangs": an absence the caption does not mention
                    continue
                add(a, q.group, q.kind == "object")
                add(words, q.group, q.kind == "object")
        for g in protocol.groups:  # the fixed words of the group's templates: "hair", "skin", "belt" ...
            for t in g.phrases:
                for w in _words(re.sub(r"\{[^}]*\}", " ", t)):
                    if w not in _STOP and w not in ("shape", "holding"):
                        add(w, g.name, True)
        self.entries = {k: _Entry(h, tuple(sorted(gs))) for k, (h, gs) in raw.items()}
        # plurals of known nouns ("trees", "sneaker" -> "sneakers") looked up as the noun itself
        for k, e in list(self.entries.items()):
            if e.head:
                self.entries.setdefault(k[:-1] + (k[-1] + "s",), e)
        # the longest entry starting with each word bounds the longest-match search
        self.longest: dict[str, int] = {}
        for k in self.entries:
            self.longest[k[0]] = max(self.longest.get(k[0], 0), len(k))
        self._clauses: dict[tuple[str, ...], tuple[str | None, ...]] = {}  # clause words -> their groups

    def lookup(self, words: Sequence[str]) -> _Entry | None:
        """The entry for a word sequence, e.g. ("oxford", "shoes") -> head of group shoes."""
        return self.entries.get(tuple(w.lower() for w in words))

    def segments(self, text: str) -> list[tuple[str, int, int]]:
        """(group, start char, end char) of each run of words about one group, in text order."""
        words, starts, ends = [], [], []
        clauses = [0]  # index of the first word of each clause (punctuation starts a new one)
        for m in _TOKEN.finditer(text):
            w = m.group(1)
            if w is None:
                if clauses[-1] != len(words):
                    clauses.append(len(words))
                continue
            words.append(w.lower())
            starts.append(m.start())
            ends.append(m.end())
        clauses.append(len(words))
        group: list[str | None] = []
        cache = self._clauses
        for a, b in zip(clauses, clauses[1:]):
            key = tuple(words[a:b])
            g = cache.get(key)
            if g is None:
                if len(cache) > 200_000:  # bounded memory on endless distinct text
                    cache.clear()
                g = cache[key] = self.clause_groups(key)
            group += g
        # runs of one group (unassigned words inside a run belong to it), across clauses
        out: list[tuple[str, int, int]] = []
        for i, g in enumerate(group):
            if g is None:
                continue
            if out and out[-1][0] == g:
                out[-1] = (g, out[-1][1], ends[i])
            else:
                out.append((g, starts[i], ends[i]))
        return out

    def clause_groups(self, words: Sequence[str]) -> tuple[str | None, ...]:
        """The group of each word of one clause (lower-case words between two punctuation marks).

        Everything here stays inside the clause, so `segments` caches it per distinct clause.
        """
        n = len(words)
        # 1. longest match first
        matches: list[tuple[int, int, _Entry]] = []
        entries, longest = self.entries, self.longest
        i = 0
        while i < n:
            k = min(longest.get(words[i], 0), n - i)
            while k:
                e = entries.get(tuple(words[i:i + k]))
                if e is not None:
                    matches.append((i, i + k, e))
                    break
                k -= 1
            i += k or 1
        # 2. a head names its group; an attribute goes with the head it stands before ("red ... hair",
        #    reached over other attributes, "and"/"or" and unknown words, not over "a", "with", "by"),
        #    else its only group, else the previous head of the clause ("hair, red")
        match_at: list[_Entry | None] = [None] * n
        for a, b, e in matches:
            for k in range(a, b):
                match_at[k] = e
        nxt: list[str | None] = [None] * n
        following = None
        for i in range(n - 1, -1, -1):
            e = match_at[i]
            if e is None and words[i] in _STOP and words[i] not in ("and", "or"):
                following = None
            nxt[i] = following
            if e is not None and e.head:
                following = e.groups[0]
        group: list[str | None] = [None] * n
        previous = None
        for a, b, e in matches:
            if e.head:
                g = e.groups[0] if len(e.groups) == 1 else (previous if previous in e.groups else
                                                            nxt[a] if nxt[a] in e.groups else e.groups[0])
                previous = g
            else:
                g = nxt[a] or (e.groups[0] if len(e.groups) == 1 else previous)
            for k in range(a, b):
                group[k] = g
        # 3. up to two unknown words right before an assigned word join it ("wooden fence")
        for i in range(n - 1, 0, -1):
            if group[i] is not None and group[i - 1] is None:
                for k in (i - 1, i - 2):
                    if k < 0 or group[k] is not None or words[k] in _STOP or words[k] in longest:
                        break
                    group[k] = group[i]
        return tuple(group)


# --- the discretizer ---------------------------------------------------------------------------------------
class Discretizer:
    """Discretizes captions under one tokenizer, caching each phrase's token ids (Sec. 4.2).

    Build one per tokenizer (the module functions keep one per tokenizer for you). Works with any
    CLIP tokenizer: the built-in one, SDXL's pair, or a checkpoint's own loaded with `load_tokenizer`.
    """

    def __init__(self, tokenizer=None, protocol: Protocol | None = None):
        if tokenizer is None:
            tokenizer = clip_tokenizer()
        self.tokenizer = tokenizer
        self.max_length = min(int(tokenizer.model_max_length), 10_000)
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self._ids: dict[str, list[int]] = {}        # phrase -> ids (composed captions)
        self._word_ids: dict[str, list[int]] = {}   # CLIP pre-token -> ids (free text)
        (self.comma,), (self.dot,) = self._phrase_ids([SEP.strip(), END])
        self.lexicon = Lexicon(protocol)
        self.word_by_word = self._probe()

    # ids of single phrases, each tokenized once
    def _phrase_ids(self, phrases: Sequence[str]) -> list[list[int]]:
        missing = [p for p in dict.fromkeys(phrases) if p not in self._ids]
        if missing:
            enc = self.tokenizer(missing, add_special_tokens=False)["input_ids"]
            self._ids.update(zip(missing, enc))
        return [self._ids[p] for p in phrases]

    def _probe(self) -> bool:
        """Whether joining cached phrase (and pre-token) ids reproduces this tokenizer's own ids.

        True for CLIP's BPE; a tokenizer for which it fails is still right, only slower (offsets path).
        """
        text = "A full-body shot, an adult female, red wavy hair, t-shirt, 3 oxford shoes."
        own = self.tokenizer(text)["input_ids"]
        parts = text[:-1].split(SEP)
        ids = [self.bos]
        for i, p in enumerate(self._phrase_ids([p.lower() for p in parts])):
            ids += ([self.comma] if i else []) + p
        if own != ids + [self.dot, self.eos]:
            return False
        self.word_by_word = True  # now try the pre-token cache on a harder text
        text = "She's wearing 1980s-style (RED) jeans!!, can't  stop; A-line_skirt ok?"
        return self._encode_words([text])[0][0] == self.tokenizer(text)["input_ids"]

    @staticmethod
    def _cacheable(caption: Caption) -> bool:
        """The phrases are joined as `compose` joins them and none can merge with the comma or full stop."""
        ps = caption.phrases
        return (bool(ps) and all(p.text.isascii() and p.text[0].isalnum() and p.text[-1].isalnum() for p in ps)
                and caption.text == SEP.join(p.text for p in ps) + END)

    def _finish(self, text: str, ids: list[int], runs: list[tuple[str, list[str], int, int]]) -> Discretized:
        """Truncate to max_length, pad, turn group runs into GroupSpans and report the lost ones.

        `runs` hold (group, phrases, s, e) with token positions counted before truncation. A run is kept
        only if all of it survives truncation (e <= max_length - 1: the end token takes the last place).
        """
        n_tokens = len(ids)
        if n_tokens > self.max_length:
            ids = ids[:self.max_length - 1] + [self.eos]
        ids = ids + [self.pad] * (self.max_length - len(ids))
        keep, lost = [], []
        for name, phrases, s, e in runs:
            if e <= self.max_length - 1:
                keep.append(GroupSpan(name, tuple(phrases), (s, e)))
            elif name not in lost:
                lost.append(name)
        if lost:
            warnings.warn(f"caption is {n_tokens} tokens, over the tokenizer's {self.max_length}: groups "
                          f"{lost} were cut by truncation and get no span (shorten the caption, e.g. "
                          f"compose(..., drop=[...])): {text[:60]!r}...", TruncationWarning, stacklevel=3)
        return Discretized(text, tuple(ids), tuple(keep), tuple(lost), n_tokens)

    # composed captions -------------------------------------------------------------------------------
    def discretize_batch(self, captions: Sequence[Caption]) -> list[Discretized]:
        """Exact spans for composed captions; phrase ids are cached, so each phrase is tokenized once."""
        for c in captions:
            if not isinstance(c, Caption):
                raise TypeError(f"discretize expects a Caption from captions.compose, got {type(c).__name__}; "
                                "use discretize_text for free-form text")
        fast = [self.word_by_word and self._cacheable(c) for c in captions]
        self._phrase_ids([p.text.lower() for c, f in zip(captions, fast) if f for p in c.phrases])
        slow = [c for c, f in zip(captions, fast) if not f]
        slow_out = iter(self.discretize_by_offsets(slow))
        out = []
        cache, comma = self._ids, self.comma
        for c, f in zip(captions, fast):
            if not f:
                out.append(next(slow_out))
                continue
            ids = [self.bos]
            runs: list[tuple[str, list[str], int, int]] = []
            for p in c.phrases:
                if len(ids) > 1:
                    ids.append(comma)
                s = len(ids)
                ids += cache[p.text.lower()]
                if runs and runs[-1][0] == p.group:
                    runs[-1][1].append(p.text)
                    runs[-1] = (p.group, runs[-1][1], runs[-1][2], len(ids))
                else:
                    runs.append((p.group, [p.text], s, len(ids)))
            ids += [self.dot, self.eos]
            out.append(self._finish(c.text, ids, runs))
        return out

    def discretize_by_offsets(self, captions: Sequence[Caption]) -> list[Discretized]:
        """The slow, obviously right way: tokenize each whole caption and map phrases by char offsets.

        `discretize_batch` gives the same result from its phrase cache (the tests check it does); this
        is the path it falls back to for captions its cache cannot take.
        """
        return self._by_offsets([c.text for c in captions], [self._phrase_chars(c) for c in captions])

    @staticmethod
    def _phrase_chars(caption: Caption) -> list[tuple[str, list[str], int, int]]:
        runs: list[tuple[str, list[str], int, int]] = []
        for p in caption.phrases:
            if runs and runs[-1][0] == p.group:
                runs[-1] = (p.group, runs[-1][1] + [p.text], runs[-1][2], p.end)
            else:
                runs.append((p.group, [p.text], p.start, p.end))
        return runs

    def _by_offsets(self, texts: Sequence[str], char_runs: Sequence[list[tuple[str, list[str], int, int]]],
                    word_cache: bool = False) -> list[Discretized]:
        """Token spans from character offsets (untruncated, so lost groups are known).

        The offsets come from the tokenizer itself, or with `word_cache` from the pre-token cache, whose
        offsets are those of whole pre-tokens: enough for spans whose edges are pre-token edges.
        """
        if not texts:
            return []
        out = []
        encoded = self._encode_words(texts) if word_cache else self._encode_with_offsets(texts)
        for text, runs, (ids, offs) in zip(texts, char_runs, encoded):
            starts = [o[0] for o in offs[1:-1]]  # real tokens only, the start/end tokens dropped
            ends = [o[1] for o in offs[1:-1]]
            tok_runs = []
            for name, phrases, a, b in runs:
                s = 1 + bisect.bisect_left(starts, a)       # first token starting at or after a
                e = 1 + bisect.bisect_right(ends, b)        # one past the last token ending by b
                if e > s:
                    tok_runs.append((name, phrases, s, e))
            out.append(self._finish(text, list(ids), tok_runs))
        return out

    def _encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Untruncated ids and character offsets, start and end tokens included."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer itself: faster, and no over-length warning
            # transformers sets truncation/padding on the backend before each call and leaves them set;
            # it sets them again on its next call, so clearing them here is safe
            if backend.truncation is not None:
                backend.no_truncation()
            if backend.padding is not None:
                backend.no_padding()
            return [(e.ids, e.offsets) for e in backend.encode_batch(list(texts))]
        enc = self.tokenizer(list(texts), return_offsets_mapping=True, truncation=False, padding=False)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))

    def _encode_words(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Like `_encode_with_offsets`, from a cache of each CLIP pre-token's ids (the trick of
        `discretize_batch`, one level down: BPE never looks across pre-tokens). Only plain printable
        ASCII text takes this path, where Python's regex splits exactly as CLIP's; the rest goes to the
        tokenizer."""
        plain = [self.word_by_word and t.isascii() and t.isprintable() and "<|" not in t for t in texts]
        pieces = [[(m.group().lower(), m.start(), m.end()) for m in _ASCII_PRETOKEN.finditer(t)] if ok else None
                  for t, ok in zip(texts, plain)]
        cache = self._word_ids
        missing = list(dict.fromkeys(w for ps in pieces if ps for w, _, _ in ps if w not in cache))
        if missing:
            cache.update(zip(missing, self.tokenizer(missing, add_special_tokens=False)["input_ids"]))
        rest = iter(self._encode_with_offsets([t for t, ok in zip(texts, plain) if not ok]))
        out = []
        for ps in pieces:
            if ps is None:
                out.append(next(rest))
                continue
            ids, offs = [self.bos], [(0, 0)]
            for w, a, b in ps:
                wid = cache[w]
                ids += wid
                offs += [(a, b)] * len(wid)
            out.append((ids + [self.eos], offs + [(0, 0)]))
        return out

    # free text ---------------------------------------------------------------------------------------
    def discretize_text_batch(self, texts: Sequence[str]) -> list[Discretized]:
        """Groups of free-form captions by the lexicon, spans by character offsets."""
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"discretize_text expects a string, got {type(t).__name__}")
        runs = []
        for t in texts:
            segs = self.lexicon.segments(t)
            runs.append([(g, _split_phrases(t[a:b]), a, b) for g, a, b in segs])
        return self._by_offsets(texts, runs, word_cache=True)


def _split_phrases(segment: str) -> list[str]:
    """A free-text group's words, split at the commas/semicolons inside it."""
    if "," not in segment and ";" not in segment:
        return [segment]
    return [p for p in re.split(r"\s*[,;]\s*", segment) if p]


def discretizer(tokenizer=None) -> Discretizer:
    """The shared Discretizer of a tokenizer (the built-in CLIP tokenizer when None), built once."""
    if tokenizer is None:
        tokenizer = clip_tokenizer()
    return _shared(tokenizer)


@lru_cache(maxsize=8)
def _shared(tokenizer) -> Discretizer:
    return Discretizer(tokenizer)


def discretize(caption: Caption, tokenizer=None) -> Discretized:
    """Sec. 4.2 for a composed caption: its 77 token ids and each group's exact span (s, e)."""
    return discretizer(tokenizer).discretize_batch([caption])[0]


def discretize_batch(captions: Sequence[Caption], tokenizer=None) -> list[Discretized]:
    return discretizer(tokenizer).discretize_batch(captions)


def discretize_text(text: str, tokenizer=None) -> Discretized:
    """Sec. 4.2 for a free-form caption: groups found by the protocol lexicon, spans from offsets."""
    return discretizer(tokenizer).discretize_text_batch([text])[0]


def discretize_text_batch(texts: Sequence[str], tokenizer=None) -> list[Discretized]:
    return discretizer(tokenizer).discretize_text_batch(texts)
