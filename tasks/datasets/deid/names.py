"""Person names: from known fields, from context in free text, and from an offline dictionary.

Three sources, one recognizer (`NameRecognizer`, entity ``PERSON``):

1. **Known names**: values of name fields (``user_name``, persona ``name`` …) that the caller
   passes; they match as whole words, as written, Title-cased or UPPER-cased (never lower-cased:
   a user called "Will" must not scrub every "will").
2. **Context**: "my name is …", "call me …", "this is … from", honorifics ("Dr. Okafor"),
   greetings ("Hi Amélie,"), signatures ("Thanks,\\nTom" at the end of a message), and "I'm …"
   with a dictionary name — in English, German, French, Portuguese and Spanish.
3. **Dictionary**: given names from `data/given_names.txt` (thousands, many origins) written
   capitalised anywhere, extended by following surnames; names that are also everyday words
   (`data/ambiguous_names.txt`: Will, May, Grace, Mark …) count only with context or a surname.

spaCy NER adds names the dictionary lacks when a spaCy model is configured (see
`tasks.datasets.deid.detect`); the offline default needs none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from presidio_analyzer import EntityRecognizer, RecognizerResult

from tasks.datasets.deid.lexicon import ENTITY, known_name_spans, lexicon

_TOKEN = r"[^\W\d_][\w'’-]{0,40}"
_PARTICLE = r"(?:de|da|do|das|dos|du|van|von|der|den|ten|ter|bin|ibn|al|el|la|le|di|del)"
_NAME = rf"{_TOKEN}(?:\s(?:{_PARTICLE}\s)?{_TOKEN}){{0,2}}"
_WORD = re.compile(r"[^\W\d_][\w'’-]*")
_PARTICLE_RE = re.compile(_PARTICLE)
# Words that follow a cue but are not names ("Hi there", "Dear Sir", "Thanks all").
_NOT_AFTER_CUE = frozenset((
    "there all everyone everybody team folks guys world sir madam support again so very for "
    "the a an and or but my your our this that it me you him her them we they is was am "
    "i i'm im okay ok good great sure yes no not just also really monday tuesday wednesday "
    "thursday friday saturday sunday morning evening afternoon night today tomorrow assistant "
    "coach bot ai chatgpt claude hello hi hey dear thanks"
).split())

_CUES = (
    # strong: whatever capitalised words follow are a name
    (re.compile(rf"(?i:\b(?:my name is|my name's|name is|i am called|call me|"
                rf"je m'appelle|je m’appelle|ich heiße|ich heisse|mein name ist|meu nome é|"
                rf"me chamo|me llamo|mi nombre es|mon nom est|signed|sincerely yours)\b)[:,]?\s"
                rf"(?P<name>{_NAME})"), False, False),
    (re.compile(rf"(?i:\bthis is\b)\s(?P<name>{_NAME})(?=\s(?i:from|here|speaking|with)\b)"),
     False, False),
    (re.compile(rf"(?P<name>\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Dame|Herr|Frau|Monsieur|Madame|"
                rf"Mme|Mlle|Sr|Sra|Srta|Dona|Señor|Señora|Shri|Smt)\.?\s{_NAME})"), False, True),
    # greetings at the start of a line or sentence
    (re.compile(rf"(?:^|(?<=[\n.!?])\s*)(?i:hi|hello|hey|dear|hallo|liebe|lieber|bonjour|salut|"
                rf"cher|chère|olá|ola|oi|prezado|prezada|querido|querida|hola|estimado|estimada|"
                rf"good morning|good afternoon|good evening)\s(?P<name>{_NAME})(?=\s*[,!.:\n]|$)",
                re.MULTILINE), False, False),
    # signatures: a name alone at the end of a line after a closing
    (re.compile(rf"(?:^|(?<=[.!?])[ \t]+)(?i:thanks|thank you|many thanks|thx|cheers|best|best wishes|best regards|"
                rf"kind regards|warm regards|regards|sincerely|yours truly|take care|talk soon|"
                rf"love|viele grüße|liebe grüße|mit freundlichen grüßen|grüße|lg|cordialement|"
                rf"bien à vous|amitiés|merci|abraços|atenciosamente|obrigado|obrigada|beijos|"
                rf"saludos|gracias)[,!.]?[ \t]*\n?[ \t]*(?P<name>{_NAME})[ \t]*[.!]?[ \t]*(?=\n|$)",
                re.MULTILINE), False, False),
    # "— Kenji" closing the message
    (re.compile(rf"(?<=\s)[—–-]{{1,2}}[ \t]?(?P<name>{_NAME})\s*$"), True, False),
    # weak: "I'm Priya" only when the word is a dictionary given name
    (re.compile(rf"(?i:\b(?:i'm|i’m|i am|im|ich bin|je suis|eu sou|sou o|sou a|soy)\b)\s"
                rf"(?P<name>{_NAME})"), True, False),
)


def _name_tokens(candidate: str, *, need_dictionary: bool) -> str:
    """The leading capitalised tokens of `candidate` that make a name ('' when none do)."""
    given, surnames, ambiguous = lexicon()
    kept: list[str] = []
    particle = _PARTICLE_RE
    for token in candidate.split():
        bare = token.strip("'’-")
        if kept and particle.fullmatch(token):
            kept.append(token)
            continue
        if not bare or not bare[0].isupper() or bare.lower() in _NOT_AFTER_CUE:
            break
        if not kept and need_dictionary and (bare not in given or bare in ambiguous):
            break
        kept.append(token)
    while kept and particle.fullmatch(kept[-1]):
        kept.pop()
    return " ".join(kept)


class NameRecognizer(EntityRecognizer):
    """PERSON: known names, names in context, dictionary names (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(supported_entities=[ENTITY], name="TuneloopNameRecognizer")

    def load(self) -> None:
        lexicon()

    def analyze(self, text: str, entities: list[str], nlp_artifacts: object = None,
                known: Iterable[str] = ()) -> list[RecognizerResult]:
        results = [RecognizerResult(ENTITY, s, e, 1.0) for s, e in known_name_spans(text, known)]
        results += self._in_context(text)
        results += self._from_dictionary(text)
        return results

    @staticmethod
    def _in_context(text: str) -> list[RecognizerResult]:
        results = []
        for pattern, need_dictionary, has_honorific in _CUES:
            for match in pattern.finditer(text):
                start = match.start("name")
                head = text[start:match.end("name")]
                honorific = re.match(r"\w+\.?\s", head) if has_honorific else None
                rest = head[honorific.end():] if honorific else head
                name = _name_tokens(rest, need_dictionary=need_dictionary)
                if name:
                    end = start + (honorific.end() if honorific else 0) + len(name)
                    results.append(RecognizerResult(ENTITY, start, end, 0.85))
        return results

    @staticmethod
    def _from_dictionary(text: str) -> list[RecognizerResult]:
        given, surnames, ambiguous = lexicon()
        words = [(m.start(), m.end(), m.group().strip("'’-")) for m in _WORD.finditer(text)]

        def capitalised(i: int) -> bool:
            word = words[i][2]
            return word[:1].isupper() and not word.isupper()

        def adjacent(i: int, j: int) -> bool:  # word j follows word i after one space
            return text[words[i][1]:words[j][0]] == " "

        results = []
        index = 0
        while index < len(words):
            if not (capitalised(index) and words[index][2] in given):
                index += 1
                continue
            first = last = index
            # "Liu Hao", "Wang Mei": a surname written first
            if (first > 0 and adjacent(first - 1, first) and capitalised(first - 1)
                    and words[first - 1][2] in surnames and words[first - 1][2] not in ambiguous):
                first -= 1
            # "Fatima Khan", "Grace Kim", "Ana Maria Costa": up to two names or surnames after
            while (last + 1 < len(words) and last - index < 2 and adjacent(last, last + 1)
                   and capitalised(last + 1)
                   and (words[last + 1][2] in surnames or words[last + 1][2] in given)):
                last += 1
            if words[index][2] not in ambiguous or last > index or first < index:
                results.append(RecognizerResult(ENTITY, words[first][0], words[last][1], 0.7))
            index = last + 1
        return results
