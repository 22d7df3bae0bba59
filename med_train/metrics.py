"""Caption metrics with pycocoevalcap's definitions, in pure Python (METEOR alone needs Java).

    from med_train.metrics import score_captions, cider_per_image, meteor_available
    preds, refs = {"img1": "A dog runs."}, {"img1": ["A dog is running.", "The dog runs"]}
    scores = score_captions(preds, refs)
    # {'Bleu_1': ..., 'Bleu_2': ..., 'Bleu_3': ..., 'Bleu_4': ..., 'METEOR': ..., 'ROUGE_L': ..., 'CIDEr': ...}
    ok, why = meteor_available()  # when not ok, METEOR is left out of `scores` and `why` says what is missing
    worst_first = sorted(preds, key=cider_per_image(preds, refs).get)

Raw captions go in. `ptb_tokenize` re-implements what pycocoevalcap gets from the Stanford CoreNLP 3.4.1
PTBTokenizer jar (`-preserveLines -lowerCase`, then its punctuation list removed), so no Java is needed. Scores are
on pycocoevalcap's scale (CIDEr 1.0 is the "100" of papers) and keep its quirks, so they compare with published
numbers: BLEU is corpus-level with the "closest" reference length (ties: the shorter); CIDEr is CIDEr-D with IDF
from the references being scored (a subset scores differently from the whole split); brackets survive as "-lrb-"
etc. (the punctuation list is upper-case, the tokens lower-case).

Tokeniser fidelity: equal to the jar on the test set and, while it was written, on about 100k fuzzed strings and
on every BMP character alone. Known gaps, all rare in captions: Java lexes all captions of a call as one text, so
a caption ending in an acronym ("... plan b.") depends on the next caption: we assume it starts like "A ..." (most
COCO captions do). Letters that Unicode added after the jar was built are letters here but dropped there. Line
breaks other than a newline (carriage return, U+2028, ...) are spaces here; in pycocoevalcap they shift every
later caption by a line.

METEOR runs pycocoevalcap's bundled meteor-1.5.jar, located with importlib (pycocoevalcap is never imported; it
is a 100 MB dev dependency). SPICE is left out: it downloads Stanford CoreNLP on first use and fails on Java >= 16,
and pycocoevalcap 1.2's wheel here does not even contain spice.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import regex

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)

# ---- PTB tokenisation ----------------------------------------------------------------------------------------------
# The Java lexer (JFlex) takes, at each position, the longest match over all its rules (trailing context counts
# toward the length), the earliest rule winning ties. We mirror that: the rules below are in priority order and
# are compiled with POSIX (leftmost-longest) semantics; a named group `t` marks the token when a rule has trailing
# context. The lexer is caseless for literal words but not for character classes: _ci() spells that out. Rules and
# word lists come from the lexer's source and behaviour, checked against the jar (see the module docstring).

PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                "...", ";"}  # pycocoevalcap's removal list, compared after lower-casing (so "-lrb-" stays)


def _ci(literals: str) -> str:
    """Caseless version of a pattern made of plain letters, '|', '(?:', ')', '?', '.', and [..] classes (kept).

    Spelled out as [aA] because the regex module lets a scoped (?i:...) leak into sibling negated classes."""
    out, i = [], 0
    while i < len(literals):
        if literals[i] == "[":  # a class stays case-sensitive, as in JFlex
            j = literals.index("]", i)
            out.append(literals[i:j + 1])
            i = j + 1
            continue
        c = literals[i]
        out.append(f"[{c.lower()}{c.upper()}]" if c.isalpha() else "\\." if c == "." else c)
        i += 1
    return "(?:" + "".join(out) + ")"


_SP = r"[ \t\u00a0\u2000-\u200a\u3000]"
_SPNL = r"(?:[ \t\u00a0\u2000-\u200a\u3000]|\r\n|[\r\n\u2028\u2029\x0b\x0c\x85])"
# Marks and signs the lexer counts as letters, on top of Java's letters (checked against the jar char by char).
_LETTER_EXTRA = (r"\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d"
                 r"\u0384\u0385\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525"
                 r"\u055a-\u055f\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f"
                 r"\u064b-\u065e\u0670\u06d6-\u06ef\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f"
                 r"\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903\u093c\u093e-\u094e\u0951-\u0955"
                 r"\u0962-\u0963\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3"
                 r"\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2"
                 r"\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48"
                 r"\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd")
_L = rf"[\p{{L}}{_LETTER_EXTRA}--[\U00010000-\U0010ffff]]"  # Java chars are UTF-16 units: BMP letters only
_PL = r"[\p{L}--[\U00010000-\U0010ffff]]"  # a plain letter: no soft hyphen or accent mark
_D = r"[\p{Nd}\u07c0-\u07c9--[\U00010000-\U0010ffff]]"
_AN = rf"(?:{_L}|{_D})"
_APOS = rf"(?:['\u0092\u2019]|{_ci('&apos;')})"
_APOSX = rf"(?:{_APOS}|[`\u0091\u2018\u201b])"  # apostrophes seen inside words, rightly or wrongly
_N, _T = _ci("n"), _ci("t")
_NUM = rf"(?:{_D}+|{_D}*(?:[.:,\u00ad\u066b\u066c]{_D}+)+)"
_WORD = rf"{_L}{_AN}*(?:[.!?]{_L}{_AN}*)*"
_REDAUX = rf"{_APOS}(?:[msdMSD]|{_ci('re|ve|ll')})"
_ACRO = rf"(?:[A-Za-z](?:\.[A-Za-z])*|{_ci('(?:canada|sino|korean|eu|japan|non)-u.s|u.s.-(?:u.k|u.s.s.r)')})"
# Abbreviations that can end a sentence ("etc." + " The" gives "etc." ".") and those that usually precede a name.
_ABBREV1 = _ci("(?:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri|ala|ariz|[A]z|[A]rk"
               "|calif|colo|conn|ct|dak|[D]el|fla|ga|[I]ll|ind|kans?|ky|[L]a|[M]ass|md|mich|minn|[M]iss|mo|mont"
               "|neb|nev|okla|[O]re|[P]a|penn|tenn|[T]ex|va|vt|[W]ash|wisc?|wyo|inc|cos?|corp|pp?t[y]s?|ltd|plc|rt"
               "|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq|jr|sr|bros|(?:ed|ph).d|blvd|rd|esq|bldg|etc"
               "|al|seq).")
_ABBREV4 = (_ci("(?:mrs?|ms|[M]iss|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl"
                "|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|ft|ph|adj|adv|asst|assoc|ens"
                "|insp|mlle|mme|msgr|sfc|vs|alex|wm|jos|cie|a.k.a|cf|treas|invt|elec|natl|m[f]g|m[t]g|dept)")
            + f"|{_ACRO}")
# Words that, after an acronym and a space, mark a sentence end (the lexer's list; first letter case-sensitive).
_SENT_START = "|".join(w[0] + _ci(w[1:]) for w in (
    "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More Mr. Ms."
    " Now Once One Other Our She Since So Some Such That The Then There These They This We When While What Yet"
    " You").split())
_SGML = (r"<(?:[!?][A-Za-z-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.-]*(?: +[A-Za-z][A-Za-z0-9_:.-]*"
         r"(?: *= *(?:'[^'\r\n]*'|\"[^\"\r\n]*\"))?)* */?|/[A-Za-z][A-Za-z0-9_:.-]*) *>")
_FILE_EXT = _ci("bat|bmp|c|class|cgi|cpp|dll|docx?|exe|gif|gz|h|html?|jar|java|jpe?g|mov|mp3|pdf|php|pl|png|ppt"
                "|ps|py|sql|tar|txt|wav|x|xml|zip")
_SMILEY = r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]"
_ASIAN_SMILEY = r"[\-^x=~<>']_[\-^x=~<>']|\([\-^x=~<>'][_.]?[\-^x=~<>']\)"
_MISC_SYMBOL = (r"[\u00a6-\u00a9\u00ac\u00ae-\u00ba\u00d7\u00f7\u0387\u05be\u05c0\u05c3\u05c6\u05f3\u05f4"
                r"\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d\u07f6-\u07f8"
                r"\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2032-\u2038\u203b\u203e-\u2042\u2044"
                r"\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u2bff\u3001\u3002\u3012\u30fb\uff01-\uff0f"
                r"\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")
_ALNUM = r"[\p{L}\p{Nd}--[\U00010000-\U0010ffff]]"
_THING_PIECE = rf"(?:[dDoOlL]{_APOSX}{_ALNUM})?{_ALNUM}+"
_THING = rf"{_THING_PIECE}(?:[-_\u058a\u2010\u2011]{_THING_PIECE})*"
_HTHING = r"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|[A-Za-z](?:\.[A-Za-z])+\.))+"
_AMP = _ci("&amp;")
_APOSTROPHE_WORDS = _ci("cont'd.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l")


def _quotes(tok: str, left: bool) -> str:
    """The lexer's LaTeX-style quote normalisation: ` `` for opening quotes, ' '' for closing ones."""
    tok = regex.sub(r"(?i)&apos;|'", "`" if left else "'", tok)
    tok = regex.sub(r'(?i)"|&quot;', "``" if left else "''", tok)
    for chars, out in (("\u0091\u2018\u201b\u2039", "`"), ("\u0092\u2019\u203a", "'"),
                       ("\u0093\u201c\u00ab", "``"), ("\u0094\u201d\u00bb", "''")):
        tok = regex.sub(f"[{chars}]", out, tok)
    return tok


def _brackets(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


def _no_soft_hyphen(tok: str) -> str:
    return tok.replace("\u00ad", "") or "-"  # a run of soft hyphens alone becomes a hyphen


def _amp(tok: str) -> str:
    return regex.sub(r"(?i)&amp;", "&", tok)


def _as(out: str) -> Callable[[str], str]:
    return lambda tok: out


_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}

# (pattern, action): None keeps the text, a function rewrites it, a string names a special case in _lex.
_RULES: list[tuple[str, object]] = [
    (_ci("cannot|gonna|gotta|lemme|gimme|wanna|'tis|'twas"), "assimilation"),  # "can not", "gon na", "'t is"
    (r"[cC]\+\+|[cCfF]#", None),
    (_SGML, lambda t: t.replace(" ", "\u00a0")),
    (_ci("&(?:md|mdash|ndash);") + r"|[\u0096\u0097\u2013\u2014\u2015]", _as("--")),
    (_AMP, _as("&")),
    (_ci("&(?:ht|tl|ur|lr|qc|ql|qr|odq|cdq);") + "|&#[0-9]+;", None),
    (rf"(?P<t>{_WORD}){_REDAUX}", _no_soft_hyphen),  # "dog" of "dog's"
    (rf"(?P<t>[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*){_N}{_APOSX}{_T}", _no_soft_hyphen),  # "do" of "don't"
    (_WORD, _no_soft_hyphen),
    (rf"{_APOS}{_N}{_APOS}?|[lLdDjJ]{_APOS}|{_ci('dunkin|somethin|ol')}{_APOS}|{_APOS}{_ci('em|till?|cause')}"
     rf"|[A-HJ-XZn]{_APOSX}{_PL}{{2,}}|{_APOS}[2-9]0{_ci('s')}|{_PL}+[aeiouyAEIOUY]{_APOSX}[aeiouA-Z]{_PL}*"
     rf"|{_APOSTROPHE_WORDS}|{_ci('o')}{_APOSX}{_ci('o')}", None),
    (rf"(?P<t>{_ci('y')}{_APOS}){_PL}", None),  # "y'" of "y'all"
    (_ci("https?") + r"://[^ \t\n\f\r\"<>|()]*[^ \t\n\f\r\"<>|.!?(){},-]", None),
    (rf"(?:{_ci('www')}\.(?:[^ \t\n\f\r\"<>|.!?(){{}},]+\.)+[a-zA-Z]{{2,4}}"
     rf"|(?:[^ \t\n\f\r\"`'<>|.!?(){{}},-_$]+\.)+{_ci('(?:com|net|org|edu)')})"  # ",-_" is a range, as in Java
     r"(?:/[^ \t\n\f\r\"<>|()]*[^ \t\n\f\r\"<>|.!?(){},-])?", None),
    (rf"(?:<|{_ci('&lt;')})?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0{{}}]*@(?:[^ \t\n\f\r\"<>|(){{}}.\u00a0]+\.)*"
     rf"[^ \t\n\f\r\"<>|(){{}}.\u00a0]+(?:>|{_ci('&gt;')})?", None),
    (rf"@[A-Za-z_][A-Za-z_0-9]*|#{_L}+", None),
    (rf"(?P<t>{_REDAUX})[^A-Za-z]", lambda t: _quotes(t, False)),
    (rf"{_N}{_APOSX}{_T}", lambda t: _quotes(t, False)),
    (rf"{_D}{{1,2}}[\-/]{_D}{{1,2}}[\-/]{_D}{{2,4}}", None),
    (rf"[-+]?{_NUM}", _no_soft_hyphen),
    (r"[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)", None),
    (rf"(?:{_D}{{1,4}}[- \u00a0])?{_D}{{1,4}}(?:\\?/|\u2044){_D}{{1,4}}", lambda t: t.replace(" ", "\u00a0")),
    (r"[\u00bc\u00bd\u00be\u2153-\u215e]", lambda t: _FRACTIONS.get(t, t)),
    (_ci("-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c.d.s|pro-|anti-") + rf"|{_ci('s')}(?:&|{_AMP}){_ci('(?:p-500|ls)')}"
     rf"|{_ci('cap')}{_APOS}{_ci('n')}|{_ci('c')}{_APOS}{_ci('est')}", _amp),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", None),
    (r"[A-Z]*\$|#", None),
    (r"[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
     lambda t: _CURRENCY.get(t, t)),
    (rf"(?P<t>{_ACRO}\.){_SPNL}+(?:{_SENT_START}|{_SGML}){_SPNL}", "acronym"),  # sentence end after an acronym
    (rf"(?P<t>{_ABBREV1}){_SPNL}(?:{_SPNL}|\p{{Lu}}|{_SGML})", "duplicate_period"),
    (rf"(?P<t>{_ABBREV1})(?s:..)", None),  # two characters of context: "etc.a" is "etc." + "a", "etc.ab" a word
    (_ABBREV1, None),
    (rf"(?:{_ABBREV4})\.", None),
    (rf"(?P<t>{_ci('(?:ca|figs?|prop|nos?|art|bldg|pp|op).')}){_SP}?{_D}", None),
    (rf"(?P<t>{_ABBREV4}){_SP}", None),
    (rf"(?P<t>{_APOS}[0-9][0-9]){_SPNL}", None),
    (rf"(?P<t>{_WORD}\.)[,;:]", _no_soft_hyphen),
    (rf"(?P<t>{_AN}+(?:\.{_AN}+)*\.{_FILE_EXT})(?:{_SPNL}|[.?!,])", None),
    (r"(?:\([0-9]{3}\)[ \u00a0]?|[0-9]{3}[\- \u00a0.])[0-9]{3}[\- \u00a0.][0-9]{4}",
     lambda t: _brackets(t.replace(" ", "\u00a0"))),
    (rf"(?P<t>\"|{_ci('&quot;')})[A-Za-z0-9$]", _as("``")),
    (rf"\"|{_ci('&quot;')}", _as("''")),
    (rf"(?P<t>{_SMILEY})[^A-Za-z0-9]|{_ASIAN_SMILEY}", _brackets),
    (r"[+%&\u2030\u2031~^|\\]|<<|>>", None),
    (r"\[", _as("-LSB-")), (r"\]", _as("-RSB-")), (r"\{", _as("-LCB-")), (r"\}", _as("-RCB-")),
    (r"\(", _as("-LRB-")), (r"\)", _as("-RRB-")), (f"<|{_ci('&lt;')}", _as("<")), (f">|{_ci('&gt;')}", _as(">")),
    (r"-+", lambda t: "--" if 3 <= len(t) <= 4 else t),
    (r"\.{3,5}|(?:\.[ \u00a0]){2,4}\.|[\u0085\u2026]", _as("...")),
    (r"@+|#+|_+|\*+|(?:\\\*){1,3}|[,;:]|[?!]+|[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa=/]", None),
    (rf"(?P<t>{_HTHING}\.)[,;:]", _no_soft_hyphen),
    (_HTHING, _no_soft_hyphen),
    (rf"(?P<t>{_THING}\.)[,;:]", None),
    (_THING, None),
    (rf"[A-Z]+(?:(?:[+&]|{_AMP})[A-Z]+)+", _amp),
    (r"(?P<t>')[A-Za-z][^ \t\n\r\u00a0]", lambda t: _quotes(t, True)),
    (rf"{_REDAUX}|{_APOS}|''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094\u201e\u201f\u2039\u203a\u00ab"
     r"\u00bb]{1,2}", lambda t: _quotes(t, False)),
    (_MISC_SYMBOL, None),
    (rf"\x00|{_SPNL}+|[\u200b\u200e\u200f\ufeff]|{_ci('&nbsp;')}", "skip"),
]
_COMPILED = [(regex.compile(p, regex.V1 | regex.POSIX), a) for p, a in _RULES]
_PLAIN_WORD = regex.compile(r"[A-Za-z]+(?=[ \t]|\Z)")
_ASSIMILATIONS = {"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"}
# What follows each caption while lexing: pycocoevalcap joins captions with newlines, and most start like this.
_NEXT_CAPTION = "\nA "


@lru_cache(maxsize=4096)
def _rules_starting_with(char: str) -> tuple:
    """The rules that can match a text starting with `char` (a partial match of it alone), so _lex tries fewer."""
    return tuple((p, a) for p, a in _COMPILED if p.match(char, partial=True))


def _lex(text: str) -> list[str]:
    """Tokens of the Java lexer for `text` (before lower-casing and punctuation removal)."""
    end, text = len(text), text + _NEXT_CAPTION
    tokens: list[str] = []
    pos = 0
    while pos < end:
        plain = _PLAIN_WORD.match(text, pos, end)  # fast path: a plain word before a space is always one token
        if plain and plain.group().lower() not in _ASSIMILATIONS:
            tokens.append(plain.group())
            pos = plain.end()
            continue
        best, best_len = None, 0
        for pattern, action in _rules_starting_with(text[pos]):
            m = pattern.match(text, pos)
            if m and m.end() - pos > best_len:
                best, best_len = (m, action), m.end() - pos
        if best is None:  # untokenizable character: the Java lexer drops it with a warning
            pos += 1
            continue
        m, action = best
        tok = m.groupdict().get("t") or m.group()  # without the trailing context
        if action == "skip":
            pos += len(tok)
        elif action == "assimilation":  # split after the first part; the rest is lexed again
            keep = len(tok) - (3 if tok.lower() in ("cannot", "'twas") else 2)
            tokens.append(tok[:keep])
            pos += keep
        elif action == "acronym":  # "I." at a sentence end is "I" + "."; "U.S." is "U.S." + "."
            tokens.append(tok[:-1] if len(tok) == 2 else tok)
            pos += len(tok) - 1
        elif action == "duplicate_period":  # abbreviation ending a sentence: "etc." then "."
            tokens.append(tok)
            pos += len(tok) - 1
        else:
            tokens.append(action(tok) if callable(action) else tok)
            pos += len(tok)
    return tokens


def ptb_tokenize(text: str) -> str:
    """Lower-cased PTB tokens of a caption joined by spaces, pycocoevalcap's punctuation list removed."""
    words = [t.lower() for t in _lex(text.replace("\n", " "))]
    return " ".join(w for w in words if w not in PUNCTUATIONS)


# ---- Scorers (inputs already tokenised: words separated by spaces) ----------------------------------------------


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu_corpus(predictions: Mapping[K, str], references: Mapping[K, Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as pycocoevalcap's Bleu: clipped n-gram counts summed over all images, one brevity
    penalty from the summed lengths, each image's reference length the one closest to its prediction."""
    small, tiny = 1e-9, 1e-15  # pycocoevalcap's guards against zero divisions (they shift scores by ~1e-15)
    pred_len = ref_len = 0
    guess, correct = [0] * n, [0] * n
    for key, prediction in predictions.items():
        words = prediction.split()
        max_ref_counts: Counter = Counter()
        for ref in references[key]:
            max_ref_counts |= _ngrams(ref.split(), n)  # | keeps the larger count of each n-gram
        pred_len += len(words)
        ref_len += min((abs(len(r.split()) - len(words)), len(r.split())) for r in references[key])[1]
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(max_ref_counts[gram], count)
    scores, product = [], 1.0
    for k in range(n):  # geometric mean of the first k+1 precisions
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (pred_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_per_image(predictions: Mapping[K, str], references: Mapping[K, Sequence[str]]) -> dict[K, float]:
    """ROUGE-L per image: F-measure (beta 1.2) of the best LCS precision and best LCS recall over references."""
    beta2 = 1.2 ** 2
    scores = {}
    for key, prediction in predictions.items():
        words = prediction.split(" ")  # split(" "), as pycocoevalcap: an empty caption is one empty word
        lcs = [(_lcs(ref.split(" "), words), len(ref.split(" "))) for ref in references[key]]
        precision = max(c / len(words) for c, _ in lcs)
        recall = max(c / n_ref for c, n_ref in lcs)
        scores[key] = ((1 + beta2) * precision * recall / (recall + beta2 * precision)
                       if precision and recall else 0.0)
    return scores


def cider_doc_freq(references: Iterable[Sequence[str]], n: int = 4) -> Counter:
    """CIDEr's document frequencies: for each n-gram (a tuple of words), the number of images (one reference list
    each, tokenised) whose references contain it."""
    return Counter(g for refs in references for g in set().union(*(_ngrams(r.split(), n) for r in refs)))


def cider_d_per_image(predictions: Mapping[K, str], references: Mapping[K, Sequence[str]], n: int = 4,
                      sigma: float = 6.0, *, doc_freq: Mapping[tuple, int] | None = None,
                      num_images: int | None = None) -> dict[K, float]:
    """CIDEr-D per image as pycocoevalcap's Cider: TF-IDF n-gram cosine clipped by the reference, a Gaussian
    penalty on the length difference, averaged over n-gram orders and references, times 10. The IDF counts the
    images (of those given) whose references contain the n-gram; or, given `doc_freq` (cider_doc_freq) and
    `num_images`, those of another corpus (SCST's reward: the training split's)."""
    ref_grams = {key: [_ngrams(r.split(), n) for r in references[key]] for key in predictions}
    if doc_freq is None:
        doc_freq = Counter(g for grams in ref_grams.values() for g in set().union(*grams))
        num_images = len(predictions)
    log_images = math.log(num_images)

    def vectors(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, doc_freq.get(gram, 0.0))))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)  # bigrams, as pycocoevalcap (same delta)
        return vec, norms, length

    scores = {}
    for key, prediction in predictions.items():
        vec, norms, length = vectors(_ngrams(prediction.split(), n))
        total = [0.0] * n
        for ref_counts in ref_grams[key]:
            ref_vec, ref_norms, ref_length = vectors(ref_counts)
            penalty = math.e ** (-((length - ref_length) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                sim = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, w in vec[k].items())
                if norms[k] != 0 and ref_norms[k] != 0:
                    sim /= norms[k] * ref_norms[k]
                total[k] += sim * penalty
        scores[key] = sum(total) / n / len(ref_grams[key]) * 10.0
    return scores


# ---- METEOR (Java) -------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def meteor_available() -> tuple[bool, str]:
    """(True, jar path) when METEOR can run here, else (False, what is missing)."""
    spec = importlib.util.find_spec("pycocoevalcap")  # locates the package without importing its modules
    if spec is None or not spec.submodule_search_locations:
        return False, 'pycocoevalcap is not installed (pip install "med_train[meteor]"); it bundles meteor-1.5.jar'
    folder = Path(next(iter(spec.submodule_search_locations))) / "meteor"
    for needed in (folder / "meteor-1.5.jar", folder / "data" / "paraphrase-en.gz"):
        if not needed.is_file():
            return False, f"{needed} is missing from the pycocoevalcap install"
    if shutil.which("java") is None:
        return False, "java is not on PATH (METEOR 1.5 needs a Java runtime)"
    return True, str(folder / "meteor-1.5.jar")


def meteor_corpus(predictions: Mapping[K, str], references: Mapping[K, Sequence[str]]) -> float:
    """Corpus METEOR 1.5 (English, normalised) from pycocoevalcap's jar, fed the way pycocoevalcap feeds it."""
    ok, jar = meteor_available()
    if not ok:
        raise RuntimeError(f"METEOR is unavailable: {jar}")
    command = ["java", "-jar", "-Xmx2G", jar, "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as errors:
        # cwd: the jar finds data/paraphrase-en.gz there. It writes nothing, so a read-only install is fine.
        proc = subprocess.Popen(command, cwd=Path(jar).parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=errors, start_new_session=True)
        assert proc.stdin is not None and proc.stdout is not None

        def ask(line: str, answers: int = 1) -> list[str]:
            try:
                proc.stdin.write(f"{line}\n".encode())
                proc.stdin.flush()
                out = [proc.stdout.readline().decode().strip() for _ in range(answers)]
            except OSError:  # the process is gone
                out = [""]
            if not all(out):
                errors.seek(0)
                asked = line if len(line) < 400 else f"{line[:100]} ... {line[-300:]}"  # the prediction is last
                try:
                    status = f"exit status {proc.wait(timeout=5)}"
                except subprocess.TimeoutExpired:
                    status = "still running"
                raise RuntimeError(f"METEOR ({jar}) stopped answering to {asked!r} ({status}): "
                                   f"{errors.read().decode()[-1000:]}")
            return out

        try:
            stats = []
            for key, prediction in predictions.items():  # pycocoevalcap cleans the prediction, not the references
                prediction = prediction.replace("|||", "").replace("  ", " ")
                stats += ask(" ||| ".join(("SCORE", " ||| ".join(references[key]), prediction)))
            *_, score = ask(" ||| ".join(["EVAL", *stats]), answers=len(stats) + 1)  # each image's, then all
        finally:
            proc.kill()  # it would wait for more input; everything needed has been read
            proc.wait()
            with contextlib.suppress(OSError):  # unsent input of a dead process
                proc.stdin.close()
            proc.stdout.close()
    return float(score)


# ---- Entry points: raw captions in ---------------------------------------------------------------------------------


def _tokenize_all(predictions: Mapping[K, str], references: Mapping[K, Sequence[str]],
                  ) -> tuple[dict[K, str], dict[K, list[str]]]:
    if not predictions:
        raise ValueError("no predictions to score")
    if predictions.keys() != references.keys():
        missing = [k for k in predictions if k not in references][:5]
        extra = [k for k in references if k not in predictions][:5]
        raise ValueError(f"predictions and references must have the same keys: without references {missing}, "
                         f"without prediction {extra}")
    empty = [k for k, refs in references.items() if isinstance(refs, str) or not refs][:5]
    if empty:
        raise ValueError(f"each key needs a non-empty list of reference captions, not so for {empty}")
    preds = {k: ptb_tokenize(p) for k, p in predictions.items()}
    return preds, {k: [ptb_tokenize(r) for r in references[k]] for k in predictions}


def score_captions(predictions: Mapping[K, str], references: Mapping[K, Sequence[str]], *,
                   meteor: bool = True) -> dict[str, float]:
    """COCO caption scores of raw captions, named as pycocoevalcap names them (METEOR only when it ran)."""
    preds, refs = _tokenize_all(predictions, references)
    scores = {f"Bleu_{k + 1}": s for k, s in enumerate(bleu_corpus(preds, refs))}
    if meteor:
        ok, why = meteor_available()
        if ok:
            scores["METEOR"] = meteor_corpus(preds, refs)
        else:
            log.warning("METEOR skipped: %s", why)
    scores["ROUGE_L"] = sum(rouge_l_per_image(preds, refs).values()) / len(preds)
    scores["CIDEr"] = sum(cider_d_per_image(preds, refs).values()) / len(preds)
    return scores


def cider_per_image(predictions: Mapping[K, str], references: Mapping[K, Sequence[str]]) -> dict[K, float]:
    """CIDEr-D of each image (raw captions in), with IDF from all the references given; e.g. to sort a gallery."""
    return cider_d_per_image(*_tokenize_all(predictions, references))
