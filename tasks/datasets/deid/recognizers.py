"""tuneloop's Presidio recognizers: the categories Presidio has no linear-time recognizer for.

Each is a `presidio_analyzer.EntityRecognizer` (usable in an `AnalyzerEngine` too) built from
`RegexRecognizer`: linear-time patterns (no nested unbounded quantifiers; every repetition is a
single character class or bounded), an optional capture group that is the sensitive part (the
value after ``password=``, the date after "born on"), and an optional check in Python.

- `EmailRecognizer`: Unicode local parts and domains (``jürgen@müller.de``), and the obfuscated
  forms people type (``bob [at] example [dot] org``, ``bob at example dot org``). Presidio's own
  email recognizer asks tldextract, which downloads the public suffix list on first use.
- `SecretRecognizer`: API key and token formats (AWS, GitHub, Slack, OpenAI, Stripe, Google, JWT,
  bearer tokens), PEM private key blocks, and secrets in ``key=value`` text.
- `SecretUrlRecognizer`: URLs carrying credentials, secret query parameters, long path tokens or a
  person's profile. Presidio's URL recognizer backtracks catastrophically (``"a." * 2500`` takes
  ~6 s) and flags every link, so it is not used; ordinary links are not PII.
- `DateOfBirthRecognizer`: a date after a birth cue (en/de/fr/pt); other dates are not PII.
- `AddressRecognizer`: street addresses (US/UK/IN numbered streets, German ``…straße 5``, French
  ``12 rue …``, Portuguese ``Rua … 1500``) with their postcode and city.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from presidio_analyzer import EntityRecognizer, RecognizerResult


@dataclass(frozen=True)
class Rule:
    """One pattern: `group` is the part reported (0 = the whole match); `check` may veto it."""

    regex: re.Pattern[str]
    score: float = 0.9
    group: int = 0
    check: Callable[[re.Match[str]], bool] | None = None


class RegexRecognizer(EntityRecognizer):
    """A recognizer made of `Rule`s, run only when `trigger` (a cheap regex) is in the text."""

    ENTITY = ""
    RULES: Sequence[Rule] = ()
    TRIGGER: re.Pattern[str] | None = None

    def __init__(self) -> None:
        super().__init__(supported_entities=[self.ENTITY], name=type(self).__name__)

    def load(self) -> None:  # nothing to load: the patterns are compiled at import
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts: object = None
                ) -> list[RecognizerResult]:
        if self.TRIGGER is not None and not self.TRIGGER.search(text):
            return []
        results = []
        for rule in self.RULES:
            for match in rule.regex.finditer(text):
                if rule.check is not None and not rule.check(match):
                    continue
                start, end = match.span(rule.group)
                if end > start:
                    results.append(RecognizerResult(self.ENTITY, start, end, rule.score))
        return results


# --- email ------------------------------------------------------------------------------------
_LOCAL = r"[\w.%+'-]{1,64}"
_LABEL = r"[^\W_][\w-]{0,62}"
_TLD = r"[^\W\d_]{2,24}"
_AT = r"\s*[\[(<{]\s*(?i:at)\s*[\])>}]\s*"
_DOT = r"\s*[\[(<{]\s*(?i:dot)\s*[\])>}]\s*"


def _not_git_remote(match: re.Match[str]) -> bool:
    # git@github.com:org/repo.git names a host, not a person.
    return not match.group().lower().startswith("git@")


class EmailRecognizer(RegexRecognizer):
    ENTITY = "EMAIL"
    TRIGGER = re.compile(r"@|(?i:\bat\b)")
    RULES = (
        Rule(re.compile(rf"(?<![\w.%+'-]){_LOCAL}@{_LABEL}(?:\.{_LABEL}){{0,8}}\.{_TLD}(?![\w-])"),
             1.0, check=_not_git_remote),
        # bob [at] example [dot] org, bob(at)example(dot)co(dot)uk
        Rule(re.compile(rf"(?<![\w.%+'-]){_LOCAL}{_AT}{_LABEL}(?:{_DOT}{_LABEL}){{1,8}}(?!\w)"),
             0.9),
        # bob at example dot org (both words, spelled out)
        Rule(re.compile(rf"(?<![\w.%+'-])[\w.+-]{{1,64}} (?i:at) {_LABEL}(?: (?i:dot) {_LABEL}){{1,4}}"
                        rf"(?!\w)"), 0.8),
    )


# --- secrets ----------------------------------------------------------------------------------
_SECRET_KEY_NAMES = (
    r"password|passwd|passwort|mot de passe|senha|pwd|pass|secret|client[_-]?secret|api[_-]?key|"
    r"apikey|access[_-]?key|access[_-]?token|auth[_-]?token|refresh[_-]?token|token|"
    r"private[_-]?key|credentials?"
)
_NOT_A_VALUE = frozenset({"none", "null", "nil", "true", "false", "undefined", "required",
                          "optional", "incorrect", "wrong", "invalid", "expired", "missing"})
_CODE = re.compile(r"[a-z_][a-z0-9_.]*(?:[\[(].*)?|[A-Za-z_][\w.]*[\[(].*")


def _value_is_secret(match: re.Match[str]) -> bool:
    """``password=hunter2``, ``passwd: S3cr3t!x``, ``api_key = "x7!k"`` and "my password is
    Tr0ub4dor" are secrets; ``password = get_password()``, ``token = self.token``,
    ``token = None``, ``$TOKEN``, ``{{ secret }}``, ``<SECRET>``, ``****`` and "the password is
    incorrect" are code, templates, prose or already redacted."""
    value, sep = match.group("value"), match.group("sep")
    if value.lower() in _NOT_A_VALUE or value[0] in "$%{<[(*" or set(value) <= set("*xX.#-"):
        return False
    if match.group("q"):
        return True
    if sep.strip() not in ("=", ":"):  # prose ("is"): a plain word is not evidence of a secret
        return not value.isalpha() or not (value.islower() or value.istitle())
    if sep.strip() == "=" and sep != "=":  # `name = value`: an assignment in code
        return not _CODE.fullmatch(value)
    return True


class SecretRecognizer(RegexRecognizer):
    ENTITY = "SECRET"
    RULES = (
        Rule(re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}(?![A-Za-z0-9])")),
        Rule(re.compile(r"(?i:aws_?secret_?(?:access_?)?key|secret_?access_?key)[\"']?\s*[:=]\s*"
                        r"[\"']?([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"), group=1),
        Rule(re.compile(r"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{30,255}")),
        Rule(re.compile(r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{40,255}")),
        Rule(re.compile(r"(?<![A-Za-z0-9_])xox[abposr]-[A-Za-z0-9-]{10,255}")),
        Rule(re.compile(r"(?<![A-Za-z0-9_-])sk-[A-Za-z0-9_-]{16,255}")),
        Rule(re.compile(r"(?<![A-Za-z0-9_])(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,255}")),
        Rule(re.compile(r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}")),
        Rule(re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,4096}\.[A-Za-z0-9_-]{8,4096}"
                        r"\.[A-Za-z0-9_-]{8,4096}")),
        Rule(re.compile(r"(?<![A-Za-z0-9])[Bb]earer\s+([A-Za-z0-9._~+/-]{16,4096}=*)"), group=1),
        # A PEM private key, with or without its END line (a truncated paste is still a key).
        Rule(re.compile(r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY-----[A-Za-z0-9+/=\s\\:,-]*?"
                        r"(?:-----END [A-Z0-9 ]{0,40}PRIVATE KEY-----|(?=-----)|$)"), 1.0),
        # key=value / key: value / "key": "value" (JSON, YAML, .env, shell, prose)
        Rule(re.compile(rf"(?<![A-Za-z0-9])(?i:{_SECRET_KEY_NAMES})[\"']?"
                        r"(?P<sep>\s{0,3}(?:[:=]|\b(?:is|ist|est|es)\b|é)\s{0,3})"
                        r"(?P<q>[\"'`]?)(?P<value>[^\s\"'`,;]{4,200})"),
             0.8, group=3, check=_value_is_secret),
    )


# --- URLs -------------------------------------------------------------------------------------
_URL = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{1,20}://[^\s<>\"'`\\]{1,4096}")
_URL_TRAILING = ".,;:!?)]}'\""
_SECRET_PARAMS = frozenset((
    "access_token refresh_token id_token auth_token token api_key apikey api-key key secret "
    "client_secret password passwd pwd pass auth sig signature session sessionid sid code otp "
    "x-amz-signature x-amz-credential x-amz-security-token jwt jsessionid phpsessid"
).split())
_PROFILE_HOSTS = re.compile(
    r"(?:^|\.)(?:linkedin\.com/in|facebook\.com|fb\.com|instagram\.com|twitter\.com|x\.com|"
    r"tiktok\.com/@|xing\.com/profile)/[^/?#\s]{2,}", re.IGNORECASE)
_TOKEN_SEGMENT = re.compile(r"[A-Za-z0-9_-]{24,}")


def url_is_sensitive(url: str) -> bool:
    """Whether a URL carries a secret or an identity (ordinary links are kept)."""
    rest = url.split("://", 1)[1]
    authority, _, path = rest.partition("/")
    if "@" in authority and ":" in authority.split("@", 1)[0]:
        return True  # user:password@host
    if _PROFILE_HOSTS.search(authority + "/" + path):
        return True
    path, _, query = path.partition("?")
    path, _, matrix = path.partition(";")  # /cart;jsessionid=0370DA14...
    query = "&".join((matrix, query)).replace("#", "&").replace(";", "&")
    for pair in query.split("&"):
        name = pair.split("=", 1)[0].lower()
        if "=" in pair and name in _SECRET_PARAMS:
            return True
    for segment in path.split("/"):
        if _TOKEN_SEGMENT.fullmatch(segment) and any(c.isdigit() for c in segment) \
                and any(c.isalpha() for c in segment):
            return True
    return False


class SecretUrlRecognizer(EntityRecognizer):
    ENTITY = "URL"

    def __init__(self) -> None:
        super().__init__(supported_entities=[self.ENTITY], name=type(self).__name__)

    def load(self) -> None:
        pass

    def analyze(self, text: str, entities: list[str], nlp_artifacts: object = None
                ) -> list[RecognizerResult]:
        if "://" not in text:
            return []
        results = []
        for match in _URL.finditer(text):
            url = match.group().rstrip(_URL_TRAILING)
            if "://" in url and url_is_sensitive(url):
                results.append(RecognizerResult(self.ENTITY, match.start(),
                                                match.start() + len(url), 1.0))
        return results


# --- dates of birth ---------------------------------------------------------------------------
_MONTHS = (
    r"jan(?:uary|vier|eiro)?|feb(?:ruary|ruar)?|f[ée]v(?:rier)?|fev(?:ereiro)?|mar(?:ch|s|ço|co)?|"
    r"m[äa]rz|apr(?:il)?|avr(?:il)?|abr(?:il)?|may|mai(?:o)?|jun(?:e|i|ho)?|juin|jul(?:y|i|ho)?|"
    r"juil(?:let)?|aug(?:ust)?|ao[uû]t|ago(?:sto)?|sep(?:t(?:ember)?)?|set(?:embro)?|"
    r"oct(?:ober)?|okt(?:ober)?|out(?:ubro)?|nov(?:ember|embre|embro)?|dec(?:ember)?|"
    r"d[ée]z(?:ember|embro)?|d[ée]c(?:embre)?"
)
_DATE = (
    r"\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}"
    rf"|\d{{1,2}}(?:st|nd|rd|th|er|\.)?\s(?:of\s|de\s)?(?i:{_MONTHS})\.?,?\s(?:de\s)?\d{{4}}"
    rf"|(?i:{_MONTHS})\.?\s\d{{1,2}}(?:st|nd|rd|th)?,?\s\d{{4}}"
)
_BIRTH_CUE = (
    r"born(?:\s(?:on|in))?|date\sof\sbirth|d\.?o\.?b\.?|birth\s?date|birthday(?:\s(?:is|was))?|"
    r"geburtsdatum|geboren(?:\sam)?|geburtstag(?:\sist)?|n[ée]e?\sle|date\sde\snaissance|"
    r"anniversaire|nascid[oa]\sem|nasci\sem|data\sde\snascimento|anivers[áa]rio|nac[ií]\s?el|"
    r"fecha\sde\snacimiento"
)


class DateOfBirthRecognizer(RegexRecognizer):
    ENTITY = "DATE_OF_BIRTH"
    TRIGGER = re.compile(r"(?i:born|birth|d\.?o\.?b|geb|naiss|n[ée]e? le|nasc|anivers|nac)")
    RULES = (
        # the cue, up to a few words ("born on the", "date of birth as YYYY-MM-DD: is"), the date
        Rule(re.compile(rf"(?i:\b(?:{_BIRTH_CUE}))[^.!?\n\d]{{0,40}}?({_DATE})(?!\d)"), group=1),
        # "Ich bin am 13. Januar 2002 geboren", "I was 14 March 1987 born"
        Rule(re.compile(rf"(?<!\d)({_DATE})\s(?:\w+\s){{0,2}}?(?i:geboren|born|née?|nascid[oa])\b"),
             group=1),
    )


# --- street addresses -------------------------------------------------------------------------
_CAP = r"[^\W\d_][\w'’.-]{0,30}"
_EN_STREET = (r"Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Way|Court|Ct|"
              r"Place|Pl|Parkway|Pkwy|Terrace|Close|Crescent|Square|Sq|Highway|Hwy|Circle|Cir|"
              r"Row|Gardens|Grove|Mews|Marg|Nagar|Embankment|Walk|Broadway|Quay|Wharf|Rise|Green")
# "Flat 12, " / "House No. 363, " / "Apt 4B " before the number; "Apt 16D" / "Suite 500" /
# "apto 1905" after the street.
_UNIT = r"(?:Flat|Apt\.?|Apartment|Unit|Suite|Ste\.?|House\sNo\.?|Plot\sNo\.?|Door\sNo\.?)"
_PRE = rf"(?:{_UNIT}\s?[\w-]{{1,6}},?\s)?"
_POST = r"(?:,?\s(?i:apto\.?|apt\.?|suite|ste\.?|unit|flat|floor|fl\.|sala|bloco|casa)\s?[\w-]{1,6})?"
_SEP = r"(?:,\s?|\s[-–]\s|\s)"
_TAIL = (rf"(?:{_SEP}(?:(?:[A-Z]{{1,2}}\d[A-Z\d]?\s?\d[A-Z]{{2}})"            # UK postcode
         r"|(?:\d{5}(?:-\d{4})?|\d{6}|\d{5}-\d{3}|\d{3}\s\d{3})"             # ZIP, PIN, CEP
         r"|(?:[A-Z][^\W\d_'’-]{0,30}\.?(?:(?:[\s-]|\s(?:de|do|da|dos|das|am|an|der|sur|en|"
         r"la|le|del)\s)[A-Z][^\W\d_'’-]{1,30}){0,3})"                               # place
         r")(?![\w-])){0,5}")


class AddressRecognizer(RegexRecognizer):
    ENTITY = "ADDRESS"
    TRIGGER = re.compile(r"\d")
    RULES = (
        # 221B Baker Street, London NW1 6XE / 1600 Amphitheatre Parkway, Mountain View, CA 94043
        Rule(re.compile(rf"(?<![\w-]){_PRE}\d{{1,5}}[A-Za-z]?,?\s(?:[A-Z][\w'’.-]{{0,30}}\s){{1,4}}"
                        rf"(?:{_EN_STREET})\b\.?{_POST}{_TAIL}"), 0.85),
        # Hauptstraße 5, 10115 Berlin / Lindenweg 12a
        Rule(re.compile(rf"(?<!\w)(?:[A-ZÄÖÜ][\wäöüß-]{{0,30}}(?:straße|strasse|str\.|weg|allee|"
                        rf"platz|gasse|ring|damm|ufer)|(?:[A-ZÄÖÜ][\wäöüß-]{{0,30}}\s)(?:Straße|"
                        rf"Strasse|Weg|Allee|Platz|Gasse))\s\d{{1,4}}[a-z]?\b{_TAIL}"), 0.85),
        # 12 rue de Rivoli, 75001 Paris
        Rule(re.compile(rf"(?<![\w-])\d{{1,4}}(?:\s?(?:bis|ter))?,?\s(?i:rue|avenue|av\.|boulevard|"
                        rf"bd|place|chemin|allée|impasse|quai|cours)\s(?:{_CAP}\s){{0,4}}{_CAP}"
                        rf"{_TAIL}"), 0.85),
        # Rua Augusta 1500, São Paulo / Rua Oscar Freire, 2408, apto 1905 - São Paulo - SP
        Rule(re.compile(rf"(?<!\w)(?:Rua|Avenida|Av\.|Travessa|Alameda|Praça|Estrada|Rodovia)\s"
                        rf"(?:{_CAP}\s){{0,4}}{_CAP},?\s(?:n[º°o]\.?\s?)?\d{{1,5}}\b{_POST}{_TAIL}"),
             0.85),
        # House No. 363, T. Nagar, Chennai - 600007 (an Indian address ends with its PIN)
        Rule(re.compile(rf"(?<!\w){_UNIT}\s?[\w-]{{1,6}},\s(?:[^\n,;:]{{1,40}},\s){{0,3}}"
                        r"[^\n,;:\d]{1,40}?\s?[-–]?\s?\d{3}\s?\d{3}(?!\d)"), 0.85),
    )
