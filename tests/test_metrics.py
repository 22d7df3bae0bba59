"""Tests for med_train.metrics against the references it imitates: pycocoevalcap's scorers and the Java PTB tokenizer.

    .venv/bin/python -m pytest -q tests/test_metrics.py

pycocoevalcap is a dev dependency: the differential tests skip without it, and those that run Java skip without
`java`. They call the tokenizer jar directly (pycocoevalcap's command line, but the text in a temp file of ours,
since PTBTokenizer.tokenize writes into its own package folder).
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from med_train import metrics
from med_train.metrics import (
    PUNCTUATIONS,
    bleu_corpus,
    cider_d_per_image,
    cider_per_image,
    meteor_available,
    meteor_corpus,
    ptb_tokenize,
    rouge_l_per_image,
    score_captions,
)

_SPEC = importlib.util.find_spec("pycocoevalcap")
COCO_DIR = Path(next(iter(_SPEC.submodule_search_locations))) if _SPEC else None
PTB_JAR = COCO_DIR / "tokenizer" / "stanford-corenlp-3.4.1.jar" if COCO_DIR else None
needs_coco = pytest.mark.skipif(COCO_DIR is None, reason="pycocoevalcap is not installed")
needs_java_ptb = pytest.mark.skipif(shutil.which("java") is None or PTB_JAR is None or not PTB_JAR.is_file(),
                                    reason="needs java and pycocoevalcap's stanford-corenlp-3.4.1.jar")


def java_ptb(captions: list[str], tmp_path: Path, next_caption: str | None = "A b") -> list[str]:
    """pycocoevalcap's PTBTokenizer on each caption: the same jar, command line and punctuation removal.

    pycocoevalcap joins all captions with newlines and Java lexes them as one text, so the end of a caption can
    depend on the next one. With `next_caption`, each caption is followed by that line (dropped afterwards): the
    context ptb_tokenize assumes. With None, captions are joined exactly as pycocoevalcap joins them."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS as COCO_PUNCTUATIONS

    lines = [c.replace("\n", " ") for c in captions]
    if next_caption is not None:
        lines = [line for c in lines for line in (c, next_caption)]
    path = tmp_path / "captions.txt"
    path.write_bytes("\n".join(lines).encode())
    out = subprocess.run(["java", "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                          "-lowerCase", str(path)], capture_output=True, check=True).stdout.decode().split("\n")
    if next_caption is not None:
        assert out[1:2 * len(captions):2] == [next_caption.lower()] * len(captions), "Java output misaligned"
        out = out[0:2 * len(captions):2]
    return [" ".join(w for w in line.rstrip().split(" ") if w not in COCO_PUNCTUATIONS) for line in out[:len(captions)]]


# Captions meant to cover the tokenizer's rules: contractions, possessives, hyphens, numbers, quotes, brackets,
# abbreviations, URLs, symbols and non-ASCII text (the fuzzed ones below add random mixtures).
CAPTIONS = [
    "A dog's bone, isn't it? \"Yes\" (maybe) [ok] {x}.", "A man riding a wave on top of a surfboard.",
    "Two dogs don't like the cat's toy.", "It's a dog's life. They're here; we'll go, I'd say. You've I'm",
    "Ain't won't can't shan't couldn't Don'ts y'all o'clock rock'n'roll", "cannot Cannot gonna wanna gotta lemme",
    "The dogs' bowls and James' hat", "It’s the dog’s ball, don’t touch ‘it’", "'Tis 'twas 'em 'cause '90s 80's",
    "A well-known 10-year-old in a t-shirt, x-ray, co-op, e-mail", "mother-in-law 3-D 2-3 people -5 +5 5-6 a_b",
    "word- -word a--b a---b ---- a - b a – b a—b", "3pm 3:00pm 10am 5kg 2x4 1st 2nd 3.5 1,000 .5 5. 12:30:45",
    "1/2 cup, 5 1/2 cups, ½ ⅓ ¼ ¾, 1/2/2010 and 12/25", "$5 US$5 £3 €4 ¥100 ¢5 5¢ 50% #1", "a/b/c and/or a*b a**b",
    "Mr. Smith and Dr. Who at St. Paul's. The U.S. flag.", "etc. e.g. i.e. a.m. p.m. vs. No. 5 fig. 3 Jan. Inc.",
    "It is I. The end", "plan b. Then the letter a. the dog", "the U.S. The dog. T.V. remote D.C. area",
    "A.B.C.D. U.S.A. Ph.D. non-U.S. a.k.a. Co.x. etc.a etc.ab", "A sign that says \"STOP\" and 'slow'.",
    "``latex'' quotes, ''double'', “curly”, ‘single’, „low“, «guillemets» ‹x›", "two dogs!!! what?! ok?? hmm.... wow..",
    "a...b a. . .b a . . . b … x....", "<b>bold</b> <br/> <a href=\"x\"> 3 < 4 > 2 << >> <x y=z>",
    "email a@b.com, me@x.com. http://x.com/a_b www.google.com/maps foo.net/bar photo.jpg 1.x", "#hashtag @user",
    "smiley :) :-( ;) :D :P <3 ^_^ (^_^) c++ c# -LRB- -lrb-", "a|b a\\b a~b a^b 5+3=8 a & b A&B AT&T S&P-500 a&amp;b",
    "Ça va? Über straße résumé naïve Ωmega Ελληνικά 日本語 한국어 中文", "café-bar l'hôtel d'Avignon O'Neil x̃",
    "© ® ™ ° ± × ÷ ♥ ★ ① → ∀ ² H₂O 🐶 😀 𝒜 Ⅷ", "tab\tseparated\t\twords  and   spaces ", "", "   ", "x",
    "soft\u00adhyphen \u00ad \u00ad\u00ad non\u00a0breaking zero\u200bwidth", "a man in a car a.", "y'all a.. ;(",
    "a man with a frisbee (in the park)", "The pizza is cut into 8 slices.", "GIRAFFES EATING LEAVES!",
]
PIECES = ("a the dog man woman cat is on in of with two red table street I It A The 's n't 're 'll ' ’ ‘ \" `` '' "
          "( ) [ ] { } < > . , ; : ! ? ... - -- _ / \\ | & # @ $ % * + = ~ ^ 0 5 12 3.5 1,000 10:30 1/2 ½ 2x4 1st "
          "'90s é ñ ß Ω 日本 😀 ° × © € £ ¢ Mr. Dr. St. U.S. a.m. etc. No. Inc. a. I. cannot gonna don't y'all "
          "o'clock t-shirt e-mail www.x.com a@b.com c++ :) :D ^_^ <b> – — … “ ” « » „ ´ \u00ad").split(" ")


def fuzzed_captions(n: int, seed: int) -> list[str]:
    """Random mixtures of PIECES, glued or spaced, some capitalised."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        pieces = [rng.choice(PIECES) for _ in range(rng.randint(1, 12))]
        pieces = [p.capitalize() if rng.random() < 0.2 else p for p in pieces]
        captions.append("".join(rng.choice(["", " ", " ", "  "]) + p for p in pieces).strip())
    return captions


@needs_java_ptb
def test_ptb_tokenize_equals_java_tokenizer(tmp_path):
    captions = CAPTIONS + fuzzed_captions(600, seed=0)
    expected = java_ptb(captions, tmp_path)
    mismatches = [(c, e, ptb_tokenize(c)) for c, e in zip(captions, expected, strict=True) if ptb_tokenize(c) != e]
    assert not mismatches, mismatches[:10]


@needs_java_ptb
def test_ptb_tokenize_twice_equals_java_twice(tmp_path):
    """The PTB tokenizer is not idempotent ("y'all" -> "y' all" -> "y all"); ours must fail the same way."""
    once = java_ptb(CAPTIONS, tmp_path)
    assert java_ptb(once, tmp_path) == [ptb_tokenize(ptb_tokenize(c)) for c in CAPTIONS]
    assert ptb_tokenize(ptb_tokenize("y'all")) != ptb_tokenize("y'all")  # so the test above can tell


_CAPTION_WORDS = st.from_regex(r"[A-Za-z0-9]{1,8}(-[A-Za-z0-9]{1,6})?('s|'re|'ll|'d|'m|'ve|n't)?[,;:!?.]?",
                               fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(_CAPTION_WORDS, max_size=12).map(" ".join))
def test_ptb_tokenize_is_idempotent_on_plain_caption_text(text):
    once = ptb_tokenize(text)
    assert ptb_tokenize(once) == once


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_ptb_tokenize_output_is_lower_case_words_without_punctuation(text):
    out = ptb_tokenize(text)
    assert out == out.lower()
    assert "\n" not in out
    if out:
        words = out.split(" ")
        assert all(words), f"empty word in {out!r}"
        assert not set(words) & PUNCTUATIONS, out  # exact match, as pycocoevalcap: "-lrb-" is not "-LRB-"


@needs_coco
def test_punctuation_list_is_pycocoevalcaps():
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS as COCO_PUNCTUATIONS

    assert PUNCTUATIONS == set(COCO_PUNCTUATIONS)
    assert ptb_tokenize("(A dog), [on] {grass}!") == "-lrb- a dog -rrb- -lsb- on -rsb- -lcb- grass -rcb-"


def random_scorer_sets() -> list[tuple[dict, dict]]:
    """Seeded tokenised prediction/reference sets, with the edge cases pycocoevalcap's quirks show up in."""
    rng = random.Random(1234)
    vocab = "a the dog man on of red white two is sitting table with in grass ball".split()
    sets = []
    for i in range(30):
        n_images = 1 if i % 10 == 0 else rng.randint(2, 25)  # a single image: CIDEr's IDF is then log(1) = 0
        preds, refs = {}, {}
        for k in range(n_images):
            key = k if i % 2 else f"img{k}"
            refs[key] = [" ".join(rng.choices(vocab, k=rng.randint(1, 15))) for _ in range(rng.randint(1, 6))]
            if rng.random() < 0.05:
                refs[key][0] = ""  # a reference made only of punctuation tokenises to ""
            kind = rng.random()
            if kind < 0.1 or i == 7:
                preds[key] = ""  # empty prediction (all of them in set 7)
            elif kind < 0.2:
                preds[key] = " ".join([rng.choice(vocab)] * rng.randint(2, 8))  # repeated word
            elif kind < 0.3:
                preds[key] = " ".join(rng.choices(vocab, k=rng.randint(16, 30)))  # longer than every reference
            elif kind < 0.4:
                preds[key] = rng.choice(refs[key])  # exact match
            else:
                preds[key] = " ".join(rng.choices(vocab, k=rng.randint(1, 14)))
        sets.append((preds, refs))
    return sets


def test_random_sets_reach_the_quirks():
    """The sets above must contain the cases where pycocoevalcap's choices show, or equality proves little."""
    sets = random_scorer_sets()
    brevity = [sum(len(p.split()) for p in preds.values())
               < sum(min((abs(len(r.split()) - len(p.split())), len(r.split())) for r in refs[k])[1]
                     for k, p in preds.items()) for preds, refs in sets]
    assert any(brevity) and not all(brevity)  # BLEU's brevity penalty applies in some sets only
    images = [(p, refs[k]) for preds, refs in sets for k, p in preds.items()]
    assert any(len(preds) == 1 for preds, _ in sets)
    assert any(p == "" for p, _ in images) and any("" in refs for _, refs in images)
    assert any(len(p.split()) > max(len(r.split()) for r in refs) for p, refs in images)
    assert any(len(set(p.split())) == 1 < len(p.split()) for p, _ in images)  # a repeated word
    # "closest" reference length ties: one reference shorter and one longer by the same amount
    assert any({len(p.split()) - d, len(p.split()) + d} <= {len(r.split()) for r in refs}
               for p, refs in images for d in range(1, 10))


@needs_coco
@pytest.mark.parametrize("index", range(30))
def test_scorers_equal_pycocoevalcap(index):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs = random_scorer_sets()[index]
    res = {k: [p] for k, p in preds.items()}
    expected_bleu, _ = Bleu(4).compute_score(refs, res, verbose=0)
    assert bleu_corpus(preds, refs) == pytest.approx(expected_bleu, abs=1e-9)
    expected_rouge, expected_rouge_each = Rouge().compute_score(refs, res)
    assert list(rouge_l_per_image(preds, refs).values()) == pytest.approx(list(expected_rouge_each), abs=1e-9)
    expected_cider, expected_cider_each = Cider().compute_score(refs, res)
    ours = cider_d_per_image(preds, refs)
    assert list(ours.values()) == pytest.approx(list(expected_cider_each), abs=1e-9)
    assert sum(ours.values()) / len(ours) == pytest.approx(expected_cider, abs=1e-9)


COCO_LIKE = {  # raw captions as in COCO: capitals, final periods, commas, possessives
    "1": ("A man riding a wave on top of a surfboard.", ["A man riding a wave on top of a surfboard.",
          "A surfer rides a large wave in the ocean", "A person on a surf board riding a wave."]),
    "2": ("a plate of food with broccoli and rice", ["A plate with rice, broccoli and chicken.",
          "Food on a white plate, including broccoli.", "A close up of a plate of food"]),
    "3": ("two giraffes standing next to each other", ["Two giraffes are standing in a field.",
          "A couple of giraffes that are standing in the grass.", "Giraffes eating leaves from a tree"]),
    "4": ("a dog's toy on the floor", ["The dog's toy is on the wooden floor.", "A chew toy lies on a floor."]),
    "5": ("", ["A kitchen with a stove and a refrigerator.", "An empty kitchen."]),
    "6": ("a cat sitting on a laptop keyboard", ["A cat sits on a laptop (it's warm).", "Cat on a keyboard"]),
}


@needs_coco
@needs_java_ptb
def test_score_captions_equals_pycocoevalcap_pipeline(tmp_path):
    """Raw captions through the real thing: Java tokenizer over all captions joined, then pycocoevalcap's scorers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds = {k: p for k, (p, _) in COCO_LIKE.items()}
    refs = {k: r for k, (_, r) in COCO_LIKE.items()}
    res = dict(zip(preds, ([c] for c in java_ptb(list(preds.values()), tmp_path, next_caption=None)), strict=True))
    flat = java_ptb([r for rs in refs.values() for r in rs], tmp_path, next_caption=None)
    gts, i = {}, 0
    for k, rs in refs.items():
        gts[k], i = flat[i:i + len(rs)], i + len(rs)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {**{f"Bleu_{n + 1}": b for n, b in enumerate(bleu)}, "ROUGE_L": Rouge().compute_score(gts, res)[0],
                "CIDEr": Cider().compute_score(gts, res)[0]}
    got = score_captions(preds, refs, meteor=False)
    assert list(got) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    assert got == pytest.approx(expected, abs=1e-9)
    assert got["CIDEr"] > 0.5 and got["Bleu_1"] > 0.5  # the data is not degenerate: the comparison means something


@needs_coco
def test_cider_per_image_is_pycocoevalcap_per_image_cider():
    from pycocoevalcap.cider.cider import Cider

    preds = {k: p for k, (p, _) in COCO_LIKE.items()}
    refs = {k: r for k, (_, r) in COCO_LIKE.items()}
    per_image = cider_per_image(preds, refs)
    tokenised_refs = {k: [ptb_tokenize(r) for r in rs] for k, rs in refs.items()}
    _, expected = Cider().compute_score(tokenised_refs, {k: [ptb_tokenize(p)] for k, p in preds.items()})
    assert list(per_image) == list(preds)
    assert list(per_image.values()) == pytest.approx(list(expected), abs=1e-9)
    assert min(per_image, key=per_image.get) == "5"  # the empty caption sorts first in a worst-first gallery


@pytest.mark.skipif(not meteor_available()[0], reason=f"METEOR unavailable: {meteor_available()[1]}")
def test_meteor_equals_pycocoevalcap_meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    preds = {k: p for k, (p, _) in COCO_LIKE.items()}
    refs = {k: r for k, (_, r) in COCO_LIKE.items()}
    scores = score_captions(preds, refs)
    assert list(scores) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    gts = {k: [ptb_tokenize(r) for r in rs] for k, rs in refs.items()}
    res = {k: [ptb_tokenize(p)] for k, p in preds.items()}
    expected, _ = Meteor().compute_score(gts, res)
    assert scores["METEOR"] == pytest.approx(expected, abs=1e-9)
    assert 0.1 < scores["METEOR"] < 1


def test_meteor_unavailable_is_reported_and_skipped(monkeypatch, caplog):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    metrics.meteor_available.cache_clear()
    try:
        ok, why = meteor_available()
        assert not ok and "pycocoevalcap" in why and 'pip install "med_train[meteor]"' in why
        scores = score_captions({"a": "a dog"}, {"a": ["a dog runs"]})
        assert "METEOR" not in scores and set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
        assert "METEOR skipped: pycocoevalcap is not installed" in caplog.text
        with pytest.raises(RuntimeError, match="unavailable"):
            meteor_corpus({"a": "a dog"}, {"a": ["a dog runs"]})
    finally:
        metrics.meteor_available.cache_clear()


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java")
def test_meteor_failure_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "meteor_available", lambda: (True, str(tmp_path / "missing.jar")))
    # names the jar, what it was asked and how it ended
    with pytest.raises(RuntimeError, match=r"missing\.jar\) stopped answering to "
                                           r"'SCORE \|\|\| a dog runs \|\|\| a dog' \(exit status 1\)"):
        meteor_corpus({"a": "a dog"}, {"a": ["a dog runs"]})


def test_perfect_captions_score_top_marks():
    refs = {1: ["a dog runs on the grass", "a dog is running"], 2: ["two cats sleep on a red sofa"]}
    scores = score_captions({1: "a dog runs on the grass", 2: "two cats sleep on a red sofa"}, refs, meteor=False)
    assert scores["Bleu_1"] == pytest.approx(1.0) and scores["Bleu_4"] == pytest.approx(1.0)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    worse = score_captions({1: "a cat", 2: "a dog on a sofa"}, refs, meteor=False)
    assert all(worse[name] < scores[name] for name in worse)


@pytest.mark.parametrize("predictions, references, message", [
    ({}, {}, "no predictions"),
    ({"a": "x"}, {"b": ["x"]}, "same keys"),
    ({"a": "x"}, {"a": []}, "non-empty list"),
    ({"a": "x"}, {"a": "x"}, "non-empty list"),  # a bare string would be scored letter by letter
])
def test_bad_inputs_are_rejected(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        score_captions(predictions, references, meteor=False)
