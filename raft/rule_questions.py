"""Training questions from the documents alone: no LLM writes them.

The embedded 135M teacher got no generated question accepted, and a user who brings documents
without a QA file got no training set. So Docent writes questions itself, the way unsupervised
QA does (Lewis et al. 2019, "Unsupervised Question Answering by Cloze Translation"):

1. **Answer spans** Docent can find on its own: dates, times, codes, e-mail addresses, amounts
   and durations with units, percentages, versions, shortcuts, named things, defined terms
   (``called X``), the subject of a sentence, and the cells of a table row.
2. **A question per span**: wh-movement on the clause that holds it ("Invitation links are
   valid for 72 hours" -> "How many hours are invitation links valid for?"), with do-support
   for a main verb ("The desk opens at 08:30" -> "At what time does the desk open?"); where no
   verb is found, the cloze form keeps the sentence and puts the wh-phrase in the span's place
   (Lewis et al.'s "identity" translation). Subjects give "What opens at 08:30 on weekdays?";
   table rows give "In Checklist, what is the owner of 'Verify the email domain'?".
3. **Another sentence's words** (Fabbri et al. 2020): where a sentence in another chunk states
   the same answer about the same thing, the question is written from that sentence and the
   evidence stays in the oracle, so the model must do more than string matching.

Every question is verified afterwards by raft.build: it must not contain its answer, must ask
for the answer's kind, must lead retrieval back to its chunk, and must not near-duplicate
another; rejections are counted by reason.

Libraries: pysbd splits sentences (rule-based, offline), lemminflect gives verb lemmas and
inflections from its bundled lexicon. No offline part-of-speech tagger installs from PyPI or
Debian (spaCy, NLTK and stanza fetch their models from hubs), so verb and subject detection is
hand-written here on top of lemminflect's lexicon.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from docent.prompts import normalise, squash

VERSION = "7"  # bump when the rules change: cached rule questions are keyed by it
MAX_ANSWER_WORDS = 10
MAX_QUESTION_WORDS = 32
_AUX = {
    "is", "are", "was", "were", "can", "cannot", "must", "will", "may", "should", "could",
    "would", "might", "has", "have", "had", "does", "do", "did", "need",
}
# Auxiliaries that pair with a verb (can/must...) move alone; "is/are" may be the main verb.
_NOT_SUBJECT = {
    "it", "they", "this", "that", "these", "those", "you", "we", "he", "she", "there", "here",
    "which", "who", "what", "each", "one", "i",
}
_PRONOUNS = {"we", "you", "they", "i", "he", "she", "it"}
_SUBORDINATE = re.compile(
    r"^(if|when|while|after|before|once|until|unless|because|although|though|since|as|for|"
    r"to|in|on|at|by|from|with|without|during|under|over|after|within|for|note|see|also|"
    r"however|otherwise|then|and|or|but|so)\b",
    re.I,
)
_DETERMINERS = {
    "the", "a", "an", "this", "these", "those", "each", "every", "all", "your", "our", "its",
    "their", "any", "some", "new", "most", "many", "no", "other", "both", "either", "only",
}
_PERSONS = re.compile(
    r"\b(team|manager|officer|admin|administrator|owner|lead|agent|engineer|staff|person|"
    r"people|customer|user|partner|reseller|member|controller|processor)s?\b",
    re.I,
)
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_DURATION = r"seconds?|minutes?|hours?|days?|working days|business days|weeks?|months?|years?"
_COUNTABLE = (
    r"seats?|users?|requests?|members?|pages?|files?|characters?|attempts?|devices?|notes?|"
    r"workspaces?|guests?|licen[cs]es?|credits?|shelves|items?|people|times|calls?|versions?|"
    r"copies|backups?|keys?|tokens?|retries|webhooks?|invitations?|sessions?|steps?|levels?|"
    r"projects?|admins?|accounts?|documents?|records?|entries|messages?|emails?|results?|"
    r"templates?|integrations?|GB|MB|TB|KB|GHz|MHz|W|kW|V|GbE|ms|px|km|cores?|CPUs?|"
    r"percent|points?"
)
_CURRENCY = r"EUR|USD|GBP|€|\$|£"
_SEGMENT = (r"[A-Z][\w'’-]*(?: (?!(?:and|or|then|to|for|in|on|at|from|under|with|by|if|"
            r"when|is|are|can|will|must)\b)[\w'’-]+){0,2}")


@dataclass(frozen=True)
class Pattern:
    kind: str
    regex: re.Pattern[str]


PATTERNS: tuple[Pattern, ...] = (
    Pattern("date", re.compile(
        rf"\b\d{{1,2}} (?:{_MONTHS}) \d{{4}}\b|\b(?:{_MONTHS}) \d{{1,2}}, \d{{4}}\b|"
        rf"\b\d{{4}}-\d{{2}}-\d{{2}}\b|\b(?:{_MONTHS}) \d{{4}}\b")),
    Pattern("time", re.compile(
        r"\b\d{1,2}:\d{2}(?:\s?(?:am|pm|AM|PM))?(?:\s?[–-]\s?\d{1,2}:\d{2})?"
        r"(?: (?:[A-Z][a-z]+ time|UTC|CET|CEST|GMT))?")),
    Pattern("email", re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.]+\w\b")),
    Pattern("code", re.compile(r"(?<![\w-])[A-Z]{2,}(?:-[A-Z]+)*-\d{2,}(?:-\d+)*(?![\w-])")),
    # Technical names documentation is full of: `code`, files, hosts, headers, snake_case keys.
    Pattern("identifier", re.compile(
        r"`(?P<a>[^`\s][^`]{0,40})`|"
        r"\b[\w-]+\.(?:log|json|csv|txt|yaml|yml|xml|zip|exe|dmg|msi|conf|cfg|ini|sh|py)\b|"
        r"\b(?:https?://)?[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:app|com|org|net|io|dev|cloud)"
        r"(?:/[\w/.-]*\w)?\b|"
        r"\bX-[A-Za-z]+(?:-[A-Za-z]+)+\b|"
        r"\b[a-z][a-z0-9]*_[a-z0-9_]*")),
    Pattern("shortcut", re.compile(
        r"\b(?:Ctrl|Cmd|Alt|Shift|Option|⌘)(?:\s?\+\s?(?:Ctrl|Cmd|Alt|Shift|Option|Enter|Tab|"
        r"Space|Esc|F\d{1,2}|[A-Z0-9/.,;\[\]\\]))+")),
    # Where a setting lives: "Settings > Workspace > Support access". A segment is a
    # capitalised word and up to two more, never a joining word ("Vault and choose ...").
    Pattern("path", re.compile(
        rf"\b(?!(?:Under|In|On|From|At|Via|Open|Go|Choose|Select|Click)\b)"
        rf"{_SEGMENT}(?: > {_SEGMENT})+(?![\w>-])")),
    Pattern("version", re.compile(
        r"\b(?:[Vv]ersion |v)\d+(?:\.\d+)+\b|(?<![\d.])\b\d+\.\d+\.\d+\b(?!\.\d)")),
    Pattern("money", re.compile(
        rf"(?:(?:{_CURRENCY})\s?\d[\d,]*(?:\.\d+)?|\b\d[\d,]*(?:\.\d+)?\s?(?:{_CURRENCY}))"
        r"(?: (?:per|a|each) \w+(?: per \w+)?)?")),
    Pattern("percent", re.compile(r"\b\d+(?:\.\d+)?\s?(?:%|percent)")),
    Pattern("duration", re.compile(
        rf"\b(?:\d[\d,]*(?:\.\d+)?|one|two|three|four|five|six|seven|ten|twelve|thirty)"
        rf"(?:[\s-](?:{_DURATION}))\b")),
    Pattern("count", re.compile(
        rf"\b\d[\d,]*(?:\.\d+)?\s?(?:{_COUNTABLE})\b(?: per \w+)?")),
    Pattern("number", re.compile(
        r"\b(?:up to|at most|at least|maximum of|minimum of|limit of|than) "
        r"(?P<a>\d[\d,]*)(?![\w.:/-]|\.\d)")),
    Pattern("defined", re.compile(
        r"\b(?:called|named|titled|labelled|labeled) [\"'“‘]?"
        r"(?P<a>[A-Z][\w-]*(?: [A-Z][\w-]*){0,3})")),
    Pattern("name", re.compile(
        r"(?<=[a-z,;:] )[A-Z][\w.&-]*(?: (?:[A-Z][\w.&-]*|\d[\d.]*|(?:of|and|for)\b)){0,4}"
        r"(?<![ ,.])(?![\w&-])(?! [a-z]+ [A-Z])(?! [A-Z])")),
)
_UNIT_OF = re.compile(r"([A-Za-z%€$£]+(?: days)?)(?: per \w+)?$")

# What a question must contain to ask for an answer of each kind.
ASKS_FOR = {
    "date": re.compile(r"\b(when|date|day|which year|what year|which month)\b", re.I),
    "time": re.compile(r"\b(when|what time|hours|time)\b", re.I),
    "email": re.compile(r"\b(e-?mail|address|contact)\b", re.I),
    "code": re.compile(r"\b(code|which|what|identifier|number)\b", re.I),
    "identifier": re.compile(r"\b(which|what|name)\b", re.I),
    "shortcut": re.compile(r"\b(shortcut|keys?|which|what)\b", re.I),
    "path": re.compile(r"^where\b", re.I),
    "definition": re.compile(r"^what (is|are)\b", re.I),
    "version": re.compile(r"\b(version|release|which|what)\b", re.I),
    "money": re.compile(r"\bhow much\b|\b(price|cost|fee)\b", re.I),
    "percent": re.compile(r"\b(percentage|percent|how much|what share)\b", re.I),
    "duration": re.compile(r"\bhow (many|long|soon|often)\b", re.I),
    "count": re.compile(r"\bhow (many|much)\b", re.I),
    "number": re.compile(r"\bhow (many|much)\b|\bwhat number\b", re.I),
    "defined": re.compile(r"\b(what|which|name|called)\b", re.I),
    "name": re.compile(r"\b(who|which|what|name)\b", re.I),
    "subject": re.compile(r"^(what|who|which)\b", re.I),
    "object": re.compile(r"^what\b", re.I),
    "cell": re.compile(r"\b(what|which|who|when)\b", re.I),
}


@dataclass(frozen=True)
class RuleQuestion:
    question: str
    answer: str  # verbatim span of the sentence
    sentence: str  # the verbatim evidence sentence (whitespace-squashed) of the oracle chunk
    kind: str
    form: str  # "wh" (wh-movement), "cloze", "subject", "table" or "cross" (another sentence)


@functools.lru_cache(maxsize=1)
def _segmenter():  # type: ignore[no-untyped-def]
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def _verb_lemma(word: str, previous: str = "") -> tuple[str, str] | None:
    """(lemma, tense) when ``word`` is a finite verb: "VBZ" (opens), "VBD" (opened), or "VBP"
    (open) right after a plural noun, where the word can only be a verb ("Owners receive").
    None for anything else."""
    from lemminflect import getAllLemmas, getInflection

    lower = word.lower()
    every = getAllLemmas(lower)
    lemmas = every.get("VERB")
    if not lemmas:
        return None
    lemma = lemmas[0]
    if previous.lower() in _DETERMINERS:
        return None  # "the links", "an encrypted cache": never a finite verb after a determiner
    if "NOUN" in every and (previous[:1].isdigit()
                            or previous.lower() in ("per", "of", "with", "for", "to")):
        return None  # "12 seats", "per seat": a noun after a number or preposition
    if lower == lemma:
        plural = previous.lower().endswith("s") and not previous.lower().endswith("ss")
        return (lemma, "VBP") if plural and set(every) == {"VERB"} else None
    if lower in getInflection(lemma, tag="VBZ"):
        return lemma, "VBZ"
    if lower in getInflection(lemma, tag="VBD") and set(every) == {"VERB"}:
        return lemma, "VBD"
    return None


_RELATIVE = re.compile(r"\b(when|where|that|which|who|whom|whose|if|because|while|and|or)\b",
                       re.I)
_ADVERBS = {"also", "only", "always", "never", "automatically", "usually", "then", "still",
            "now", "currently", "immediately", "often", "just", "typically", "normally"}
_DO = {"VBZ": "does", "VBD": "did", "VBP": "do"}
_SINGULAR = {"are": "is", "were": "was", "have": "has", "do": "does"}
_BULLET = re.compile(r"^(?:[-*•]|\d+[.)])\s+")


def _named(phrase: str) -> bool:
    """A short phrase that names something: a capitalised word after the first, a number or
    a code ("Sync Doctor", "The Quillfeather Vault QV-200", "Ctrl+Shift+C")."""
    words = phrase.split()
    if not words or all(w.lower() in _DETERMINERS for w in words):
        # Capitalised at a sentence start, "The" names nothing (and lemminflect's lexicon
        # does not know it, so _common cannot tell).
        return False
    return len(words) <= 5 and (
        any(w[:1].isupper() for w in words[1:]) or any(ch.isdigit() for ch in phrase)
        or (len(words) == 1 and words[0][:1].isupper() and not _common(words[0]))
    )


def _bare_verb(word: str) -> bool:
    """A verb's base form ("browse", "reply"), whatever else the word may be."""
    from lemminflect import getAllLemmas

    lower = word.lower()
    return lower in getAllLemmas(lower).get("VERB", ())


def _imperative(first: str) -> bool:
    """A sentence that starts with a bare verb ("Browse the gallery", "Link to a page")."""
    return _bare_verb(first)


def _common(word: str) -> bool:
    """A word the lexicon knows in lower case (so capitalised only to start a sentence)."""
    from lemminflect import getAllLemmas

    return bool(getAllLemmas(word.lower()))


def _ambiguous(word: str) -> bool:
    from lemminflect import getAllLemmas

    return "NOUN" in getAllLemmas(word)


def _later_verb(words: Sequence[str]) -> bool:
    """An auxiliary or an unambiguous finite verb follows (before any comma)."""
    for j, word in enumerate(words):
        lower = word.lower().strip(",.")
        if lower in _AUX:
            return True
        if _verb_lemma(lower, words[j - 1] if j else "") and not _ambiguous(lower):
            return True
        if word.endswith(","):
            return False
    return False


def split_sentences(text: str) -> list[str]:
    """Sentences, table rows and list items of a chunk, each whitespace-squashed. Soft line
    breaks (PDF text wraps mid-sentence) are joined first; headings and table rows stay lines."""
    lines = [ln.strip() for ln in text.splitlines()]
    blocks: list[str] = []
    for line in lines:
        if not line:
            blocks.append("")
            continue
        structural = line.startswith(("#", "|", "-", "*", "•")) or "|" in line or bool(
            re.match(r"^\d+[.)] ", line)
        )
        previous = blocks[-1] if blocks else ""
        if (previous and not structural and not previous.startswith(("#", "|"))
                and "|" not in previous
                # a wrapped line continues; a short one without a full stop is a heading
                and (line[0].islower() or (len(previous) >= 50
                                           and not previous.endswith((".", "!", "?", ":"))))):
            blocks[-1] = f"{blocks[-1]} {line}"
        else:
            blocks.append(line)
    out: list[str] = []
    for block in blocks:
        if not block:
            continue
        if block.startswith("#") or "|" in block:
            out.append(squash(block))
            continue
        block = _BULLET.sub("", block)
        out.extend(squash(s) for s in _segmenter().segment(block) if s.strip())
    return out


def _wh_phrase(kind: str, answer: str, before: str) -> str:
    prep = before.split()[-1].lower() if before.split() else ""
    if kind == "date":
        return "when" if prep in ("on", "in", "since", "until", "from", "before", "after") \
            else "what date"
    if kind == "time":
        return "what time" if prep in ("at", "from", "until", "by") else "what time"
    if kind == "email":
        return "what e-mail address"
    if kind == "code":
        return "which code"
    if kind == "shortcut":
        return "which shortcut"
    if kind == "version":
        return "which version"
    if kind == "money":
        return "how much"
    if kind == "percent":
        return "what percentage"
    if kind in ("duration", "count"):
        unit = _UNIT_OF.search(answer.replace(",", ""))
        word = unit.group(1) if unit else ""
        if not word or word.lower() in ("percent", "times"):
            return "how many times" if word.lower() == "times" else "how many"
        return f"how many {_plural(word)}"
    if kind == "number":
        return "how many"
    if kind == "name" and _PERSONS.search(before[-30:]) is None and prep == "by":
        return "who"
    return "what"


def _plural(unit: str) -> str:
    """ "one month" is asked as "how many months"; units like "GB" stay as they are."""
    if not unit.islower() or " " in unit or unit.endswith("s"):
        return unit
    from lemminflect import getInflection

    plural = getInflection(unit, tag="NNS")
    return plural[0] if plural else unit


def _lower_first(phrase: str) -> str:
    words = phrase.split()
    if words and words[0].lower() in _DETERMINERS and not (len(words[0]) > 1
                                                           and words[0].isupper()):
        words[0] = words[0].lower()
    elif (words and not words[0].isupper() and _common(words[0])
          and not (len(words) > 1 and words[1][:1].isupper())):
        words[0] = words[0].lower()  # "Invitation links", not "Sync Doctor"
    return " ".join(words)


@dataclass(frozen=True)
class _Verb:
    start: int  # where the subject ends (adverbs such as "also" may sit before the verb)
    at: int  # the verb's index
    word: str  # the verb, lowercased
    main: tuple[str, str] | None  # (lemma, tense) for a main verb, None for an auxiliary

    def parts(self, words: Sequence[str]) -> tuple[str, str, str]:
        """(subject, adverbs, rest after the verb)"""
        return (" ".join(words[:self.start]), " ".join(words[self.start:self.at]),
                " ".join(words[self.at + 1:]))


def _finite_verb(words: Sequence[str]) -> _Verb | None:
    """The first finite verb after a plausible subject; None when the words before it do not
    look like a subject (a clause, a pronoun, a comma, more than eight words)."""
    for i, word in enumerate(words[:10]):
        if i == 0:
            continue
        lower = word.lower().strip(",.")
        verb = None if lower in _AUX else _verb_lemma(word.strip(",."), words[i - 1])
        if lower not in _AUX and verb is None:
            continue
        if verb is not None and _ambiguous(lower) and _later_verb(words[i + 1:10]):
            continue  # "Invitation links ... are": "links" is the noun here
        start = i
        while start > 1 and words[start - 1].lower() in _ADVERBS:  # "also restores"
            start -= 1
        subject = " ".join(words[:start])
        if ("," in subject or "(" in subject or i > 8 or subject.lower() in _NOT_SUBJECT
                or _RELATIVE.search(subject) or _SUBORDINATE.match(subject)
                or any(w.lower() in _AUX or w.lower() in ("be", "been", "not") for w in
                       words[:start])
                or ":" in subject or subject.count("**") % 2
                or (start > 1 and words[0].lower() in _PRONOUNS)):
            # "We answer requests": a pronoun is the whole subject, so "requests" is no verb
            return None
        return _Verb(start, i, lower, verb)
    return None


def _tail(after: str) -> str:
    """The rest of the span's clause: up to a comma, a bracket, a relative clause or a second
    verb phrase joined by 'and' / 'but'."""
    for mark in (", ", "; ", " (", ": ", " - ", " – "):
        at = after.find(mark)
        if at >= 0:
            after = after[:at]
    cut = re.search(r" (?:which|who|that|so that|because|unless|if|but|when|while|once|until|"
                    r"where)\b", after)
    if cut:
        after = after[:cut.start()]
    joined = re.search(r" (?:and|or) (\w+)", after)
    if joined and (joined.group(1).lower() in _AUX or _verb_lemma(joined.group(1), "x") or
                   _verb_lemma(joined.group(1), "xs")):
        after = after[:joined.start()]
    return after.strip().rstrip(".!?:;,")


def _wh_move(before: str, after: str, wh: str) -> str | None:
    """Move the wh-phrase to the front: an auxiliary inverts with its subject; a main verb
    (``opens``) gets do-support (``does ... open``). None where no subject and verb are found.
    """
    words = before.split()
    if len(words) < 2 or _SUBORDINATE.match(before):
        return None
    found = _finite_verb(words)
    if found is None:
        return None
    subject, adverbs, rest = found.parts(words)
    inner = list(_RELATIVE.finditer(rest))
    if inner:  # the span sits in a subordinate clause: move within that clause
        return _wh_move(rest[inner[-1].end():].strip(), after, wh)
    if found.main is None:
        return _join(wh, found.word, _lower_first(subject), adverbs, rest, after)
    lemma, tense = found.main
    return _join(wh, _DO[tense], _lower_first(subject), adverbs, lemma, rest, after)


def _join(*parts: str) -> str:
    text = " ".join(p for p in parts if p)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    return text[0].upper() + text[1:] + "?"


def _cloze(before: str, after: str, wh: str) -> str | None:
    """Lewis et al.'s identity form: the clause with the wh-phrase in the span's place."""
    words = before.split()
    if len(words) < 3 or _SUBORDINATE.match(before):
        return None
    if not _has_verb([*words, *after.split()]):
        return None  # "Head of Channel Sales at what?": a noun phrase, not a clause
    return _join(before, wh, after)


def _has_verb(words: Sequence[str]) -> bool:
    """Whether the words hold a verb: an instruction's first word ("Read the header"), an
    auxiliary, a finite verb, or a bare verb after a pronoun or a plural ("we reply",
    "workspaces keep")."""
    if len(words) > 1 and _imperative(words[0]) and words[1].lower() != "of":
        return True  # "Head of Channel Sales" is a title, not an instruction
    for i, word in enumerate(words):
        lower = word.lower().strip(",.;:")
        previous = words[i - 1].lower() if i else ""
        plural = previous.endswith("s") and not previous.endswith("ss")
        if lower in _AUX or _verb_lemma(lower, previous) or (
                (previous in _PRONOUNS or plural)
                and _bare_verb(lower)):
            return True
    return False


def _subject_question(sentence: str) -> RuleQuestion | None:
    """``The desk opens at 08:30.`` -> ``What opens at 08:30?`` (answer: the subject)."""
    if _SUBORDINATE.match(sentence) or sentence.startswith(("#", "|")) or "?" in sentence:
        return None
    words = sentence.rstrip(".!").split()
    if _imperative(words[0]):
        return None  # an instruction: no subject to ask for
    found = _finite_verb(words)
    if found is None:
        return None
    subject, adverbs, rest = found.parts(words)
    verb = found.word
    if found.main is None and verb in _SINGULAR:  # agree with a singular "what"
        verb = _SINGULAR[verb]
    elif found.main is not None and found.main[1] == "VBP":
        from lemminflect import getInflection

        verb = getInflection(found.main[0], tag="VBZ")[0]
    predicate = _tail(" ".join(p for p in (adverbs, verb, rest) if p))
    if len(predicate.split()) < 2:
        return None
    lower = found.word
    subject = subject.strip("*`\"'")
    if not _named(subject):
        return None  # "The editor", "A workspace": people rarely ask for a bare subject
    wh = "Who" if _PERSONS.search(subject) and lower not in ("is", "are") else "What"
    return RuleQuestion(f"{wh} {predicate}?", subject, sentence, "subject", "subject")


def _object_question(sentence: str) -> RuleQuestion | None:
    """``The Vault stores an encrypted cache of all attachments.`` -> ``What does the Vault
    store?`` (answer: the object, up to a comma, preposition-led tail or clause)."""
    if _SUBORDINATE.match(sentence) or "?" in sentence:
        return None
    words = sentence.rstrip(".!").split()
    if _imperative(words[0]):
        return None
    found = _finite_verb(words)
    if found is None:
        return None
    subject, adverbs, rest = found.parts(words)
    if found.main is not None:
        lemma, tense = found.main
        asked = _join("what", _DO[tense], _lower_first(subject), adverbs, lemma)
    else:
        # A modal before a bare verb ("Owners can export every page") moves alone: "What can
        # owners export?". "is" makes attribute questions, not object ones; a negated verb
        # ("cannot see", "will never ask") asks for what is not the case, a poor question.
        modal = _modal_verb(found.word, rest)
        if modal is None:
            return None
        lemma, rest = modal
        asked = _join("what", found.word, _lower_first(subject), adverbs, lemma)
    obj = _tail(rest)
    obj = re.split(r" (?:to|for|in|on|at|from|with|by|when|during|after|before|until|via|as|"
                   r"into|within|without|under|through|over|across|using)\b",
                   obj, maxsplit=1)[0]
    obj = _TRAILING_ADVERB.sub("", obj)  # "the trash early", "guests only"
    n = len(obj.split())
    if (not 2 <= n <= 5 or _SUBORDINATE.match(obj) or not _noun_phrase(obj)
            or lemma in _CAUSATIVES):
        return None
    return RuleQuestion(asked, obj, sentence, "object", "wh")


# "let members sign in", "make the service available": the object is half of a clause.
_CAUSATIVES = {"let", "make", "help", "have", "get", "keep", "leave", "want", "ask"}
_TRAILING_ADVERB = re.compile(
    r"(?: (?:later|early|earlier|only|again|directly|themselves|himself|herself|itself|"
    r"automatically|manually|instead|first|now|too|also|anytime|immediately|yourself))+$")
_MODALS = {"can", "must", "should", "will", "may", "could", "would", "might"}
_NEGATIONS = {"not", "never", "no", "neither", "nor"}


def _modal_verb(word: str, rest: str) -> tuple[str, str] | None:
    """(bare verb, words after it) where ``word`` is a modal followed, past adverbs, by a
    bare main verb; None for other auxiliaries, negations, passives ("can be restored")."""
    if word not in _MODALS:
        return None
    words = rest.split()
    while words and words[0].lower() in _ADVERBS and words[0].lower() not in _NEGATIONS:
        words = words[1:]
    if not words:
        return None
    verb = words[0].lower()
    if (verb in _NEGATIONS or verb in _AUX or verb in ("be", "been", "get")
            or not verb.isalpha() or not _bare_verb(verb)):
        return None
    return verb, " ".join(words[1:])


_DEFINITION = re.compile(
    r"^(?P<subject>(?:A|An|The) (?:\*\*)?[\w-]+(?: [\w-]+){0,2}?(?:\*\*)?) (?P<verb>is|are) "
    r"(?P<complement>(?:a|an) .+)$")


def _definition_question(sentence: str) -> RuleQuestion | None:
    """``A shelf is a collection of pages about one subject.`` -> ``What is a shelf?``
    (answer: the defining noun phrase, up to a comma or a clause)."""
    found = _DEFINITION.match(sentence.rstrip(".!"))
    if found is None:
        return None
    subject = found.group("subject").replace("**", "")
    if any(w.lower() in _AUX or _RELATIVE.fullmatch(w) for w in subject.split()[1:]):
        return None  # "The page that is shared is ...": the subject runs into a clause
    answer = _tail(found.group("complement"))
    answer = re.split(r" (?:that|which|who|where|such as|for example)\b", answer)[0]
    if not 2 <= len(answer.split()) <= MAX_ANSWER_WORDS or not _noun_phrase(answer):
        return None
    question = _join("What", found.group("verb"), _lower_first(subject))
    return RuleQuestion(question, answer, sentence, "definition", "wh")


# After a bare verb these make a verb phrase: "take up", "merge without", "fix and".
_PARTICLES = {"up", "out", "down", "off", "in", "on", "over", "back", "away", "without", "with",
              "to", "into", "and", "or"}
_NOT_NP_START = {
    "that", "how", "what", "where", "why", "whether", "because", "out", "up", "down", "off",
    "through", "inside", "outside", "into", "onto", "about", "per", "most", "more", "you",
    "it", "them", "us", "him", "her", "me", "so", "too", "very", "not", "also",
}


def _noun_phrase(words: str) -> bool:
    """Whether an object span reads as a noun phrase. A verb misread as the main one leaves
    a verb phrase ("take up", "investigate and fix the problem"), a particle ("out every
    other session") or a clause ("offline are uploaded") as the "object"."""
    from lemminflect import getAllLemmas

    parts = [w.strip("*`\"'").lower() for w in words.split()]
    if not parts or parts[0] in _NOT_NP_START or any(w in _AUX or w == "be" for w in parts):
        return False
    first = getAllLemmas(parts[0])
    bare_verb = parts[0] in first.get("VERB", ()) and "ADJ" not in first
    return not (set(first) == {"VERB"} or (bare_verb and len(parts) > 1 and (
        parts[1] in _DETERMINERS or parts[1] in _PARTICLES)))


def _table_questions(rows: Sequence[str], title: str) -> list[RuleQuestion]:
    """Questions about table rows: 'In <title>, what is the <column> of <row key>?'"""
    cells = [[c.strip(" *`") for c in r.strip("|").split("|")] for r in rows]
    header, body = cells[0], cells[1:]
    out = []
    for row, line in zip(body, rows[1:], strict=True):
        if len(row) != len(header) or not row[0] or set(row[0]) <= set("-: "):
            continue
        for col in range(1, len(header)):
            answer, name = row[col], header[col]
            if not answer or not name or set(answer) <= set("-: ") or len(answer.split()) > 8:
                continue
            place = f"In {title}, w" if title else "W"
            if name.lower() in ("when", "date", "deadline", "due", "timing"):
                question = f"{place}hen is '{row[0]}' due?"
            elif name.lower() in ("owner", "who", "responsible", "contact"):
                question = f"{place}ho is responsible for '{row[0]}'?"
            else:
                question = f"{place}hat is the {name.lower()} of '{row[0]}'?"
            out.append(RuleQuestion(question, answer, squash(line), "cell", "table"))
    return out


def _title(sentences: Sequence[str], at: int, fallback: str) -> str:
    for s in reversed(sentences[:at]):
        if s.startswith("#"):
            return s.lstrip("# ").strip()
    return fallback


def chunk_questions(text: str, title: str = "") -> list[RuleQuestion]:
    """Every rule question one chunk yields, in sentence order; raft.build checks them."""
    parts = split_sentences(text)
    out: list[RuleQuestion] = []
    table: list[str] = []
    for i, sentence in enumerate([*parts, ""]):
        if "|" in sentence and sentence.count("|") >= 1:
            table.append(sentence)
            continue
        if len(table) >= 2:
            out.extend(_table_questions(table, _title(parts, i - len(table), title)))
        table = []
        if not sentence or sentence.startswith("#") or len(sentence.split()) < 5:
            continue
        out.extend(sentence_questions(sentence))
    return out


def sentence_questions(sentence: str) -> list[RuleQuestion]:
    """Span questions, then the subject and object questions of one sentence; an object
    that is already a span (``costs 6 EUR``) keeps its more specific span question."""
    out = span_questions(sentence)
    spans = {q.answer for q in out}
    for made in (_subject_question(sentence), _object_question(sentence),
                 _definition_question(sentence)):
        if made is not None and made.answer not in spans:
            out.append(made)
    return out


def answer_spans(sentence: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of answer spans in one sentence, most specific kinds first, never
    overlapping an earlier one."""
    taken: list[tuple[int, int]] = []
    found = []
    for pattern in PATTERNS:
        for match in pattern.regex.finditer(sentence):
            group = "a" if "a" in pattern.regex.groupindex and match.group("a") else 0
            start, end = match.span(group)
            text = match.group(group).rstrip(" .,;:")
            end = start + len(text)
            if pattern.kind == "name":  # "Brindlewood Labs for" -> "Brindlewood Labs"
                text = re.sub(r"(?: (?:of|and|for))+$", "", text)
                end = start + len(text)
                if " " not in text and not _lone_name(text, sentence[:start], sentence[end:]):
                    continue
            if text.startswith(("\"", "'", "“", "‘")):
                start, text = start + 1, text[1:]
            if not text or len(text.split()) > MAX_ANSWER_WORDS or _cuts_a_word(sentence,
                                                                                 start, end):
                continue
            if pattern.kind == "duration" and "-" in text:
                continue  # "a 48-hour waiting period": an adjective, "how many hour" asks badly
            if any(start < e and s < end for s, e in taken):
                continue
            taken.append((start, end))
            found.append((pattern.kind, start, end))
    return sorted(found, key=lambda f: f[1])


_AFTER_A_NAME = {"in", "on", "at", "with", "to", "from", "by", "for", "of", "and", "or", "as",
                 "is", "are", "was", "were", "can", "cannot", "will", "may", "must", "does",
                 "did", "has", "have", "had", "also", "still", "never"}


def _lone_name(word: str, before: str, after: str) -> bool:
    """Whether one capitalised word is a name that answers a question: not a word the lexicon
    knows ("the Customer"), not a noun after a determiner ("this DPA", "your IdP") or before
    a possessive, and not a modifier of the noun after it ("the Quillfeather service", "API
    keys": asking "the what service?" reads badly)."""
    previous = before.split()[-1].lower() if before.split() else ""
    if _common(word) or previous in _DETERMINERS or after.startswith(("'s", "’s")):
        return False
    following = after.split()
    if not following or not following[0][:1].isalpha():
        return True
    nxt = following[0].strip(",.;:").lower()
    return nxt in _AFTER_A_NAME or (bool(_verb_lemma(nxt, word)) and not _ambiguous(nxt))


_GLUE = {":", "=", "/", "@", "_"}


def _cuts_a_word(sentence: str, start: int, end: int) -> bool:
    """A span that starts or ends inside a word or a dotted number ("JAW" of "JAWS",
    "10.44.0" of "10.44.0.10") is no answer."""
    before = sentence[start - 1] if start > 0 else " "
    after = sentence[end:end + 2]
    return (before.isalnum() or (before == "." and start > 1 and sentence[start - 2].isdigit())
            or (after[:1].isalnum()) or (after[:1] == "." and after[1:2].isdigit())
            # glued to an operator or a path: "after:2025-01-01", "key=10", "docs/v2"
            or before in _GLUE or (after[:1] in _GLUE and after[1:2].strip() != ""))


_COUNT_STOP = {"of", "to", "for", "in", "on", "at", "per", "by", "with", "from", "and", "or",
               "than", "that", "which", "who", "each", "a", "an", "the"}


def _counted(after: str) -> tuple[str, str]:
    """(noun, rest): the words a bare number counts ("up to 100 named versions" -> "named
    versions"), so the wh-phrase carries them ("How many named versions ...") instead of
    stranding them ("How many can a page have up to named versions?")."""
    words = after.split()
    taken: list[str] = []
    for i, word in enumerate(words[:3]):
        bare = word.rstrip(",.;:")
        nxt = words[i + 1] if i + 1 < len(words) else ""
        adjective = bare.endswith("ed") and nxt.isalpha() and nxt.islower()  # "named versions"
        if (not bare.isalpha() or not bare.islower() or bare in _COUNT_STOP or bare in _AUX
                or (_verb_lemma(bare, "xs") and not adjective and not _ambiguous(bare))):
            break
        taken.append(bare)
        if bare != word:
            break
    return " ".join(taken), " ".join(words[len(taken):])


def span_questions(sentence: str) -> list[RuleQuestion]:
    out = []
    for kind, start, end in answer_spans(sentence):
        answer = sentence[start:end]
        before, after = sentence[:start].strip(), _tail(sentence[end:])
        if kind == "path":
            made = _path_question(sentence, start, end)
            if made is not None:
                out.append(made)
            continue
        if before.split() and before.split()[-1].lower() in ("how", "what", "why", "whether"):
            continue  # "describes how Brindlewood Labs responds": no wh-phrase fits there
        if kind in ("name", "identifier") and re.match(r"(?:and|or|nor)\b", after):
            continue  # one conjunct of "VAT and other sales taxes": the answer is both
        wh = _wh_phrase(kind, answer, before)
        if kind == "number":
            noun, rest = _counted(after)
            if rest[:1].isalpha() and not re.match(r"(?:of|to|for|in|on|at|per|by|with|from|"
                                                   r"than|that|which|who)\b", rest):
                continue  # the counted noun phrase goes on ("10 active API keys"): unclear
            if noun:
                wh, after = f"{wh} {noun}", rest
        # The span's own clause first (after the last comma before it), then the sentence.
        clauses = [before]
        cut = max(before.rfind("; "), before.rfind(", "))
        if cut >= 0:
            clauses.insert(0, before[cut + 2:])
        question, form = None, "wh"
        for clause in clauses:
            question = _wh_move(clause, after, wh)
            if question:
                break
        cloze = next((q for c in clauses if (q := _cloze(c, after, wh))), None)
        if question is None:
            question, form, cloze = cloze, "cloze", None
        for text, how in ((question, form), (cloze, "cloze")):
            # The cloze form is a second wording of a moved question (Lewis et al. train on
            # both); the near-duplicate check drops it where the two read the same.
            if text is not None and len(text.split()) <= MAX_QUESTION_WORDS:
                out.append(RuleQuestion(text, answer, sentence, kind, how))
    return out


_BE = re.compile(r"\b(?:is|are|was|were)\b", re.I)
_PLACE_PREPOSITIONS = {"in", "under", "from", "at", "via", "on"}
_CLAUSE_START = re.compile(r".*(?:[,;:] |\b(?:unless|if|when|once|so that|then|before|after|"
                           r"while|until|because)\b )", re.I)


def _path_question(sentence: str, start: int, end: int) -> RuleQuestion | None:
    """``An owner can close a workspace from Settings > Workspace`` -> ``Where can an owner
    close a workspace?``; instructions ("Correct your name in Profile > Account") ask
    ``Where can you correct your name?``. Only a path after a place preposition: "Open
    Settings > Vault and choose ..." names a step, not a place."""
    answer = sentence[start:end]
    words = sentence[:start].split()
    if not words or words[-1].lower() not in _PLACE_PREPOSITIONS:
        return None
    before = " ".join(words[:-1])
    after = sentence[end:]
    if not before:  # "Under Settings > Workspace, owners can change ...": the clause follows
        if not after.startswith(", "):
            return None
        clause, tail = _tail(after[2:]), ""
    else:
        clause, tail = before, _tail(after)
        opener = _CLAUSE_START.match(clause)
        if opener:
            clause = clause[opener.end():]
        clause = clause.strip(" *")
    parts = clause.split()
    if len(parts) < 2 or _SUBORDINATE.match(clause):
        return None
    question: str | None
    if _imperative(parts[0]):
        question = _join("Where can you", parts[0].lower(), *parts[1:], tail)
    elif parts[0].lower() == "you" and parts[1] in _MODALS:  # "you" is no subject to ask for
        question = _join("Where", parts[1], "you", *parts[2:], tail)
    else:
        question = _wh_move(clause, tail, "where")
    if question is None or len(_BE.findall(question)) > 1:
        return None  # "Where are the version you using is shown?": a clause in the subject
    return RuleQuestion(question, answer, sentence, "path", "wh")


_DANGLING = re.compile(
    # Words no question can end on (a stranded preposition, "made of?", can), or a list cut
    # after its comma ("sold in four plans: Free, Plus,?").
    r"\b(the|a|an|and|or|than|per|its|their|your|our|this|these|those)\s*\?$|[,:;(]\s*\?$|"
    r", (?:what|who|which)\?$",
    re.IGNORECASE,
)
_VAGUE = re.compile(r"\b(?:it|them|this|that|these|those|they|there)\?$", re.I)
# Do-support in front of an auxiliary ("What e-mail address did can be reach at?"): the verb
# taken for the main one was a participle.
# An article before an auxiliary ("to the are announced") is a noun phrase the span cut.
_DOUBLE_AUX = re.compile(
    r"\b(?:do|does|did|the|a|an) (?:is|are|was|were|can|cannot|must|will|may|should|could|"
    r"would|has|have|had|be|not)\b", re.IGNORECASE)


def check(q: RuleQuestion) -> str | None:
    """The rejection reason for a rule question, or None: the checks that stay meaningful
    when no model wrote the question."""
    if normalise(q.answer) and f" {normalise(q.answer)} " in f" {normalise(q.question)} ":
        return "answer_in_question"
    if not ASKS_FOR[q.kind].search(q.question):
        return f"does_not_ask_for_{q.kind}"
    if len(q.question.split()) < 4:
        return "bad_format"
    if _DANGLING.search(q.question):
        return "dangling_end"  # "... as a percentage of the?": the span cut a phrase in two
    if _DOUBLE_AUX.search(q.question):
        return "ungrammatical"
    if _VAGUE.search(q.question):
        return "vague_reference"  # "Where can you open it?": "it" is in the sentence before
    if q.question.count("**") % 2 or q.question.count("(") != q.question.count(")"):
        return "broken_markup"  # the span or the clause cut a bold phrase or a bracket
    return None


def cross_sentence(
    questions: Sequence[tuple[str, RuleQuestion]],
    sentences: Iterable[tuple[str, str]],
    similar: Sequence[Sequence[float]] | None = None,
) -> list[tuple[str, RuleQuestion]]:
    """Fabbri et al.'s retrieved-sentence questions, as (oracle chunk id, question): for a
    question about chunk A, a sentence of another chunk B that holds the same answer and
    shares at least three content words with A's sentence gives B the question written from
    A's words, quoting B's own sentence. ``sentences`` are (chunk id, sentence) pairs."""
    from raft.text import content_words

    by_answer: dict[str, list[tuple[str, str]]] = {}
    for chunk_id, sentence in sentences:
        lowered = f" {normalise(sentence)} "
        for _, q in questions:
            key = normalise(q.answer)
            if len(key) >= 3 and f" {key} " in lowered:
                by_answer.setdefault(key, []).append((chunk_id, sentence))
    out = []
    seen: set[tuple[str, str]] = set()
    for chunk_id, q in questions:
        if q.form == "table":
            continue
        words = content_words(q.sentence)
        for other_id, other in by_answer.get(normalise(q.answer), []):
            if other_id == chunk_id or other == q.sentence or (other_id, q.question) in seen:
                continue
            if len(words & content_words(other)) < 3:
                continue
            at = squash(other).lower().find(q.answer.lower())
            if at < 0:
                continue
            answer = squash(other)[at:at + len(q.answer)]
            seen.add((other_id, q.question))
            out.append((other_id, RuleQuestion(q.question, answer, squash(other), q.kind,
                                               "cross")))
    return out
