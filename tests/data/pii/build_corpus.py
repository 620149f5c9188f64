#!/usr/bin/env python3
"""Build the labelled PII corpus used to benchmark the de-identification scrubber.

Writes, next to this file:

* ``pii_events.jsonl``: chat-style events, each with the exact PII spans a scrubber must replace;
* ``clean_events.jsonl``: PII-free events that look PII-adjacent (versions, numbers, dates, code,
  prices, ids, URLs without secrets ...), to measure false positives.

Everything is drawn from one ``random.Random(16)``, so re-running rewrites both files
byte-identically. Every value is validated (Luhn, IBAN mod-97, ``phonenumbers``, Verhoeff, SSN /
NINO / PAN rules), every value must occur verbatim in its text, and the corpus shape (counts per
category, locale and clean kind) is checked; any failure raises. Stdlib plus ``phonenumbers``.

Run: ``python tests/data/pii/build_corpus.py`` (prints a summary table).
"""

from __future__ import annotations

import base64
import calendar
import ipaddress
import json
import random
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import phonenumbers

HERE = Path(__file__).resolve().parent
PII_PATH = HERE / "pii_events.jsonl"
CLEAN_PATH = HERE / "clean_events.jsonl"
SEED = 16

LOCALES = ("en-US", "en-GB", "de-DE", "fr-FR", "en-IN", "pt-BR")
REGION = {"en-US": "US", "en-GB": "GB", "de-DE": "DE", "fr-FR": "FR", "en-IN": "IN", "pt-BR": "BR"}
LANG = {"de-DE": "de", "fr-FR": "fr", "pt-BR": "pt"}  # every other locale writes English

CATEGORIES = (
    "EMAIL", "PHONE", "PERSON", "SECRET", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "URL",
    "US_SSN", "UK_NINO", "IN_AADHAAR", "IN_PAN", "DATE_OF_BIRTH", "ADDRESS",
)
BIG = ("EMAIL", "PHONE", "PERSON", "SECRET")
MIN_EVENTS = {c: (40 if c in BIG else 20) for c in CATEGORIES}
TARGET = {c: 27 for c in CATEGORIES} | {"EMAIL": 46, "PHONE": 48, "PERSON": 48, "SECRET": 56, "URL": 34}
FIXED_LOCALE = {"US_SSN": "en-US", "UK_NINO": "en-GB", "IN_AADHAAR": "en-IN", "IN_PAN": "en-IN"}
MIN_PER_LOCALE = 30
MIN_PII_EVENTS = 340
MIN_CLEAN_EVENTS = 340
MIN_TEMPLATES = 8
CLEAN_KINDS = ("version", "number", "date", "product", "code", "price", "time", "id", "math", "url", "prose")
CLEAN_PER_KIND = 34
MULTI_SHARE = 0.46  # share of events drawn from templates with 2-4 entities
NATIVE_SHARE = 0.45  # share of de/fr/pt-locale events written in their language (where templates exist)

ALNUM = string.ascii_letters + string.digits
UPPER_ALNUM = string.ascii_uppercase + string.digits
B64URL = ALNUM + "-_"
B64 = ALNUM + "+/"

# --------------------------------------------------------------------------------------- names

NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "english": (
        ("James", "Emily", "Oliver", "Charlotte", "Tom", "Sophie", "Daniel", "Hannah", "Liam",
         "Olivia", "Dave", "Rachel", "Ethan", "Megan", "Jane"),
        ("Smith", "Johnson", "Walker", "Thompson", "Clarke", "Bennett", "Hughes", "Turner",
         "Harris", "Mitchell", "Doe", "Fletcher"),
    ),
    "german": (
        ("Jürgen", "Lena", "Matthias", "Anja", "Lukas", "Katrin", "Stefan", "Birgit", "Felix",
         "Sabine", "Jörg", "Uwe"),
        ("Müller", "Schneider", "Fischer", "Weber", "Becker", "Hoffmann", "Schäfer", "Köhler",
         "Wagner", "Krüger"),
    ),
    "french": (
        ("Amélie", "Julien", "Camille", "Étienne", "Léa", "Mathieu", "Chloé", "Benoît",
         "Margaux", "Hugo", "Hélène", "François"),
        ("Dubois", "Lefèvre", "Moreau", "Girard", "Rousseau", "Fontaine", "Mercier", "Bonnet",
         "Faure"),
    ),
    "indian": (
        ("Priya", "Rahul", "Ananya", "Arjun", "Deepika", "Vikram", "Kavya", "Rohan", "Sneha",
         "Aditya", "Lakshmi", "Sanjay"),
        ("Sharma", "Patel", "Iyer", "Reddy", "Nair", "Gupta", "Menon", "Chatterjee", "Kulkarni",
         "Singh"),
    ),
    "brazilian": (
        ("João", "Maria", "Lucas", "Ana", "Thiago", "Beatriz", "Gabriel", "Larissa", "Rafael",
         "Fernanda", "Conceição", "Vinícius"),
        ("Silva", "Santos", "Oliveira", "Souza", "Pereira", "Almeida", "Carvalho", "Ribeiro",
         "Gonçalves"),
    ),
    "spanish": (
        ("Alejandro", "Lucía", "Javier", "Carmen", "Sofía", "Diego", "Pablo", "Elena", "José"),
        ("García", "Fernández", "López", "Martínez", "Ruiz", "Navarro"),
    ),
    "arabic": (
        ("Fatima", "Omar", "Layla", "Youssef", "Ahmed", "Noor", "Khalid", "Amira"),
        ("Khan", "Haddad", "Al-Sayed", "Mansour", "Nasser", "Rahman"),
    ),
    "chinese": (
        ("Wei", "Jing", "Xiaoming", "Mei", "Hao", "Yan"),
        ("Zhang", "Wang", "Chen", "Liu", "Huang", "Zhao"),
    ),
    "japanese": (
        ("Kenji", "Yuki", "Haruto", "Sakura", "Takeshi", "Aiko", "Hiroshi", "Emi"),
        ("Tanaka", "Suzuki", "Sato", "Watanabe", "Yamamoto", "Nakamura"),
    ),
    "nigerian": (
        ("Chinedu", "Ngozi", "Oluwaseun", "Adaeze", "Emeka", "Funmilayo", "Tunde", "Chiamaka"),
        ("Okafor", "Adeyemi", "Okonkwo", "Balogun", "Eze", "Obi"),
    ),
}
ORIGINS = {
    "en-US": ("english",) * 3 + ("spanish", "chinese", "nigerian", "arabic", "japanese", "indian"),
    "en-GB": ("english",) * 3 + ("nigerian", "indian", "arabic", "chinese", "french"),
    "de-DE": ("german",) * 4 + ("arabic", "spanish"),
    "fr-FR": ("french",) * 4 + ("arabic", "nigerian"),
    "en-IN": ("indian",) * 5 + ("english",),
    "pt-BR": ("brazilian",) * 5 + ("japanese", "spanish"),
}
ALL_NAME_WORDS = frozenset(
    w for firsts, lasts in NAMES.values() for part in (*firsts, *lasts) for w in part.split("-")
    if len(w) > 2
)


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    origin: str

    @property
    def full(self) -> str:
        # Chinese names are written family name first.
        return f"{self.last} {self.first}" if self.origin == "chinese" else f"{self.first} {self.last}"


def fold(s: str) -> str:
    """ASCII-fold a name for email local parts and profile slugs."""
    nfkd = unicodedata.normalize("NFKD", s.replace("ß", "ss"))
    return "".join(c for c in nfkd if not unicodedata.combining(c))


def random_person(rng: random.Random, origin: str, taken: set[str]) -> Person:
    firsts, lasts = NAMES[origin]
    while True:
        p = Person(rng.choice(firsts), rng.choice(lasts), origin)
        if p.first not in taken:
            return p


@dataclass
class Ctx:
    """Per-event state: the locale, the language of the template, and its personas."""

    rng: random.Random
    locale: str
    lang: str = "en"
    decks: dict[str, list[str]] = field(default_factory=dict)  # shared by all events of a build
    personas: dict[int, Person] = field(default_factory=dict)

    @property
    def region(self) -> str:
        return REGION[self.locale]

    def persona(self, idx: int = 0) -> Person:
        if idx not in self.personas:
            origins = ORIGINS[self.locale]
            if self.lang != "en":  # a German sentence gets a name from its locale's own pool
                origins = origins[:1]
            taken = {p.first for p in self.personas.values()}
            self.personas[idx] = random_person(self.rng, self.rng.choice(origins), taken)
        return self.personas[idx]

    def deal(self, key: str, items: tuple[str, ...]) -> str:
        """Next item from a shuffled deck, so unforced variants are spread evenly."""
        deck = self.decks.setdefault(key, [])
        if not deck:
            deck.extend(self.rng.sample(items, len(items)))
        return deck.pop()

    def stranger(self) -> Person:
        return random_person(self.rng, self.rng.choice(ORIGINS[self.locale]), set())


def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def chars(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


# ----------------------------------------------------------------------------------- checksums


def luhn_ok(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def luhn_complete(partial: str) -> str:
    return next(partial + d for d in string.digits if luhn_ok(partial + d))


def iban_numeric(s: str) -> int:
    return int("".join(str(int(c, 36)) for c in s))


def iban_ok(iban: str) -> bool:
    compact = iban.replace(" ", "")
    return iban_numeric(compact[4:] + compact[:4]) % 97 == 1


def make_iban(country: str, bban: str) -> str:
    check = 98 - iban_numeric(bban + country + "00") % 97
    return f"{country}{check:02d}{bban}"


_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6), (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4), (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2), (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)
_VERHOEFF_INV = (0, 4, 3, 2, 1, 5, 6, 7, 8, 9)


def verhoeff_ok(number: str) -> bool:
    c = 0
    for i, ch in enumerate(reversed(number)):
        c = _VERHOEFF_D[c][_VERHOEFF_P[i % 8][int(ch)]]
    return c == 0


def verhoeff_digit(partial: str) -> str:
    c = 0
    for i, ch in enumerate(reversed(partial)):
        c = _VERHOEFF_D[c][_VERHOEFF_P[(i + 1) % 8][int(ch)]]
    return str(_VERHOEFF_INV[c])


def es_control(ten: str) -> str:
    weights = (1, 2, 4, 8, 5, 10, 9, 7, 3, 6)
    d = 11 - sum(int(a) * w for a, w in zip(ten, weights, strict=True)) % 11
    return str({11: 0, 10: 1}.get(d, d))


_IT_ODD = (1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24, 23)


def it_cin(abi_cab_account: str) -> str:
    """Italian CIN: the odd/even-table check letter over ABI + CAB + account."""
    total = 0
    for i, ch in enumerate(abi_cab_account):
        v = int(ch) if ch.isdigit() else ord(ch) - ord("A")
        total += _IT_ODD[v] if i % 2 == 0 else v
    return chr(ord("A") + total % 26)


# ------------------------------------------------------------------------------ value: EMAIL

EMAIL_DOMAINS = {
    "en-US": ("example.com", "example.org", "contoso.com", "corp.io"),
    "en-GB": ("example.co.uk", "example.org", "fabrikam.co.uk", "corp.io"),
    "de-DE": ("beispiel.de", "example.de", "firma-beispiel.de"),
    "fr-FR": ("exemple.fr", "example.fr", "societe-exemple.fr"),
    "en-IN": ("example.in", "example.co.in", "corp.io"),
    "pt-BR": ("exemplo.com.br", "example.com.br", "empresa-exemplo.com.br"),
}
SUB_DOMAINS = (
    "mail.eu.corp.io", "students.uni-example.ac.uk", "cs.uni-beispiel.de", "research.example.edu",
    "rh.groupe-exemple.fr", "vendas.loja-exemplo.com.br", "ops.internal.example.com",
    "alumni.iit-example.ac.in",
)
IDN = {  # language -> (origins with non-ASCII names, domains)
    "de": (("german",), ("beispiel.de", "müller-bau.de", "example.de")),
    "fr": (("french",), ("exemple.fr", "société-exemple.fr")),
    "pt": (("brazilian",), ("exemplo.com.br", "exemplo.pt")),
    "es": (("spanish",), ("ejemplo.es",)),
}
PLUS_TAGS = ("newsletter", "work", "shopping", "jobs", "gym", "receipts", "travel", "spam")


def local_part(rng: random.Random, p: Person) -> str:
    f, last = fold(p.first).lower(), fold(p.last).lower()
    return rng.choice((
        f"{f}.{last}", f"{f}{last}", f"{f[0]}.{last}", f"{f}_{last}", f"{f}{rng.randint(1, 99)}",
        f"{last}.{f}", f"{f}.{last}{rng.randint(70, 99)}", f,
    ))


def email_plain(ctx: Ctx, p: Person | None = None) -> str:
    return f"{local_part(ctx.rng, p or ctx.stranger())}@{ctx.rng.choice(EMAIL_DOMAINS[ctx.locale])}"


def email_idn(ctx: Ctx) -> str:
    lang = ctx.lang if ctx.lang in IDN else ctx.rng.choice(sorted(IDN))
    origins, domains = IDN[lang]
    firsts, lasts = NAMES[ctx.rng.choice(origins)]
    first = ctx.rng.choice([n for n in firsts if n != fold(n)])
    last = ctx.rng.choice(lasts)
    local = ctx.rng.choice((f"{first}.{last}", first, f"{first}{last}")).lower()
    return f"{local}@{ctx.rng.choice(domains)}"


def email_obfuscated(ctx: Ctx, style: str = "") -> str:
    p = ctx.stranger()
    local = ctx.rng.choice((fold(p.first).lower(), f"{fold(p.first).lower()}{fold(p.last).lower()}"))
    domain = ctx.rng.choice(EMAIL_DOMAINS[ctx.locale])
    style = style or ctx.rng.choice(("br", "par", "words"))
    at, dot = {"br": (" [at] ", " [dot] "), "par": (" (at) ", " (dot) "), "words": (" at ", " dot ")}[style]
    return local + at + domain.replace(".", dot)


def fullwidth(s: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if 0x21 <= ord(c) <= 0x7E else c for c in s)


def gen_email(ctx: Ctx, variant: str, idx: int) -> str:
    rng = ctx.rng
    if not variant:
        variant = rng.choices(
            ("plain", "plus", "sub", "upper", "idn", "obf", "fullwidth"), (46, 12, 12, 8, 8, 9, 5)
        )[0]
    if variant == "persona":
        return email_plain(ctx, ctx.persona(idx))
    if variant == "plus":
        local, domain = email_plain(ctx).split("@")
        return f"{local}+{rng.choice(PLUS_TAGS)}@{domain}"
    if variant == "sub":
        return f"{local_part(rng, ctx.stranger())}@{rng.choice(SUB_DOMAINS)}"
    if variant == "upper":
        return email_plain(ctx).upper()
    if variant == "idn":
        return email_idn(ctx)
    if variant.startswith("obf"):
        return email_obfuscated(ctx, variant[4:])
    if variant == "fullwidth":
        return fullwidth(email_plain(ctx))
    assert variant == "plain", variant
    return email_plain(ctx)


# ------------------------------------------------------------------------------ value: PHONE

US_AREAS = ("201", "206", "212", "305", "312", "404", "415", "503", "512", "617", "646", "702",
            "713", "718", "720", "808", "917")
# Digit patterns for national significant numbers: X = 0-9, N = 2-9, M = 6-9, A = US area code.
PHONE_PATTERNS = {
    "US": ("A55501XX", "A55501XX", "ANXXXXXX"),
    "GB": ("2079460XXX", "1614960XXX", "1134960XXX", "1174960XXX", "7NXXXXXXXX", "203XXXXXXX"),
    "DE": ("30NXXXXXXX", "89NXXXXXX", "40NXXXXXXX", "151XXXXXXXX", "160XXXXXXX", "170XXXXXXX",
           "176XXXXXXXX", "69NXXXXXXX"),
    "FR": ("19900XXXX", "6XXXXXXXX", "7NXXXXXXX", "1NXXXXXXX", "4NXXXXXXX"),
    "IN": ("MXXXXXXXXX", "MXXXXXXXXX", "112XXXXXXX", "802XXXXXXX", "222XXXXXXX"),
    "BR": ("119XXXXXXXX", "219XXXXXXXX", "11NXXXXXXX", "319XXXXXXXX", "213XXXXXXX"),
}
TRUNK_ZERO = ("GB", "DE", "FR", "IN")
PF = phonenumbers.PhoneNumberFormat


def fill_pattern(rng: random.Random, pattern: str) -> str:
    pools = {"X": string.digits, "N": "23456789", "M": "6789"}
    out = []
    for ch in pattern:
        if ch == "A":
            out.append(rng.choice(US_AREAS))
        else:
            out.append(rng.choice(pools[ch]) if ch in pools else ch)
    return "".join(out)


def random_phone(rng: random.Random, region: str) -> phonenumbers.PhoneNumber:
    cc = phonenumbers.country_code_for_region(region)
    while True:
        num = phonenumbers.parse(f"+{cc}{fill_pattern(rng, rng.choice(PHONE_PATTERNS[region]))}")
        if phonenumbers.is_valid_number(num) and phonenumbers.region_code_for_number(num) == region:
            return num


def phone_styles(num: phonenumbers.PhoneNumber, region: str) -> dict[str, str]:
    intl = phonenumbers.format_number(num, PF.INTERNATIONAL)
    nat = phonenumbers.format_number(num, PF.NATIONAL)
    styles = {
        "intl": intl.replace("-", " ") if region == "US" else intl,
        "intl_raw": intl,
        "e164": phonenumbers.format_number(num, PF.E164),
        "intl_dash": re.sub(r"[ -]+", "-", intl),
        "intl_dot": re.sub(r"[ -]+", ".", intl),
        "national": nat,
        "nat_dash": re.sub(r"[ ()-]+", "-", nat).strip("-"),
        "nat_dot": re.sub(r"[ ()-]+", ".", nat).strip("."),
        "bare": phonenumbers.national_significant_number(num) if region == "IN" else re.sub(r"\D", "", nat),
    }
    if region in TRUNK_ZERO:
        styles["paren0"] = f"+{num.country_code} (0){nat[1:]}"
        styles["idd"] = "00" + intl[1:]
    if region == "US":
        styles["us1"] = "1-" + styles["nat_dash"]
    return styles


def phone_digits_form(value: str) -> str:
    """The number as bare digits (with its + if any): how the checks re-parse every PHONE."""
    value = value.replace("(0)", "")
    return ("+" if value.lstrip().startswith("+") else "") + re.sub(r"\D", "", value)


def phone_valid(value: str, region: str) -> bool:
    try:
        return all(
            phonenumbers.is_valid_number(phonenumbers.parse(v, region))
            for v in (value, phone_digits_form(value))
        )
    except phonenumbers.NumberParseException:
        return False


INTL_STYLES = ("intl", "intl_raw", "e164", "intl_dash", "intl_dot")


def gen_phone(ctx: Ctx, variant: str, idx: int) -> str:
    rng = ctx.rng
    region = ctx.region
    if variant == "foreign":
        region = rng.choice([r for r in REGION.values() if r != ctx.region])
    num = random_phone(rng, region)
    styles = phone_styles(num, region)
    if variant == "foreign":
        variant = rng.choice(INTL_STYLES)
    if variant not in styles:
        variant = rng.choices(
            (*INTL_STYLES, "national", "nat_dash", "nat_dot", "bare", "paren0", "idd", "us1"),
            (18, 6, 6, 5, 4, 20, 10, 6, 9, 5, 5, 3),
        )[0]
    order = [variant, *rng.sample(sorted(styles), len(styles))]
    value = next(styles[s] for s in order if s in styles and phone_valid(styles[s], ctx.region))
    return value


# ------------------------------------------------------------------------- value: CREDIT_CARD

CARD_BRANDS = {
    "visa": (("4",), 16), "visa13": (("4",), 13), "mc": (("51", "52", "53", "54", "55"), 16),
    "amex": (("34", "37"), 15), "discover": (("6011",), 16),
}


def card_number(rng: random.Random, brand: str) -> str:
    prefixes, length = CARD_BRANDS[brand]
    prefix = rng.choice(prefixes)
    return luhn_complete(prefix + digits(rng, length - len(prefix) - 1))


def group_card(number: str, sep: str) -> str:
    sizes = {15: (4, 6, 5), 16: (4, 4, 4, 4), 13: (4, 4, 5)}[len(number)]
    parts, i = [], 0
    for size in sizes:
        parts.append(number[i:i + size])
        i += size
    return sep.join(parts)


def gen_card(ctx: Ctx, variant: str, idx: int) -> str:
    rng = ctx.rng
    brand = variant if variant in CARD_BRANDS else rng.choices(
        ("visa", "mc", "amex", "discover", "visa13"), (36, 30, 15, 14, 5))[0]
    number = card_number(rng, brand)
    style = "bare" if variant == "bare" else rng.choices((" ", "-", "bare"), (50, 20, 30))[0]
    return number if style == "bare" else group_card(number, style)


# -------------------------------------------------------------------------------- value: IBAN

DE_BLZ = ("37040044", "10070000", "50010517", "20041133", "70020270", "12030000")
GB_BANKS = ("NWBK", "BARC", "HBUK", "LOYD", "MIDL")
NL_BANKS = ("ABNA", "INGB", "RABO", "TRIO", "KNAB")
FR_BANKS = ("30004", "30003", "20041", "10278", "30002")
ES_BANKS = ("2100", "0049", "0182", "0081", "2085")
IT_ABI = ("03069", "02008", "05034", "03062")
BR_BANKS = ("00000000", "00360305", "60701190", "90400888")
IBAN_LENGTH = {"DE": 22, "GB": 22, "FR": 27, "ES": 24, "NL": 18, "IT": 27, "BR": 29}
IBAN_COUNTRY = {"de-DE": ("DE",), "en-GB": ("GB",), "fr-FR": ("FR",), "pt-BR": ("BR",),
                "en-US": ("ES", "NL", "IT", "DE"), "en-IN": ("GB", "NL", "ES", "IT")}


def fr_bban(rng: random.Random) -> str:
    bank, branch, account = rng.choice(FR_BANKS), digits(rng, 5), digits(rng, 11)
    key = 97 - (89 * int(bank) + 15 * int(branch) + 3 * int(account)) % 97
    return f"{bank}{branch}{account}{key:02d}"


def es_bban(rng: random.Random) -> str:
    bank, branch, account = rng.choice(ES_BANKS), digits(rng, 4), digits(rng, 10)
    return bank + branch + es_control("00" + bank + branch) + es_control(account) + account


def it_bban(rng: random.Random) -> str:
    rest = rng.choice(IT_ABI) + digits(rng, 5) + digits(rng, 12)
    return it_cin(rest) + rest


BBAN: dict[str, Callable[[random.Random], str]] = {
    "DE": lambda r: r.choice(DE_BLZ) + digits(r, 10),
    "GB": lambda r: r.choice(GB_BANKS) + digits(r, 14),
    "FR": fr_bban,
    "ES": es_bban,
    "NL": lambda r: r.choice(NL_BANKS) + digits(r, 10),
    "IT": it_bban,
    "BR": lambda r: r.choice(BR_BANKS) + digits(r, 15) + r.choice("CP") + "1",
}


def gen_iban(ctx: Ctx, variant: str, idx: int) -> str:
    rng = ctx.rng
    country = variant.upper() if variant.upper() in BBAN else rng.choice(IBAN_COUNTRY[ctx.locale])
    iban = make_iban(country, BBAN[country](rng))
    assert len(iban) == IBAN_LENGTH[country], iban
    if variant == "compact" or rng.random() < 0.35:
        return iban
    return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))


# -------------------------------------------------------------------------- value: IP_ADDRESS

V6_PREFIXES = ("2001:db8", "2a02:{h}", "2600:{h}", "2406:{h}", "2804:{h}", "2a01:{h}")


def ipv4_public(rng: random.Random) -> str:
    while True:
        ip = ipaddress.IPv4Address(f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}")
        if ip.is_global:
            return str(ip)


def ipv6_random(rng: random.Random) -> ipaddress.IPv6Address:
    prefix = rng.choice(V6_PREFIXES).replace("{h}", f"{rng.randint(0x100, 0xffff):x}")
    groups = [int(g, 16) for g in prefix.split(":")]
    groups += [rng.randint(0, 0xffff) for _ in range(8 - len(groups))]
    start = rng.randint(2, 5)
    for i in range(start, start + rng.randint(2, 3)):
        groups[i] = 0
    return ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))


def gen_ip(ctx: Ctx, variant: str, idx: int) -> str:
    rng = ctx.rng
    if not variant:
        variant = rng.choices(("v4_public", "v4_doc", "v4_private", "v6_comp", "v6_full", "v6_link"),
                              (36, 20, 10, 18, 12, 4))[0]
    if variant == "v4_doc":
        return f"{rng.choice(('192.0.2', '198.51.100', '203.0.113'))}.{rng.randint(1, 254)}"
    if variant == "v4_private":
        return rng.choice((f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                           f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                           f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"))
    if variant == "v6_link":
        return f"fe80::{rng.randint(0, 0xffff):x}:{rng.randint(0, 0xffff):x}:{rng.randint(0x100, 0xffff):x}"
    if variant == "v6_comp":
        return ipv6_random(rng).compressed
    if variant == "v6_full":
        ip = ipv6_random(rng)
        return ip.exploded if rng.random() < 0.5 else ":".join(f"{int(g, 16):x}" for g in ip.exploded.split(":"))
    return ipv4_public(rng)


# ------------------------------------------------------------------------------ value: SECRET

PEM_KINDS = (  # (label, body prefix that real keys of that kind start with, body lines)
    ("RSA PRIVATE KEY", "MIIEpAIBAAKCAQEA", 6),
    ("PRIVATE KEY", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ", 6),
    ("EC PRIVATE KEY", "MHcCAQEEI", 3),
    ("OPENSSH PRIVATE KEY", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAA", 5),
)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt(rng: random.Random) -> str:
    header = {"alg": rng.choice(("HS256", "RS256")), "typ": "JWT"}
    iat = rng.randint(1_700_000_000, 1_760_000_000)
    payload = {"sub": digits(rng, 10), "iat": iat, "exp": iat + 3600, "scope": rng.choice(("read", "read write", "admin"))}
    parts = [b64url(json.dumps(x, separators=(",", ":")).encode()) for x in (header, payload)]
    return ".".join([*parts, b64url(rng.randbytes(32))])


def pem(rng: random.Random) -> str:
    label, prefix, lines = rng.choice(PEM_KINDS)
    width = 70 if label.startswith("OPENSSH") else 64
    size = width * lines - rng.randint(5, 30)
    size -= size % 4 == 1  # a base64 body is never 1 (mod 4) long
    body = prefix + chars(rng, B64, size - len(prefix))
    body += "=" * (-len(body) % 4)
    rows = [body[i:i + width] for i in range(0, len(body), width)]
    return "\n".join([f"-----BEGIN {label}-----", *rows, f"-----END {label}-----"])


def password(rng: random.Random) -> str:
    words = ("Sunflower", "Tr0ub4dor", "Kaffee", "Soleil", "Saudade", "Monsoon", "Pixel", "Falcon", "S3cr3t", "Winter")
    return rng.choice((
        lambda: rng.choice(words) + digits(rng, rng.randint(2, 4)) + rng.choice("!#$%&*?"),
        lambda: chars(rng, ALNUM + "!#%&*", rng.randint(10, 16)) + rng.choice(string.digits),
        lambda: rng.choice(words).lower() + rng.choice("!#$%&*?") + chars(rng, string.ascii_lowercase, 1) + digits(rng, 2),
        lambda: "hunter" + digits(rng, 1) + chars(rng, string.ascii_lowercase, 2),
    ))()


SECRETS: dict[str, Callable[[random.Random], str]] = {
    "aws_id": lambda r: "AKIA" + chars(r, UPPER_ALNUM, 16),
    "aws_secret": lambda r: chars(r, ALNUM, 1) + chars(r, B64, 38) + chars(r, ALNUM, 1),
    "ghp": lambda r: "ghp_" + chars(r, ALNUM, 36),
    "github_pat": lambda r: "github_pat_" + chars(r, UPPER_ALNUM, 22) + "_" + chars(r, ALNUM, 59),
    "slack": lambda r: f"xoxb-{digits(r, 12)}-{digits(r, 13)}-{chars(r, ALNUM, 24)}",
    "sk_long": lambda r: "sk-" + chars(r, ALNUM, 20) + "T3BlbkFJ" + chars(r, ALNUM, 20),
    "sk_short": lambda r: "sk-" + chars(r, ALNUM, r.randint(20, 32)),
    "sk_proj": lambda r: "sk-proj-" + chars(r, B64URL, 40) + "T3BlbkFJ" + chars(r, ALNUM, 40),
    "stripe": lambda r: "sk_live_" + chars(r, ALNUM, 24),
    "jwt": jwt,
    "bearer": lambda r: jwt(r) if r.random() < 0.3 else chars(r, ALNUM, r.randint(28, 44)),
    "pem": pem,
    "password": password,
    "apikey": lambda r: r.choice((chars(r, "0123456789abcdef", 32), chars(r, ALNUM, 40))),
    "google": lambda r: "AIza" + chars(r, B64URL, 34) + chars(r, ALNUM, 1),
}
BARE_SECRETS = ("aws_id", "ghp", "github_pat", "slack", "sk_long", "sk_short", "sk_proj", "stripe", "jwt", "google")


def gen_secret(ctx: Ctx, variant: str, idx: int) -> str:
    return SECRETS[variant or ctx.deal("SECRET", BARE_SECRETS)](ctx.rng)


# --------------------------------------------------------------------------------- value: URL


def url_creds(ctx: Ctx) -> str:
    r = ctx.rng
    user = r.choice(("deploy", "admin", "ci-bot", "svc_backup", fold(ctx.persona().first).lower()))
    host = r.choice(("git.corp.io", "gitlab.example.com", "registry.example.net", "nexus.example.org"))
    path = r.choice(("/team/app.git", "/v2/", "/repository/maven-releases/", "/platform/infra.git"))
    return f"https://{user}:{chars(r, ALNUM, r.randint(10, 16))}@{host}{path}"


def url_dsn(ctx: Ctx) -> str:
    r = ctx.rng
    pw = chars(r, ALNUM, r.randint(12, 18))
    return r.choice((
        f"postgresql://app_user:{pw}@db.example.internal:5432/orders",
        f"mongodb+srv://admin:{pw}@cluster0.{chars(r, string.ascii_lowercase + string.digits, 5)}.mongodb.net/prod",
        f"redis://:{pw}@cache.example.com:6379/0",
        f"mysql://root:{pw}@10.0.{r.randint(0, 9)}.{r.randint(2, 250)}:3306/shop",
    ))


def url_profile(ctx: Ctx, site: str, idx: int) -> str:
    p, r = ctx.persona(idx), ctx.rng
    f, last = fold(p.first).lower(), fold(p.last).lower().replace("-", "")
    if site == "linkedin":
        tail = r.choice((f"{f}-{last}-{digits(r, 4)}", f"{f}-{last}-{chars(r, '0123456789abcdef', 8)}", f"{f}{last}"))
        return f"https://{r.choice(('www.', ''))}linkedin.com/in/{tail}"
    if r.random() < 0.3:
        return f"https://www.facebook.com/profile.php?id=1000{digits(r, 11)}"
    return f"https://www.facebook.com/{f}.{last}.{digits(r, r.randint(2, 4))}"


URLS: dict[str, Callable[[random.Random], str]] = {
    "token": lambda r: f"https://{r.choice(('app.example.com/invite', 'portal.contoso.com/verify', 'example.org/unsubscribe'))}?token={chars(r, ALNUM, 32)}",
    "api_key": lambda r: f"https://api.example.com/v1/{r.choice(('forecast?city=berlin', 'geocode?q=paris', 'rates?base=EUR'))}&api_key={chars(r, '0123456789abcdef', 32)}&units=metric",
    "access_token": lambda r: f"https://{r.choice(('graph.example.com/me?fields=id&', 'dashboard.example.net/embed?'))}access_token=EAAG{chars(r, ALNUM, 56)}",
    "signed": lambda r: r.choice((
        f"https://files.example.com/s/{chars(r, ALNUM, 32)}/Q3-report.pdf",
        f"https://drive.example.com/file/d/1{chars(r, B64URL[:-2] + '_', 32)}/view",
        f"https://share.contoso.com/download/{chars(r, ALNUM, 40)}?dl=1",
    )),
    "s3": lambda r: (
        f"https://reports-bucket.s3.amazonaws.com/exports/q3.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential=AKIA{chars(r, UPPER_ALNUM, 16)}%2F2024{r.randint(10, 12)}{r.randint(10, 28)}%2Fus-east-1%2Fs3%2Faws4_request"
        f"&X-Amz-Expires=3600&X-Amz-Signature={chars(r, '0123456789abcdef', 64)}"
    ),
    "reset": lambda r: f"https://accounts.example.com/reset-password/{chars(r, ALNUM, 40)}",
    "zoom": lambda r: f"https://us0{r.randint(2, 6)}web.zoom.us/j/{r.randint(1, 9)}{digits(r, 10)}?pwd={chars(r, ALNUM, 32)}",
    "webhook": lambda r: f"https://hooks.slack.com/services/T{chars(r, UPPER_ALNUM, 8)}/B{chars(r, UPPER_ALNUM, 10)}/{chars(r, ALNUM, 24)}",
    "session": lambda r: f"https://shop.example.com/cart;jsessionid={chars(r, '0123456789ABCDEF', 32)}?step=pay",
}


def gen_url(ctx: Ctx, variant: str, idx: int) -> str:
    rng = ctx.rng
    if not variant:
        variant = ctx.deal("URL", (*sorted(URLS), "creds", "dsn", "linkedin", "facebook"))
    if variant == "creds":
        return url_creds(ctx)
    if variant == "dsn":
        return url_dsn(ctx)
    if variant in ("linkedin", "facebook"):
        return url_profile(ctx, variant, idx)
    return URLS[variant](rng)


# ---------------------------------------------------------------- value: national identifiers

NINO_FIRST = "ABCEGHJKLMNOPRSTWXYZ"
NINO_SECOND = "ABCEGHJKLMNPRSTWXYZ"
NINO_BAD = frozenset(("BG", "GB", "KN", "NK", "NT", "TN", "ZZ"))
PAN_HOLDER = "PCHFATBLJG"


def gen_ssn(ctx: Ctx, variant: str, idx: int) -> str:
    r = ctx.rng
    area = r.choice([a for a in range(1, 900) if a != 666])
    parts = (f"{area:03d}", f"{r.randint(1, 99):02d}", f"{r.randint(1, 9999):04d}")
    sep = {"space": " ", "bare": ""}.get(variant, "-")
    return sep.join(parts)


def gen_nino(ctx: Ctx, variant: str, idx: int) -> str:
    r = ctx.rng
    while (prefix := r.choice(NINO_FIRST) + r.choice(NINO_SECOND)) in NINO_BAD:
        pass
    num, suffix = digits(r, 6), r.choice("ABCD")
    if variant == "compact":
        return f"{prefix}{num}{suffix}"
    return f"{prefix} {num[:2]} {num[2:4]} {num[4:]} {suffix}"


def gen_aadhaar(ctx: Ctx, variant: str, idx: int) -> str:
    r = ctx.rng
    partial = r.choice("23456789") + digits(r, 10)
    number = partial + verhoeff_digit(partial)
    if variant == "compact":
        return number
    sep = "-" if variant == "dash" else " "
    return sep.join(number[i:i + 4] for i in range(0, 12, 4))


def gen_pan(ctx: Ctx, variant: str, idx: int) -> str:
    r = ctx.rng
    holder = "C" if variant == "company" else r.choices(PAN_HOLDER, (70, 6, 4, 4, 3, 3, 3, 3, 2, 2))[0]
    initial = fold(ctx.persona(idx).last)[0].upper() if holder == "P" else r.choice(string.ascii_uppercase)
    return chars(r, string.ascii_uppercase, 3) + holder + initial + f"{r.randint(1, 9999):04d}" + r.choice(string.ascii_uppercase)


# ---------------------------------------------------------------------- value: DATE_OF_BIRTH

MONTHS = {
    "en": ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"),
    "de": ("Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September",
           "Oktober", "November", "Dezember"),
    "fr": ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre",
           "octobre", "novembre", "décembre"),
    "pt": ("janeiro", "fevereiro", "março", "abril", "maio", "junho", "julho", "agosto",
           "setembro", "outubro", "novembro", "dezembro"),
}


def dob_formats(y: int, m: int, d: int, locale: str) -> dict[str, str]:
    en = MONTHS["en"][m - 1]
    us = locale == "en-US"
    return {
        "long": f"{en} {d}, {y}" if us else f"{d} {en} {y}",
        "us_long": f"{en} {d}, {y}",
        "en_long": f"{d} {en} {y}",
        "ordinal": f"{d}{'th' if 10 <= d % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d % 10, 'th')} of {en} {y}",
        "slash": f"{m:02d}/{d:02d}/{y}" if us else (f"{d:02d}.{m:02d}.{y}" if locale == "de-DE" else f"{d:02d}/{m:02d}/{y}"),
        "us_slash": f"{m:02d}/{d:02d}/{y}",
        "gb_slash": f"{d:02d}/{m:02d}/{y}",
        "dash": f"{d:02d}-{m:02d}-{y}",
        "iso": f"{y}-{m:02d}-{d:02d}",
        "de_dot": f"{d:02d}.{m:02d}.{y}",
        "de_long": f"{d}. {MONTHS['de'][m - 1]} {y}",
        "fr_long": f"{'1er' if d == 1 else d} {MONTHS['fr'][m - 1]} {y}",
        "pt_long": f"{d} de {MONTHS['pt'][m - 1]} de {y}",
    }


def gen_dob(ctx: Ctx, variant: str, idx: int) -> str:
    r = ctx.rng
    y, m = r.randint(1948, 2006), r.randint(1, 12)
    d = r.randint(1, calendar.monthrange(y, m)[1])
    formats = dob_formats(y, m, d, ctx.locale)
    if variant == "native":
        variant = {"de": "de_long", "fr": "fr_long", "pt": "pt_long"}.get(ctx.lang, "long")
    if not variant:
        variant = r.choices(("long", "slash", "iso", "ordinal", "dash"), (40, 32, 18, 5, 5))[0]
    return formats[variant]


# ----------------------------------------------------------------------------- value: PERSON


def gen_person(ctx: Ctx, variant: str, idx: int) -> str:
    p = ctx.persona(idx)
    return {"first": p.first, "last": p.last}.get(variant, p.full)


# ---------------------------------------------------------------------------- value: ADDRESS

US_STREETS = ("Main Street", "Oak Avenue", "Maple Drive", "Amphitheatre Parkway", "Market Street",
              "Elm Street", "Sunset Boulevard", "Pine Street", "Lakeview Road", "Cedar Lane")
US_CITIES = (("Mountain View", "CA", "940"), ("Austin", "TX", "787"), ("Seattle", "WA", "981"),
             ("Brooklyn", "NY", "112"), ("Chicago", "IL", "606"), ("Denver", "CO", "802"),
             ("Boston", "MA", "021"), ("Portland", "OR", "972"), ("Miami", "FL", "331"))
GB_STREETS = ("Baker Street", "High Street", "Station Road", "Church Lane", "Victoria Road",
              "Mill Lane", "Queen's Road", "Park Avenue", "Albert Embankment")
GB_CITIES = (("London", ("NW1", "SE1", "E2", "N7", "SW4", "W1D")), ("Manchester", ("M1", "M4", "M20")),
             ("Leeds", ("LS1", "LS6")), ("Bristol", ("BS1", "BS8")), ("Edinburgh", ("EH1", "EH3")),
             ("Birmingham", ("B1", "B15")))
DE_STREETS = ("Hauptstraße", "Bahnhofstraße", "Lindenweg", "Gartenstraße", "Schillerstraße",
              "Goethestraße", "Bergstraße", "Am Markt", "Kastanienallee")
DE_CITIES = (("Berlin", 10115, 14199), ("München", 80331, 81929), ("Hamburg", 20095, 22769),
             ("Köln", 50667, 51149), ("Frankfurt am Main", 60306, 60599), ("Leipzig", 4103, 4357),
             ("Stuttgart", 70173, 70629))
FR_STREETS = ("rue de Rivoli", "rue de la Paix", "avenue des Champs-Élysées", "boulevard Haussmann",
              "rue du Faubourg Saint-Antoine", "place Bellecour", "rue de la République",
              "cours Mirabeau", "rue Sainte-Catherine", "allée des Tilleuls")
FR_CITIES = (("Paris", "750", 1, 20), ("Lyon", "6900", 1, 9), ("Marseille", "130", 1, 16),
             ("Bordeaux", "3300", 0, 0), ("Toulouse", "3100", 0, 0), ("Lille", "5900", 0, 0),
             ("Nantes", "4400", 0, 0))  # (city, postcode prefix, arrondissement range)
BR_STREETS = ("Rua Augusta", "Avenida Paulista", "Rua das Flores", "Rua Oscar Freire",
              "Avenida Atlântica", "Rua da Consolação", "Rua XV de Novembro", "Av. Sete de Setembro")
BR_CITIES = (("São Paulo", "SP", "01"), ("Rio de Janeiro", "RJ", "22"), ("Curitiba", "PR", "80"),
             ("Belo Horizonte", "MG", "30"), ("Salvador", "BA", "40"), ("Porto Alegre", "RS", "90"))
BR_AREAS = ("Centro", "Bela Vista", "Jardins", "Copacabana", "Savassi", "Moinhos de Vento")
IN_CITIES = (  # (city, PIN prefix, roads, localities)
    ("Bengaluru", "5600", ("MG Road", "Brigade Road", "Residency Road"), ("Indiranagar", "Koramangala")),
    ("Mumbai", "4000", ("Linking Road", "Hill Road", "SV Road"), ("Bandra West", "Andheri East")),
    ("Chennai", "6000", ("Anna Salai", "Usman Road"), ("T. Nagar", "Adyar")),
    ("Kolkata", "7000", ("Park Street", "Camac Street"), ("Salt Lake", "Ballygunge")),
    ("Pune", "4110", ("FC Road", "JM Road"), ("Shivajinagar", "Kothrud")),
    ("Hyderabad", "5000", ("Road No. 12", "Necklace Road"), ("Banjara Hills", "Jubilee Hills")),
    ("Gurugram", "1220", ("Sohna Road", "Golf Course Road"), ("Sector 15", "DLF Phase 2")),
)
GB_INWARD = "ABDEFGHJLNPQRSTUWXYZ"


def addr_us(r: random.Random) -> str:
    city, st, z = r.choice(US_CITIES)
    unit = r.choice(("", "", f", Apt {r.randint(1, 30)}{r.choice('ABCD')}", f", Suite {r.randint(1, 9)}00"))
    return f"{r.randint(1, 9999)} {r.choice(US_STREETS)}{unit}, {city}, {st} {z}{digits(r, 2)}"


def addr_gb(r: random.Random) -> str:
    city, outs = r.choice(GB_CITIES)
    num = f"{r.randint(1, 250)}{r.choice(('', '', 'A', 'B'))}"
    flat = r.choice(("", "", "", f"Flat {r.randint(1, 12)}, "))
    post = f"{r.choice(outs)} {r.randint(1, 9)}{r.choice(GB_INWARD)}{r.choice(GB_INWARD)}"
    return f"{flat}{num} {r.choice(GB_STREETS)}, {city} {post}"


def addr_de(r: random.Random) -> str:
    city, lo, hi = r.choice(DE_CITIES)
    return f"{r.choice(DE_STREETS)} {r.randint(1, 120)}{r.choice(('', '', 'a', 'b'))}, {r.randint(lo, hi):05d} {city}"


def addr_fr(r: random.Random) -> str:
    city, cp, lo, hi = r.choice(FR_CITIES)
    code = f"{cp}{r.randint(lo, hi):0{5 - len(cp)}d}"
    num = f"{r.randint(1, 150)}{r.choice(('', '', '', ' bis'))}"
    return f"{num} {r.choice(FR_STREETS)}, {code} {city}"


def addr_br(r: random.Random) -> str:
    city, uf, cep = r.choice(BR_CITIES)
    street, num = r.choice(BR_STREETS), r.randint(10, 2500)
    cep = f"{cep}{digits(r, 3)}-{digits(r, 3)}"
    return r.choice((
        f"{street} {num}, {city}",
        f"{street}, {num} - {r.choice(BR_AREAS)}, {city} - {uf}, {cep}",
        f"{street}, {num}, apto {r.randint(1, 20)}0{r.randint(1, 8)} - {city} - {uf}",
    ))


def addr_in(r: random.Random) -> str:
    city, pin, roads, areas = r.choice(IN_CITIES)
    road, area, pin = r.choice(roads), r.choice(areas), f"{pin}{digits(r, 2)}"
    return r.choice((
        f"{r.randint(1, 300)} {road}, {city} {pin}",
        f"Flat {r.randint(1, 12)}{r.choice('ABCD')}, {r.randint(1, 99)} {road}, {area}, {city} {pin}",
        f"House No. {r.randint(10, 999)}, {area}, {city} - {pin}",
    ))


ADDRESS_STYLE: dict[str, Callable[[random.Random], str]] = {
    "en-US": addr_us, "en-GB": addr_gb, "de-DE": addr_de, "fr-FR": addr_fr, "pt-BR": addr_br, "en-IN": addr_in,
}
ADDRESS_VARIANT = {"us": "en-US", "gb": "en-GB", "de": "de-DE", "fr": "fr-FR", "br": "pt-BR", "in": "en-IN"}


def gen_address(ctx: Ctx, variant: str, idx: int) -> str:
    return ADDRESS_STYLE[ADDRESS_VARIANT.get(variant, ctx.locale)](ctx.rng)


GENERATORS: dict[str, Callable[[Ctx, str, int], str]] = {
    "EMAIL": gen_email, "PHONE": gen_phone, "CREDIT_CARD": gen_card, "IBAN": gen_iban,
    "IP_ADDRESS": gen_ip, "SECRET": gen_secret, "URL": gen_url, "US_SSN": gen_ssn,
    "UK_NINO": gen_nino, "IN_AADHAAR": gen_aadhaar, "IN_PAN": gen_pan,
    "DATE_OF_BIRTH": gen_dob, "PERSON": gen_person, "ADDRESS": gen_address,
}
FILLERS: dict[str, Callable[[random.Random], str]] = {
    "weekday": lambda r: r.choice(("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")),
    "team": lambda r: r.choice(("design", "sales", "finance", "support", "marketing", "platform")),
}

# ---------------------------------------------------------------------------------- templates
# A template is English, or a (language, text) pair for de/fr/pt locales. Slots: {CAT}, {CAT2}
# (a second, different draw / persona), {CAT:variant}; {weekday} and {team} are plain fillers.

TEMPLATES: dict[str, list[str | tuple[str, str]]] = {
    "EMAIL": [
        "Can you help me write a polite follow-up? My email is {EMAIL} in case you need it for the signature.",
        "{EMAIL} — is this a professional enough address for job applications?",
        "Please send the weekly summary to {EMAIL}.",
        "I keep getting bounce messages when I send to {EMAIL}, what could be wrong?",
        "Draft an out-of-office reply that tells people to contact \"{EMAIL}\" while I'm away.",
        "My old account ({EMAIL}) got locked and support isn't answering. What should I do?",
        "Is it ok to put {EMAIL:obf_br} on my website so bots don't scrape it?",
        "Add a line at the bottom: questions go to {EMAIL:plus}",
        "Why does my gym app reject {EMAIL:plus} as invalid? The plus part is legit.",
        "my login is {EMAIL:upper} but the form says it doesnt exist",
        "I registered with {EMAIL:idn} and now half the sites I use can't handle the accents. Should I switch?",
        "Copying from my phone gave me this weird text: {EMAIL:fullwidth} — why does it look so wide?",
        "Reminder to myself: update the billing contact to {EMAIL:sub}.",
        "you can reach me at {EMAIL:obf_words} (spelled out to dodge spam)",
        "write me a 2-line bio for the conference site, contact: {EMAIL}",
        "Is {EMAIL:obf_par} readable enough for humans in a PDF?",
        "Hi, I'm {PERSON:full} ({EMAIL:persona}). I need help planning my week.",
        "Can you format this for my signature: {PERSON:full} | {EMAIL:persona} | {PHONE}",
        "Forward it to {EMAIL} and cc {EMAIL2}, thanks.",
        "My details got glued together when I pasted them: {EMAIL}{PHONE:intl}",
        "I was told to email {PERSON:first} at {EMAIL:persona} about the offer letter, can you draft something short?",
        "Update my profile: new email {EMAIL}, old one was {EMAIL2:upper}.",
        "Is my contact line ok? \"{EMAIL} / {PHONE}\"",
        "My manager {PERSON:full} wants reports at {EMAIL:persona} every {weekday}.",
        "{EMAIL:obf}, or call {PHONE} after 6pm",
        "contacts for the {team} offsite: {EMAIL},{EMAIL2:sub}",
        ("de", "Kannst du mir helfen, eine Antwort zu formulieren? Meine Adresse ist {EMAIL}."),
        ("de", "Bitte schick die Zusammenfassung an {EMAIL:idn}, danke!"),
        ("de", "Hallo, ich bin {PERSON:full}, erreichbar unter {EMAIL:persona}."),
        ("fr", "Pouvez-vous m'aider à rédiger un mail de relance ? Mon adresse : {EMAIL}"),
        ("fr", "Envoyez le compte rendu à {EMAIL:obf_br} s'il vous plaît."),
        ("fr", "Je suis {PERSON:full}, mon mail pro c'est {EMAIL:persona}."),
        ("pt", "Pode me ajudar a escrever um e-mail de cobrança? Meu endereço é {EMAIL:idn}."),
        ("pt", "Manda o relatório pro {EMAIL}, por favor."),
        ("pt", "Sou {PERSON:full}, meu e-mail é {EMAIL:persona} e meu celular {PHONE:national}."),
    ],
    "PHONE": [
        "My number is {PHONE}, can you remind me how to set up voicemail?",
        "Text me at {PHONE} when the report is ready.",
        "{PHONE} keeps calling me every day — is there a way to block it on Android?",
        "Write a short message to my landlord saying he can call me on {PHONE:national}.",
        "How do I format {PHONE:bare} properly for a business card?",
        "Is \"{PHONE:e164}\" the right way to store numbers in a spreadsheet?",
        "The courier needs a contact number, I gave them {PHONE:intl_dash}. Was that ok?",
        "My WhatsApp ({PHONE:intl}) isn't getting messages from my team.",
        "Call me back at {PHONE:nat_dot}",
        "For the emergency contact sheet: {PHONE}.",
        "I missed a call from {PHONE:idd}, should I ring back?",
        "Can you tell me the time zone for {PHONE:foreign}? I need to schedule a call.",
        "add a 'call me' line to my email footer with {PHONE:paren0}",
        "pls remind me to call the dentist, number is {PHONE:bare}",
        "Office: {PHONE:national}, mobile: {PHONE2:intl}. Which one should I put in my email signature?",
        "Hey it's {PERSON:first}, my new number is {PHONE} — please update the team sheet.",
        "Emergency contacts: {PERSON:full} {PHONE}, {PERSON2:full} {PHONE2}",
        "Put this in my calendar invite: dial-in {PHONE:intl}, organiser {EMAIL}",
        "Ship it to {ADDRESS}, phone {PHONE} for the driver.",
        "{PHONE:bare} is my number and {PERSON:first} is my name, does the booking form need anything else?",
        "My sister's number changed from {PHONE} to {PHONE2:foreign}, how do I update the family group?",
        ("de", "Ruf mich bitte unter {PHONE:national} an, wenn der Termin steht."),
        ("de", "Meine Handynummer ist {PHONE} – kannst du daraus eine Signatur machen?"),
        ("de", "Rückruf an {PERSON:full}, Tel. {PHONE:nat_dash}, wegen der Rechnung."),
        ("fr", "Mon numéro c'est le {PHONE:national}, rappelez-moi demain matin."),
        ("fr", "Vous pouvez joindre {PERSON:full}, de mon équipe, au {PHONE:intl}."),
        ("fr", "Ajoute mon portable {PHONE:nat_dot} à ma signature, merci."),
        ("pt", "Meu WhatsApp é {PHONE:national}, me chama lá."),
        ("pt", "Liga pra mim no {PHONE:nat_dash} depois das 18h."),
        ("pt", "Anota aí: {PERSON:first}, {PHONE:intl}, quer marcar reunião amanhã."),
    ],
    "PERSON": [
        "my name is {PERSON:full} and I need help with a cover letter",
        "I'm {PERSON:first}, new team lead, looking for tips on running my first one-on-one.",
        "Can you make this warmer? \"Hi {PERSON:first}, thanks for the notes yesterday. Let's sync on {weekday}.\"",
        "Draft a formal email starting with Dear Mr. {PERSON:last} to decline the offer.",
        "Proofread my sign-off please:\nThanks, {PERSON:first}",
        "Please end the email with:\nRegards,\n{PERSON:full}",
        "Quick haiku about Mondays?\n— {PERSON:first}",
        "call me {PERSON:first}, everyone does. Now, how do I stop procrastinating?",
        "I spoke with {PERSON:full} yesterday and they said the deadline moved. How do I tell my team?",
        "this is {PERSON:first} from billing, I need a template for overdue invoices",
        "My coworker {PERSON:full} keeps interrupting me in meetings. How do I handle it?",
        "How do I give feedback to {PERSON:first} without sounding harsh?",
        "{PERSON:full} here. Can you summarise the Pomodoro technique in three bullets?",
        "Should I list Dr. {PERSON:last} as a reference on my CV?",
        "Write a thank-you note to my mentor ({PERSON:full}) for the last six months.",
        "Is \"Dear Ms. {PERSON:last},\" too stiff for a startup?",
        "{PERSON:first} and {PERSON2:first} both want the same vacation week. How do I decide fairly?",
        "I'm {PERSON:full}, my manager is {PERSON2:full}. Help me ask for a raise.",
        "Hi {PERSON:first}, could you send the slides to {EMAIL}? Cheers, {PERSON2:first}",
        "Intro email: {PERSON:full} (design) meet {PERSON2:full} (engineering).",
        "Dear Mrs. {PERSON:last}, thank you for the interview.\nKind regards,\n{PERSON2:full}",
        "My name is {PERSON:full}, I live at {ADDRESS} and I need a letter disputing a parking fine.",
        ("de", "Ich heiße {PERSON:full} und brauche Hilfe bei meinem Lebenslauf."),
        ("de", "„Hallo {PERSON:first}, vielen Dank für deine Hilfe!“ – klingt das zu locker?"),
        ("de", "Bitte beende die Mail mit:\nMit freundlichen Grüßen\n{PERSON:full}"),
        ("de", "{PERSON:full} aus meinem Team antwortet nie auf Mails. Wie spreche ich das an?"),
        ("fr", "Je m'appelle {PERSON:full}, je cherche des conseils pour mieux gérer mon temps."),
        ("fr", "« Bonjour {PERSON:first}, merci pour votre retour. » — c'est assez poli ?"),
        ("fr", "Termine le message par :\nCordialement,\n{PERSON:full}"),
        ("fr", "J'ai parlé avec {PERSON:full} et {PERSON2:full} hier, comment résumer la réunion ?"),
        ("pt", "Meu nome é {PERSON:full} e preciso organizar minha rotina de estudos."),
        ("pt", "Escrevi isso pro meu chefe: \"Olá {PERSON:first}, segue o relatório.\" Tá formal o bastante?"),
        ("pt", "Assina assim:\nAbraços,\n{PERSON:first}"),
    ],
    "SECRET": [
        "why does boto3 say my key is invalid? I set AWS_ACCESS_KEY_ID={SECRET:aws_id}",
        "my ~/.aws/credentials has\naws_secret_access_key = {SECRET:aws_secret}\nis that the right format?",
        "git push fails with my token {SECRET:ghp}, what scopes do I need?",
        "Is this fine-grained token expired? {SECRET:github_pat}",
        "The Slack bot token {SECRET:slack} stopped working after I reinstalled the app.",
        "I get 401 from the OpenAI API with key {SECRET:sk_long}",
        "export OPENAI_API_KEY={SECRET:sk_short} — why isn't my script picking it up?",
        "new project keys look like {SECRET:sk_proj}, is that normal?",
        "Stripe keeps rejecting {SECRET:stripe} in test mode, why?",
        "can you decode this JWT for me? {SECRET:jwt}",
        "curl -H \"Authorization: Bearer {SECRET:bearer}\" https://api.example.com/v1/me returns 403, why?",
        "Here's my deploy key, why does ssh reject it?\n{SECRET:pem}",
        "Is this private key complete or truncated?\n{SECRET:pem}\nthanks",
        "{SECRET:pem}\n^ my CI says 'invalid format' for this key",
        "my router config says password={SECRET:password} — is that strong enough?",
        "config.yml has passwd: {SECRET:password} — should it be quoted?",
        "In my settings.py I have api_key=\"{SECRET:apikey}\" — how do I move this to an env var?",
        "Maps stopped loading, my key is {SECRET:google}",
        "I accidentally committed {SECRET} to a public repo. What do I do now?",
        "{SECRET} <- is this a valid token format?",
        "why won't docker compose read this .env?\nDB_HOST=db\nDB_PASSWORD={SECRET:password}",
        "the wifi password is {SECRET:password}, how do I share it with guests safely?",
        "is it bad that my key ({SECRET}) shows up in the browser console?",
        "Here's my .env:\nAWS_ACCESS_KEY_ID={SECRET:aws_id}\nAWS_SECRET_ACCESS_KEY={SECRET2:aws_secret}\nwhat's wrong with it?",
        "Rotating keys: old {SECRET:sk_long}, new {SECRET2:sk_proj}. Which one should be in prod?",
        "login for the shared laptop: user {EMAIL}, password: {SECRET:password}",
        "The webhook {URL:webhook} and bot token {SECRET:slack} both fail. Ideas?",
        "{PERSON:first} sent me the staging key {SECRET} over chat, is that a security problem?",
        "Compare these two tokens: {SECRET:ghp} vs {SECRET2:github_pat}",
        "requests.get(url, headers={\"Authorization\": \"Bearer {SECRET:bearer}\"}) works locally but not on {IP_ADDRESS}",
        ("de", "Mein Passwort ist {SECRET:password} – ist das sicher genug?"),
        ("de", "Ich habe aus Versehen meinen Schlüssel {SECRET} in Slack gepostet. Was nun?"),
        ("fr", "Mon mot de passe : {SECRET:password}, il faut le changer tous les combien ?"),
        ("fr", "J'ai collé ma clé {SECRET:sk_long} dans un ticket public, que faire ?"),
        ("pt", "Minha senha é {SECRET:password}, dá pra melhorar?"),
        ("pt", "Vazei o token {SECRET:ghp} no GitHub, e agora?"),
    ],
    "CREDIT_CARD": [
        "I was charged twice on my card {CREDIT_CARD}, how do I word a dispute?",
        "The checkout says {CREDIT_CARD} is invalid but it works everywhere else.",
        "card: {CREDIT_CARD}",
        "Should I save {CREDIT_CARD:amex} in my browser autofill?",
        "My subscription renewed on {CREDIT_CARD} without warning, help me write a refund request.",
        "Which budget category should purchases on {CREDIT_CARD:mc} go to?",
        "\"{CREDIT_CARD}\" is the number the hotel has on file, can they charge it after checkout?",
        "the shop says {CREDIT_CARD:discover} is not supported, is Discover rare in Europe?",
        "{CREDIT_CARD:bare} exp 09/27 — can I use it for a rental car deposit?",
        "Bill {PERSON:full}, card {CREDIT_CARD}, ship to {ADDRESS}",
        "I have two cards, {CREDIT_CARD:visa} and {CREDIT_CARD2:mc}. Which should I use for travel?",
        "Refund went to {CREDIT_CARD} instead of {IBAN}, what now?",
        "Order confirmation sent to {EMAIL}, paid with {CREDIT_CARD:amex}.",
        ("de", "Meine Kreditkarte {CREDIT_CARD} wurde doppelt belastet – wie formuliere ich die Reklamation?"),
        ("fr", "Ma carte {CREDIT_CARD} a été débitée deux fois, comment contester ?"),
        ("pt", "Meu cartão {CREDIT_CARD} foi cobrado duas vezes, como reclamo?"),
    ],
    "IBAN": [
        "My salary goes to {IBAN}, how do I set up an automatic savings transfer?",
        "Is {IBAN} the right format for a SEPA transfer?",
        "Please write an invoice footer with bank details: IBAN {IBAN}",
        "The client paid to {IBAN:compact} but the bank says the account doesn't exist.",
        "(IBAN: {IBAN}) — should this go on the invoice or in the email body?",
        "Can I give my landlord {IBAN} for the deposit refund or is that risky?",
        "{IBAN} is my new account, help me write a note to HR to update payroll.",
        "Wise asks for an IBAN, I have {IBAN:br} from my Brazilian bank, is that right?",
        "My Italian landlord sent {IBAN:it}, can I pay it from a UK account without fees?",
        "dutch freelancer invoice says pay to {IBAN:nl} within 14 days, is SEPA instant possible?",
        "Invoice to {PERSON:full}, {ADDRESS}, pay to {IBAN}",
        "Move money from {IBAN} to {IBAN2:es} every month, how do I automate it?",
        "Account holder: {PERSON:full}\nIBAN: {IBAN}\nEmail: {EMAIL}",
        ("de", "Bitte überweise die Miete auf {IBAN}, Verwendungszweck Mai."),
        ("de", "Meine IBAN lautet {IBAN} – brauche ich auch die BIC?"),
        ("fr", "Mon IBAN est {IBAN}, comment le donner à mon employeur ?"),
        ("fr", "Le locataire {PERSON:full} doit virer le loyer sur {IBAN:compact}, tu peux rédiger le rappel ?"),
        ("pt", "Meu IBAN é {IBAN}, serve pra receber do exterior?"),
    ],
    "IP_ADDRESS": [
        "my server is {IP_ADDRESS} and nginx returns 502",
        "connect from {IP_ADDRESS:v6_comp} fails but IPv4 works",
        "I got a login alert from {IP_ADDRESS}, is it me?",
        "Whitelist {IP_ADDRESS} in the firewall please — how do I write that rule?",
        "Is {IP_ADDRESS:v6_full} a valid address? It looks too long.",
        "The logs show repeated requests from {IP_ADDRESS:v4_public}:8443",
        "my home IP ({IP_ADDRESS}) changes every day, is that normal?",
        "ping {IP_ADDRESS:v4_private} works, but the printer is still offline",
        "{IP_ADDRESS:v4_doc} is what my ISP gave me, can I host a game server?",
        "Allow {IP_ADDRESS:v4_public} and {IP_ADDRESS2:v6_comp} on port 5432",
        "The attacker used {IP_ADDRESS} and emailed from {EMAIL}.",
        "Server {IP_ADDRESS}, key {SECRET:aws_id} — why does the deploy fail?",
        ("de", "Mein Server hat die IP {IP_ADDRESS}, aber die Domain zeigt noch auf die alte."),
        ("fr", "J'ai une alerte de connexion depuis {IP_ADDRESS}, c'est normal ?"),
        ("pt", "Meu servidor {IP_ADDRESS} tá fora do ar desde ontem."),
    ],
    "URL": [
        "Can you check why this link gives 403? {URL:signed}",
        "my CI clones from {URL:creds} and started failing today",
        "Is it safe to share {URL:token} with a client?",
        "The dashboard link is {URL:access_token} — can I bookmark it?",
        "here's my LinkedIn: {URL:linkedin} — what should I improve in the headline?",
        "Found my old profile {URL:facebook}, how do I delete it?",
        "Join via {URL:zoom}",
        "Password reset link: {URL:reset} — it says expired, why?",
        "our monitoring posts to {URL:webhook}, can you make the message format nicer?",
        "Connection string is {URL:dsn}, but the client says authentication failed.",
        "Download from {URL:s3} stops at 99%.",
        "fetch('{URL:api_key}') returns CORS errors",
        "why does the checkout page ({URL:session}) log me out?",
        "I'm {PERSON:full}, see {URL:linkedin} — can you write a short bio for a conference?",
        "Two links from my manager: {URL:signed} and {URL2:token}. Which one is the final deck?",
        "Share {URL:reset} with {EMAIL}? or is that bad practice",
        "My portfolio: {URL:linkedin}, email {EMAIL:persona}, phone {PHONE}.",
        ("de", "Hier ist mein Profil: {URL:linkedin} – kannst du meinen Titel verbessern?"),
        ("fr", "Le lien de partage {URL:signed} ne marche plus, pourquoi ?"),
        ("pt", "Esse link {URL:token} é seguro pra mandar no grupo?"),
    ],
    "US_SSN": [
        "my SSN is {US_SSN}, do I need it on the W-4?",
        "Is it safe to give my social security number ({US_SSN}) to a landlord?",
        "SSN: {US_SSN} — the form keeps rejecting it.",
        "social security number {US_SSN:space} was entered wrong on my paystub, how do I fix it?",
        "Should I write {US_SSN} on the job application or leave it blank?",
        "I think someone used my SSN {US_SSN} to open a credit card. What steps now?",
        "\"{US_SSN:bare}\" — my tax software says this SSN is invalid, but it's mine",
        "The bank asked for my social security number over email and I replied with {US_SSN}. Was that a mistake?",
        "Name: {PERSON:full}, SSN {US_SSN}, DOB {DATE_OF_BIRTH:us_slash}. Help me fill the form.",
        "my SSN is {US_SSN} and my address is {ADDRESS} — write a letter to the IRS.",
        "{PERSON:first} here, SSN {US_SSN}, phone {PHONE}",
    ],
    "UK_NINO": [
        "My National Insurance number is {UK_NINO}, where do I put it on the form?",
        "NI number: {UK_NINO:compact}",
        "HMRC letter lists {UK_NINO} as my NINO but mine is different, what do I do?",
        "Is it ok to email my NINO ({UK_NINO}) to a new employer?",
        "my ni no is {UK_NINO:compact} and the payroll system wont accept it",
        "Write a note to payroll: please update my NI number to {UK_NINO}.",
        "{UK_NINO} — is this the right format for a national insurance number?",
        "Umbrella company asked for national insurance no. I sent {UK_NINO:compact}. Safe?",
        "{PERSON:full}, NI {UK_NINO}, {ADDRESS}",
        "National Insurance {UK_NINO}, phone {PHONE}, can you draft an email to HMRC?",
    ],
    "IN_AADHAAR": [
        "my aadhaar number is {IN_AADHAAR}, how do I link it to my bank?",
        "Aadhaar: {IN_AADHAAR:compact}",
        "Should I share my aadhaar {IN_AADHAAR} with a new landlord?",
        "The UIDAI site says aadhaar {IN_AADHAAR} is not linked to my mobile.",
        "My Aadhaar card ({IN_AADHAAR}) has my name misspelled, how do I correct it?",
        "aadhaar no {IN_AADHAAR:compact} — can you help fill the KYC form?",
        "Employer wants aadhaar for PF, I gave {IN_AADHAAR:dash}. Is that normal?",
        "{IN_AADHAAR} is my aadhaar — is it safe to store in a notes app?",
        "For KYC: aadhaar {IN_AADHAAR}, PAN {IN_PAN}",
        "Name {PERSON:full}, aadhaar {IN_AADHAAR}, mobile {PHONE}",
        "Aadhaar {IN_AADHAAR:compact} and address {ADDRESS} — draft a request letter.",
    ],
    "IN_PAN": [
        "my PAN is {IN_PAN}, do I need to file ITR this year?",
        "PAN card {IN_PAN} shows the wrong name spelling, how to fix?",
        "Is {IN_PAN} a valid PAN format?",
        "The bank rejected PAN {IN_PAN} for KYC.",
        "PAN: {IN_PAN}",
        "My CA asked for my PAN, sent {IN_PAN} on WhatsApp. Ok?",
        "Help me write a mail to HR with PAN {IN_PAN} for Form 16.",
        "({IN_PAN}) is my PAN, how do I link it to aadhaar?",
        "PAN {IN_PAN}, DOB {DATE_OF_BIRTH:gb_slash}, name {PERSON:full}",
        "Company PAN {IN_PAN:company}, contact {EMAIL}",
        "PAN {IN_PAN} aadhaar {IN_AADHAAR:compact} — linking fails",
    ],
    "DATE_OF_BIRTH": [
        "I was born on {DATE_OF_BIRTH:long}, how many days until I turn 40?",
        "DOB: {DATE_OF_BIRTH:slash}",
        "My date of birth {DATE_OF_BIRTH:iso} is wrong on my insurance card.",
        "my birthday is {DATE_OF_BIRTH:us_long}, which zodiac sign am I?",
        "I'm turning 50 soon (born {DATE_OF_BIRTH}). Help me plan a retirement savings check.",
        "The form wants date of birth as YYYY-MM-DD: is {DATE_OF_BIRTH:iso} right?",
        "born {DATE_OF_BIRTH} — am I eligible for the senior discount?",
        "d.o.b. {DATE_OF_BIRTH:slash}, need to renew my passport, what docs?",
        "I was born on the {DATE_OF_BIRTH:ordinal}, is that a lucky day?",
        "Patient intake: {PERSON:full}, DOB {DATE_OF_BIRTH}, phone {PHONE}",
        "My daughter {PERSON:first} was born {DATE_OF_BIRTH:long}, what vaccines are due?",
        "Name {PERSON:full}, born {DATE_OF_BIRTH:dash}, lives at {ADDRESS}",
        ("de", "Geburtsdatum: {DATE_OF_BIRTH:de_dot}"),
        ("de", "Ich bin am {DATE_OF_BIRTH:native} geboren – wann kann ich in Rente gehen?"),
        ("fr", "Je suis né le {DATE_OF_BIRTH:native}, à quel âge puis-je partir à la retraite ?"),
        ("fr", "Date de naissance : {DATE_OF_BIRTH:gb_slash}"),
        ("pt", "Nasci em {DATE_OF_BIRTH:native}, quando posso me aposentar?"),
        ("pt", "Data de nascimento: {DATE_OF_BIRTH:gb_slash}, nome {PERSON:full}"),
    ],
    "ADDRESS": [
        "Ship to {ADDRESS}, please write a delivery note.",
        "My new address is {ADDRESS}. Help me write a change-of-address email.",
        "Is this formatted right for an envelope: {ADDRESS}",
        "The parcel went to {ADDRESS} instead of my office. Who do I contact?",
        "I live at {ADDRESS} and the noise from the construction site is unbearable, draft a complaint.",
        "Add this to my invoice template: {ADDRESS}",
        "{ADDRESS} — how long would it take to cycle from there to the station?",
        "Our office moved to \"{ADDRESS}\", update the footer please.",
        "Please send the signed contract to: {ADDRESS}",
        "Return label: {PERSON:full}, {ADDRESS}, {PHONE}",
        "Meet at {ADDRESS} — I'm {PERSON:first}, I'll be wearing a red jacket.",
        "From {ADDRESS} to {ADDRESS2}: what's the cheapest moving option?",
        ("de", "Meine neue Adresse: {ADDRESS}. Kannst du eine Ummeldung formulieren?"),
        ("fr", "J'habite au {ADDRESS}, comment écrire une lettre au syndic ?"),
        ("pt", "Moro na {ADDRESS}, como peço segunda via da conta de luz?"),
    ],
}

SLOT_RE = re.compile(r"\{([A-Z_]+?)(2?)(?::([a-z0-9_]+))?\}|\{([a-z]+)\}")


def template_lang(t: str | tuple[str, str]) -> tuple[str, str]:
    return ("en", t) if isinstance(t, str) else t


def entity_slots(text: str) -> int:
    return sum(1 for m in SLOT_RE.finditer(text) if m.group(1))


def render(ctx: Ctx, text: str) -> tuple[str, list[tuple[int, str, str]]]:
    """Fill a template; return the text and its (offset, category, value) entities."""
    out: list[str] = []
    found: list[tuple[int, str, str]] = []
    pos = length = 0
    for m in SLOT_RE.finditer(text):
        out.append(text[pos:m.start()])
        length += m.start() - pos
        if m.group(4):
            value = FILLERS[m.group(4)](ctx.rng)
        else:
            cat, idx = m.group(1), 2 if m.group(2) else 0
            value = GENERATORS[cat](ctx, m.group(3) or "", idx)
            found.append((length, cat, value))
        out.append(value)
        length += len(value)
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), found


def bounded(text: str, value: str) -> bool:
    """Each occurrence of value is a whole token: no letter/digit glued on its alnum ends."""
    start = 0
    while (i := text.find(value, start)) != -1:
        before, after = text[i - 1:i], text[i + len(value):i + len(value) + 1]
        if (value[0].isalnum() and before.isalnum()) or (value[-1].isalnum() and after.isalnum()):
            return False
        start = i + 1
    return True


def make_event(rng: random.Random, decks: dict, locale: str, lang: str, text: str) -> dict | None:
    ctx = Ctx(rng, locale, lang, decks)
    rendered, found = render(ctx, text)
    entities, seen = [], set()
    for _, cat, value in sorted(found):
        if (cat, value) not in seen:
            seen.add((cat, value))
            entities.append({"category": cat, "value": value})
    if not all(bounded(rendered, e["value"]) for e in entities):
        return None  # e.g. the name "Mei" inside "Meine": redraw
    return {"locale": locale, "text": rendered, "entities": entities}


class Picker:
    """Deals templates from shuffled decks, so every template of a pool gets used."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.decks: dict[tuple, list[int]] = {}

    def deal(self, key: tuple, indices: list[int]) -> int:
        deck = self.decks.setdefault(key, [])
        if not deck:
            deck.extend(indices)
            self.rng.shuffle(deck)
        return deck.pop()


def choose_template(rng: random.Random, picker: Picker, cat: str, locale: str) -> int:
    templates = [template_lang(t) for t in TEMPLATES[cat]]
    native = LANG.get(locale)
    lang = native if native and any(t[0] == native for t in templates) and rng.random() < NATIVE_SHARE else "en"
    multi = rng.random() < MULTI_SHARE
    pool = [i for i, (tl, tx) in enumerate(templates) if tl == lang and (entity_slots(tx) > 1) == multi]
    if not pool:
        pool = [i for i, (tl, _) in enumerate(templates) if tl == lang]
    return picker.deal((cat, lang, multi), pool)


def locale_deck(rng: random.Random, cat: str) -> list[str]:
    if cat in FIXED_LOCALE:
        return [FIXED_LOCALE[cat]] * TARGET[cat]
    deck: list[str] = []
    while len(deck) < TARGET[cat]:
        deck.extend(rng.sample(LOCALES, len(LOCALES)))
    return deck[:TARGET[cat]]


def build_pii(rng: random.Random) -> tuple[list[dict], Counter]:
    picker, events, used, decks = Picker(rng), [], Counter(), {}
    for cat in CATEGORIES:
        for locale in locale_deck(rng, cat):
            idx = choose_template(rng, picker, cat, locale)
            lang, text = template_lang(TEMPLATES[cat][idx])
            for _ in range(50):
                event = make_event(rng, decks, locale, lang, text)
                if event:
                    break
            else:
                raise RuntimeError(f"could not render {cat} template {idx}: {text!r}")
            events.append(event)
            used[(cat, idx)] += 1
    rng.shuffle(events)
    return [{"id": f"pii-{i:04d}", **e} for i, e in enumerate(events, 1)], used


# ------------------------------------------------------------------------------ clean events


def isbn13(r: random.Random) -> str:
    body = "978" + digits(r, 9)
    check = (10 - sum(int(c) * (1 if i % 2 == 0 else 3) for i, c in enumerate(body)) % 10) % 10
    return f"{body[:3]}-{body[3]}-{body[4:6]}-{body[6:12]}-{check}"


def usd(r: random.Random) -> str:
    return f"${r.randint(5, 2500) + r.choice((0.99, 0.49, 0.0, 0.95)):,.2f}"


DEVICES = ("iPhone 15 Pro", "MacBook Air M2", "Kindle Paperwhite", "Pixel 8", "Galaxy S24",
           "iPad Air", "ThinkPad X1 Carbon", "Apple Watch", "Raspberry Pi 5", "Surface Pro 9")
APPS = ("Windows 11", "PostgreSQL 15", "GPT-4o", "Google Docs", "Notion", "Excel", "Google Sheets",
        "Jira", "Trello", "Slack", "Zoom", "Microsoft Teams", "Obsidian", "Todoist", "VS Code",
        "Figma", "Asana", "Outlook", "Miro", "Airtable", "Ubuntu 24.04", "Evernote")
WIKI = ("Pomodoro_Technique", "Eisenhower_matrix", "Getting_Things_Done", "Parkinson%27s_law",
        "Timeboxing", "Kanban_(development)", "SMART_criteria", "Pareto_principle")
SEARCH_WORDS = ("hello", "habit+tracker", "weekly+review", "standing+desk", "okr+examples", "deep+work")

CLEAN_FILL: dict[str, Callable[[random.Random], str]] = {
    "py": lambda r: f"3.{r.randint(8, 13)}.{r.randint(0, 12)}",
    "node": lambda r: f"{r.choice((18, 20, 22, 24))}.{r.randint(0, 20)}.{r.randint(0, 9)}",
    "semver": lambda r: f"{r.randint(0, 9)}.{r.randint(0, 30)}.{r.randint(0, 20)}",
    "d": lambda r: str(r.randint(2, 9)),
    "d2": lambda r: str(r.randint(10, 40)),
    "n2": lambda r: str(r.randint(10, 99)),
    "n3": lambda r: str(r.randint(100, 999)),
    "n4": lambda r: str(r.randint(1000, 9999)),
    "n5": lambda r: str(r.randint(10000, 99999)),
    "n6": lambda r: str(r.randint(100000, 999999)),
    "thousands": lambda r: r.choice((f"{r.randint(1, 9)},000,000", f"{r.randint(10, 999)},000", f"{r.randint(1, 99)},{r.randint(100, 999)}")),
    "epoch": lambda r: str(r.randint(1_600_000_000, 1_760_000_000)),
    "isbn": isbn13,
    "iso": lambda r: f"{r.randint(2023, 2026)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
    "ddmm": lambda r: f"{r.randint(1, 28):02d}/{r.randint(1, 12):02d}",
    "dedate": lambda r: f"{r.randint(1, 28):02d}.{r.randint(1, 12):02d}.{r.randint(2024, 2026)}",
    "hhmm": lambda r: f"{r.randint(7, 19):02d}:{r.choice((0, 15, 30, 45)):02d}",
    "hhmmss": lambda r: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}",
    "mmss": lambda r: f"{r.randint(20, 35)}:{r.randint(0, 59):02d}",
    "h": lambda r: str(r.randint(7, 11)),
    "q": lambda r: str(r.randint(1, 4)),
    "year": lambda r: str(r.randint(2024, 2027)),
    "month": lambda r: r.choice(MONTHS["en"]),
    "frmonth": lambda r: r.choice(MONTHS["fr"]),
    "day": lambda r: str(r.randint(1, 28)),
    "weekday": FILLERS["weekday"],
    "usd": usd,
    "eur": lambda r: str(r.randint(5, 900)),
    "gbp": lambda r: f"{r.randint(5, 80)}.{r.choice(('00', '50', '99'))}",
    "brl": lambda r: f"{r.randint(10, 999)},{r.choice(('90', '00', '99'))}",
    "inr": lambda r: f"{r.randint(1, 99)},{r.randint(100, 999)}",
    "sha7": lambda r: chars(r, "0123456789abcdef", 7),
    "sha40": lambda r: chars(r, "0123456789abcdef", 40),
    "hex8": lambda r: chars(r, "0123456789ABCDEF", 8),
    "hex64": lambda r: chars(r, "0123456789abcdef", 64),
    "uuid": lambda r: "-".join((chars(r, "0123456789abcdef", 8), chars(r, "0123456789abcdef", 4),
                                "4" + chars(r, "0123456789abcdef", 3), r.choice("89ab") + chars(r, "0123456789abcdef", 3),
                                chars(r, "0123456789abcdef", 12))),
    "device": lambda r: r.choice(DEVICES),
    "device2": lambda r: r.choice(DEVICES),
    "app": lambda r: r.choice(APPS),
    "app2": lambda r: r.choice(APPS),
    "django": lambda r: r.choice(("3.2", "4.2", "5.0", "5.1")),
    "pg": lambda r: str(r.randint(12, 17)),
    "go": lambda r: f"1.{r.randint(20, 24)}.{r.randint(0, 9)}",
    "rust": lambda r: f"1.{r.randint(70, 86)}.{r.randint(0, 2)}",
    "days": lambda r: (lambda d: f"{d}–{d + r.randint(1, 3)}")(r.randint(1, 25)),
    "hours": lambda r: (lambda h: f"{h}–{h + r.randint(1, 3)}")(r.randint(7, 15)),
    "wiki": lambda r: r.choice(WIKI),
    "q_word": lambda r: r.choice(SEARCH_WORDS),
    "team": FILLERS["team"],
}

CLEAN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "version": (
        "I upgraded to python {py} and now my virtualenv is broken, how do I rebuild it?",
        "Should I pin node {node} or move to the next LTS?",
        "The changelog for v{semver}-rc{d} mentions a breaking change, what does that mean for me?",
        "pip install torch=={semver} fails with 'no matching distribution'.",
        "Our app is on {semver}; is a bug fix a patch bump?",
        "Is it worth moving from Django {django} to the newest release?",
        "Release notes for {semver} are empty, should I still upgrade?",
        "go {go} vs rust {rust} for a small CLI tool?",
        "Which is newer, v{semver} or v{semver}-beta.{d}?",
        "My laptop runs Ubuntu 22.04 with kernel 6.{d}.{d2}, will the driver work?",
    ),
    "number": (
        "We hit {thousands} users last month, how do I celebrate with the team?",
        "dwell time is {n5} ms on average, is that good for a landing page?",
        "What date is epoch {epoch}?",
        "order #{n5} hasn't shipped yet, how do I write a polite nudge?",
        "The book has ISBN {isbn}, how do I cite it in APA?",
        "I walked {thousands} steps this week, is that enough?",
        "Our budget is {thousands} for the year, split across 4 quarters.",
        "Room {n3} on floor {d} is booked for the retro.",
        "The CSV has {n6} rows and Excel crashes, alternatives?",
        "I have {n4} unread emails, help me triage them.",
        "page {n3} of the report has a typo, who fixes it?",
        "we shipped {n2} features and closed {n3} tickets this quarter",
    ),
    "date": (
        "the meeting is on {iso} at {hhmm}, can you draft the invite?",
        "due {ddmm} — how do I break this into daily tasks?",
        "Plan my goals for Q{q} {year}.",
        "Sprint review moved to {weekday}, {day} {month}.",
        "Is {month} {day} a good launch date, or too close to the holidays?",
        "Die Deadline ist am {dedate}, hilf mir bei einem Plan.",
        "Our lease ends on {iso}; when should I give notice?",
        "Between {month} and the end of Q{q} I want to read 6 books.",
        "La réunion est prévue le {day} {frmonth} à {hhmm}.",
        "A entrega é dia {ddmm}, me ajuda a organizar?",
        "The conference runs {month} {days}, {year}. Should I go?",
    ),
    "time": (
        "I start work at {hhmm} and lose focus by {hhmm}, any tips?",
        "Set a timer for {n2} minutes and remind me to stretch.",
        "Is {h}am too early for a standup across CET and IST?",
        "My 5k took {mmss}, how do I get faster?",
        "The log line says {hhmmss}, is that UTC?",
        "Convert {hhmm} UTC to Pacific time.",
        "Should I block {hours} for deep work every {weekday}?",
        "The call lasted 1h {n2}m, was that too long?",
        "What's a good bedtime if my alarm is at {hhmm}?",
    ),
    "price": (
        "Is {usd} too much for a standing desk?",
        "The course costs €{eur}, is it worth it?",
        "£{gbp}/month for a gym, help me decide.",
        "Custa R$ {brl}, vale a pena?",
        "₹{inr} for a coding bootcamp seems high, thoughts?",
        "Split {usd} between 3 people, how much each?",
        "{eur} € pro Monat für Software, ist das zu viel?",
        "Our tooling budget is ${n2}k, what should we cut?",
        "Is {usd} a fair price for a used {device}?",
    ),
    "product": (
        "Should I get the {device} or wait for the next one?",
        "{app} or {app2} for a team wiki?",
        "{app} keeps crashing on my {device}, any fix?",
        "Is {app} overkill for a 4-person team?",
        "How do I move my notes from {app} to {app2}?",
        "Any shortcuts in {app} that save time?",
        "Is {app} good for tracking habits?",
        "{device} vs {device2} for a student on a budget?",
        "My {device} battery drains fast when {app} is open.",
    ),
    "code": (
        "x = {n3}\nprint(x * 2)\nwhy does this print a number and not a string?",
        "SELECT id FROM users WHERE age > {n2}; returns nothing, why?",
        "git commit -m \"fix\" says nothing to commit",
        "what does `git cherry-pick {sha7}` do exactly?",
        "for i in range({n2}):\n    total += i\nprint(total)\nwhy is total undefined?",
        "df.groupby('team')['hours'].sum() gives NaN for one team",
        "ls -la | grep log | wc -l prints 0 but there are logs",
        "SELECT COUNT(*) FROM orders WHERE created_at >= '{iso}'; is slow, index?",
        "docker run -p 8080:80 nginx works but curl http://localhost:8080 hangs",
        "sorted(tasks, key=lambda t: t.priority) sorts backwards, how do I flip it?",
        "def add(a, b):\n    return a + b\n\nprint(add({n2}, {n3}))",
        "const total = items.reduce((a, b) => a + b, 0); returns NaN",
        "UPDATE tasks SET done = true WHERE id = {n4}; updated 0 rows",
        "git log --oneline | head -{n2}",
        "chmod 755 deploy.sh still says permission denied",
        "awk '{print $2}' report.txt | sort | uniq -c",
        "import re\nre.findall(r'\\d+', 'room {n3}, floor {d}')",
    ),
    "id": (
        "What's the difference between a UUID like {uuid} and a ULID?",
        "commit {sha40} broke the build, how do I revert it?",
        "Ticket PROJ-{n4} is blocked by a vendor, how do I escalate?",
        "PR #{n4} has been waiting for review for a week.",
        "Windows shows error code 0x{hex8}, what does it mean?",
        "build number {n5} failed on the lint step",
        "The image digest is sha256:{hex64}, how do I pin it?",
        "Invoice INV-{n5} was paid twice.",
        "tracking the bug as BUG-{n4}, what should the title say?",
        "request id {uuid} shows up in every failed call",
    ),
    "math": (
        "What is {n2} * {n3}?",
        "3.14159 * {d}, rounded to two decimals?",
        "Is 10^{d} more than a million?",
        "What's {n2}% of {n4}?",
        "sqrt({n3}) to one decimal?",
        "solve 2x + {n2} = {n3}",
        "What's the derivative of x^{d}?",
        "average of {n2}, {n3} and {n2}?",
        "convert {n2} km to miles",
        "{n2}/{n3} as a percentage?",
    ),
    "url": (
        "Is https://docs.python.org/3/library/re.html still the right reference for lookbehinds?",
        "https://example.com/search?q={q_word}&page={d} returns the same page twice",
        "Summarise https://en.wikipedia.org/wiki/{wiki} in three bullets.",
        "http://localhost:8080/api/health returns 503 after deploy",
        "Is https://github.com/psf/requests/issues/{n4} related to my timeout problem?",
        "https://developer.mozilla.org/en-US/docs/Web/JavaScript/Reference/Global_Objects/Array/map explains map, but what about flatMap?",
        "The docs at https://www.postgresql.org/docs/{pg}/sql-select.html mention LATERAL, what is it?",
        "Can you read https://pypi.org/project/phonenumbers/ and tell me if it supports Brazil?",
        "https://example.org/blog/{year}/productivity-tips?lang=en has a broken image",
        "Bookmark https://calendar.example.com/week?view=compact&start={iso} for me?",
    ),
}
# The literal examples the corpus brief names, kept verbatim; random fills top each kind up.
CLEAN_ANCHORS = (
    ("version", "I'm on python 3.11.2, is that too old for the course?"),
    ("version", "Our release v2.4.1-rc1 has been stuck in QA for a week."),
    ("version", "node 20.20.2 or the next LTS for a new project?"),
    ("number", "We just passed 1,000,000 users! Ideas for a thank-you post?"),
    ("number", "Analytics say dwell 120000 ms on the pricing page, is that even real?"),
    ("number", "What date is epoch 1713340444?"),
    ("number", "order #48213 arrived damaged, how do I ask for a replacement?"),
    ("number", "Cite ISBN 978-3-16-148410-0 in MLA style please."),
    ("date", "the meeting is on 2024-05-14 at 10:30, add it to my plan"),
    ("date", "Essay due 03/07, help me plan backwards."),
    ("date", "What should our Q3 2025 goals look like?"),
    ("price", "Is $1,299.99 too much for a laptop?"),
    ("price", "€45 a month for a coaching app, worth it?"),
    ("product", "iPhone 15 Pro vs Pixel 8 for photos?"),
    ("product", "Windows 11 or macOS for a junior developer?"),
    ("product", "Is PostgreSQL 15 fine for a side project, or should I use SQLite?"),
    ("product", "Can GPT-4o summarise a 40-page PDF?"),
    ("code", "x = 192\nprint(x // 2)"),
    ("code", "SELECT id FROM users WHERE age > 30"),
    ("code", "git commit -m \"fix\" is a bad message, what should I write instead?"),
    ("code", "pip install torch==2.13.0 hangs on my laptop"),
    ("id", "git show 3f9a2c4e8b1d07a6c5e4f3b2a1908d7c6b5a4f3e lists no files, why?"),
    ("id", "Is 9b2f4c1e-7a3d-4e8b-b6c5-2d1f0a9e8c7b a valid UUID v4?"),
    ("math", "3.14159 * 2 = ?"),
    ("math", "Is 10^6 a million?"),
    ("url", "https://docs.python.org/3/library/re.html is confusing, explain lookbehind simply?"),
    ("url", "Why does https://example.com/search?q=hello&page=2 show the same results as page 1?"),
    ("url", "My app at localhost:8080 shows a blank page after login."),
    ("time", "Remind me at 10:30 to stretch."),
)
PROSE = (
    "Will this work if I only study 20 minutes a day?",
    "May I ask how to prioritise when everything is urgent?",
    "Grace period on my library books ends Friday, remind me?",
    "Mark the task done once the review is in.",
    "Hope that helps, but how do I say it less formally?",
    "April showers bring May flowers, good opening line for a newsletter?",
    "We moved the team to Berlin and time zones are hard now.",
    "Google Docs keeps losing my comments.",
    "Our office in Sydney starts meetings when London is asleep.",
    "Is Monday or Tuesday better for a weekly review?",
    "Chase the invoice or wait another week?",
    "Summer in Lisbon or Porto for a remote work month?",
    "Amazon delivery was late again, how do I complain politely?",
    "Can you help me set three goals for this quarter?",
    "I feel stuck in my job, where do I start?",
    "Bill the client for the extra hours or let it go?",
    "Sunny days make me procrastinate more, is that a thing?",
    "Frank feedback from peers is hard to hear. How do I take it well?",
    "Joy comes from finishing things, but I never finish anything.",
    "Rose early today and still got nothing done.",
    "Summer Fridays: good idea for a small team?",
    "How do I say no to extra projects without looking lazy?",
    "Give me a morning routine that takes under 30 minutes.",
    "My team in Toronto and the one in Munich never overlap, ideas?",
    "Should we use Microsoft Teams or Slack for the whole company?",
    "Is it rude to decline a meeting without a reason?",
    "I keep hitting snooze. Any tricks that actually work?",
    "Wie plane ich meine Woche besser, wenn ich ständig unterbrochen werde?",
    "Kannst du mir helfen, Prioritäten für diesen Monat zu setzen?",
    "Comment arrêter de procrastiner le lundi matin ?",
    "Quels sont de bons objectifs pour une équipe de six personnes ?",
    "Como organizo meus estudos para o vestibular?",
    "Qual a melhor forma de pedir feedback para o meu gestor?",
    "Write a short motivational note for a team that missed its deadline.",
    "Patience is running out on this project. How do I reset expectations?",
    "Art classes on Thursday evenings, too much on top of work?",
    "The Dean's list requires a 3.5 GPA, is that realistic with a job?",
    "Victoria line delays make me late every week, how do I tell my boss?",
    "Faith in the roadmap is low after the reorg, what do I say at the all-hands?",
    "Summit planning: we have two days in Denver and twelve sessions.",
)

CLEAN_FORBIDDEN: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("email", re.compile(r"[\w.+-]@[\w-]|＠|\[at\]|\(at\)")),
    ("email-words", re.compile(r"\bat\b.*\bdot\b", re.S)),
    ("phone-plus", re.compile(r"\+\s?\(?\d")),
    ("dotted-quad", re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")),
    ("ipv6", re.compile(r"\b[0-9a-fA-F]{1,4}::[0-9a-fA-F]{1,4}\b|\b(?:[0-9a-fA-F]{1,4}:){4,}[0-9a-fA-F]{1,4}\b")),
    ("card-run", re.compile(r"(?<!\d)\d{13,19}(?!\d)")),
    ("digit-groups", re.compile(r"(?<!\d)\d{4}(?:[ -]\d{4}){2,}")),
    ("ssn", re.compile(r"(?<!\d)\d{3}[- ]\d{2}[- ]\d{4}(?!\d)")),
    ("pan", re.compile(r"\b[A-Z]{5}\d{4}[A-Z]\b")),
    ("nino", re.compile(r"\b[A-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,}")),
    ("secret", re.compile(r"\bsk-|sk_live|ghp_|github_pat_|xox[abposr]-|AKIA|AIza|eyJ|[Bb]earer\s|PRIVATE KEY")),
    ("secret-kv", re.compile(r"(?i)\b(?:password|passwd|pwd|secret|api[_-]?key|apikey|token|access_key)\b\s*[=:]")),
    ("url-secret", re.compile(r"(?i)\w+://\S*?(?:[^\s/:@]+:[^\s/@]+@|[?&;#](?:\w*token|api[_-]?key|key|secret|sig|signature|session|sessionid|jsessionid|sid|code|pwd|pass|password|auth)=)")),
    ("url-token-path", re.compile(r"/(?=[A-Za-z0-9_-]{24,})(?=[A-Za-z_-]*\d)(?=[0-9_-]*[A-Za-z])[A-Za-z0-9_-]{24,}")),
    ("profile", re.compile(r"linkedin\.com/in/|facebook\.com/")),
    ("birth", re.compile(r"(?i)\bborn\b|birth|\bDOB\b|d\.o\.b|geboren|geburt|\bnée?\b|naissance|nasci")),
    ("address", re.compile(r"\b\d{1,5}[A-Z]? (?:[A-Z][a-z]+ )+(?:Street|Road|Avenue|Lane|Drive|Parkway|Boulevard)\b|stra(?:ß|ss)e \d|\brue de\b|\bRua \w|\bMG Road")),
)
PHONE_GROUPS = re.compile(r"\(?\d+\)?(?:[ .-]\(?\d+\)?)+")
ALLOWED_GROUPS = (
    re.compile(r"\d{4}-\d{2}-\d{2}"),          # ISO date
    re.compile(r"\d{1,2}[./]\d{1,2}[./]\d{4}"),  # d.m.y date
    re.compile(r"\d+\.\d+"),                   # decimal
    re.compile(r"\d+\.\d+\.\d+"),              # version
    re.compile(r"978-\d-\d{2}-\d{6}-\d"),       # ISBN-13
)


def clean_problem(text: str) -> str | None:
    """Why a clean text looks like PII (None if it does not)."""
    for name, pattern in CLEAN_FORBIDDEN:
        if pattern.search(text):
            return name
    for m in PHONE_GROUPS.finditer(text):
        run = m.group()
        if sum(c.isdigit() for c in run) >= 7 and not any(p.fullmatch(run) for p in ALLOWED_GROUPS):
            return f"phone-like digit groups {run!r}"
    words = set(re.findall(r"[^\W\d_]+", text))
    if hit := words & ALL_NAME_WORDS:
        return f"person name {sorted(hit)}"
    return None


def fill_clean(rng: random.Random, text: str) -> str:
    """Fill {name} fillers (unknown braces, e.g. awk's, stay); one text never repeats a value."""
    used: set[str] = set()

    def fill(m: re.Match[str]) -> str:
        if m.group(1) not in CLEAN_FILL:
            return m.group(0)
        while (value := CLEAN_FILL[m.group(1)](rng)) in used:
            pass
        used.add(value)
        return value

    return re.sub(r"\{([a-z_0-9]+)\}", fill, text)


def build_clean(rng: random.Random) -> list[dict]:
    rows: list[dict] = []
    seen: set[str] = set()
    for kind in CLEAN_KINDS:
        if kind == "prose":
            texts = list(PROSE)
        else:
            texts, deck = [t for k, t in CLEAN_ANCHORS if k == kind], []
            seen.update(texts)
            for _ in range(CLEAN_PER_KIND * 50):
                if len(texts) == CLEAN_PER_KIND:
                    break
                if not deck:
                    deck = rng.sample(CLEAN_TEMPLATES[kind], len(CLEAN_TEMPLATES[kind]))
                text = fill_clean(rng, deck.pop())
                if text not in seen and not clean_problem(text):
                    texts.append(text)
                    seen.add(text)
        rows.extend({"kind": kind, "text": t} for t in texts)
    rng.shuffle(rows)
    return [{"id": f"clean-{i:04d}", **r} for i, r in enumerate(rows, 1)]


# ------------------------------------------------------------------------------------ checks

NINO_RE = re.compile(r"([A-Z]{2}) ?(\d{2}) ?(\d{2}) ?(\d{2}) ?([A-D])")
PAN_RE = re.compile(r"[A-Z]{3}[PCHFATBLJG][A-Z]\d{4}[A-Z]")


def ssn_ok(v: str) -> bool:
    m = re.fullmatch(r"(\d{3})[- ]?(\d{2})[- ]?(\d{4})", v)
    return bool(m) and m[1] not in ("000", "666") and not m[1].startswith("9") and m[2] != "00" and m[3] != "0000"


def nino_ok(v: str) -> bool:
    m = NINO_RE.fullmatch(v)
    return bool(m) and m[1][0] in NINO_FIRST and m[1][1] in NINO_SECOND and m[1] not in NINO_BAD


def aadhaar_ok(v: str) -> bool:
    d = re.sub(r"[ -]", "", v)
    return bool(re.fullmatch(r"[2-9]\d{11}", d)) and verhoeff_ok(d)


def card_ok(v: str) -> bool:
    d = re.sub(r"[ -]", "", v)
    brand = re.match(r"4|5[1-5]|3[47]|6011", d)
    return d.isdigit() and 13 <= len(d) <= 19 and bool(brand) and luhn_ok(d)


def iban_value_ok(v: str) -> bool:
    c = v.replace(" ", "")
    return IBAN_LENGTH.get(c[:2]) == len(c) and iban_ok(c)


def ip_ok(v: str) -> bool:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return False
    return True


OBFUSCATED_EMAIL = re.compile(r"\S+ (\[at\]|\(at\)|at) \S+(?: (\[dot\]|\(dot\)|dot) \S+)+")


def email_ok(v: str) -> bool:
    plain = unicodedata.normalize("NFKC", v)  # full-width forms -> ASCII
    return bool(re.fullmatch(r"[^\s@]+@[^\s@]+\.[^\s@]+", plain) or OBFUSCATED_EMAIL.fullmatch(plain))


VALIDATORS: dict[str, Callable[[str, str], bool]] = {
    "EMAIL": lambda v, r: email_ok(v),
    "PHONE": phone_valid,
    "CREDIT_CARD": lambda v, r: card_ok(v),
    "IBAN": lambda v, r: iban_value_ok(v),
    "IP_ADDRESS": lambda v, r: ip_ok(v),
    "SECRET": lambda v, r: len(v) >= 6,
    "URL": lambda v, r: re.match(r"[a-z+]+://\S+$", v) is not None,
    "US_SSN": lambda v, r: ssn_ok(v),
    "UK_NINO": lambda v, r: nino_ok(v),
    "IN_AADHAAR": lambda v, r: aadhaar_ok(v),
    "IN_PAN": lambda v, r: PAN_RE.fullmatch(v) is not None,
    "DATE_OF_BIRTH": lambda v, r: re.search(r"\d", v) is not None,
    "PERSON": lambda v, r: all(w in ALL_NAME_WORDS or len(w) <= 2 for w in re.split(r"[ -]", v)),
    "ADDRESS": lambda v, r: re.search(r"\d", v) is not None,
}


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise SystemExit(f"corpus check failed: {msg}")


def check_pii(events: list[dict], used: Counter) -> None:
    check(len(events) >= MIN_PII_EVENTS, f"only {len(events)} PII events")
    check(len({e["id"] for e in events}) == len(events), "duplicate PII ids")
    for e in events:
        check(list(e) == ["id", "locale", "text", "entities"], f"{e['id']}: key order {list(e)}")
        check(e["locale"] in LOCALES and e["entities"], f"{e['id']}: bad locale or no entities")
        check(not SLOT_RE.search(e["text"]), f"{e['id']}: unfilled slot")
        for ent in e["entities"]:
            cat, value = ent["category"], ent["value"]
            check(cat in CATEGORIES, f"{e['id']}: unknown category {cat}")
            check(value in e["text"], f"{e['id']}: {cat} value {value!r} not in text")
            check(VALIDATORS[cat](value, REGION[e["locale"]]), f"{e['id']}: invalid {cat} {value!r}")
    per_cat = Counter(c for e in events for c in {x["category"] for x in e["entities"]})
    for cat in CATEGORIES:
        check(per_cat[cat] >= MIN_EVENTS[cat], f"{cat}: {per_cat[cat]} events < {MIN_EVENTS[cat]}")
        n_templates = sum(1 for (c, _), n in used.items() if c == cat and n)
        check(n_templates >= MIN_TEMPLATES, f"{cat}: only {n_templates} templates used")
    per_locale = Counter(e["locale"] for e in events)
    for loc in LOCALES:
        check(per_locale[loc] >= MIN_PER_LOCALE, f"{loc}: {per_locale[loc]} events < {MIN_PER_LOCALE}")
    single = sum(1 for e in events if len(e["entities"]) == 1) / len(events)
    check(0.5 <= single <= 0.7, f"single-entity share {single:.2f} outside 0.5-0.7")
    check(max(len(e["entities"]) for e in events) <= 4, "an event has more than 4 entities")
    check(len({e["text"] for e in events}) == len(events), "duplicate PII texts")


def check_clean(rows: list[dict]) -> None:
    check(len(rows) >= MIN_CLEAN_EVENTS, f"only {len(rows)} clean events")
    check(len({r["id"] for r in rows}) == len(rows), "duplicate clean ids")
    check(len({r["text"] for r in rows}) == len(rows), "duplicate clean texts")
    kinds = Counter(r["kind"] for r in rows)
    for kind in CLEAN_KINDS:
        check(kinds[kind] >= 20, f"clean kind {kind}: only {kinds[kind]}")
    for r in rows:
        check(list(r) == ["id", "kind", "text"], f"{r['id']}: key order {list(r)}")
        problem = clean_problem(r["text"])
        check(problem is None, f"{r['id']} looks like PII ({problem}): {r['text']!r}")


# -------------------------------------------------------------------------------------- main


def summary(events: list[dict], clean: list[dict]) -> str:
    per_cat = Counter(c for e in events for c in {x["category"] for x in e["entities"]})
    ents = Counter(x["category"] for e in events for x in e["entities"])
    lines = [f"{'category':<14} {'events':>6} {'entities':>8} {'min':>4}"]
    lines += [f"{c:<14} {per_cat[c]:>6} {ents[c]:>8} {MIN_EVENTS[c]:>4}" for c in CATEGORIES]
    lines += ["", f"{'locale':<14} {'events':>6}"]
    per_locale = Counter(e["locale"] for e in events)
    lines += [f"{loc:<14} {per_locale[loc]:>6}" for loc in LOCALES]
    sizes = Counter(len(e["entities"]) for e in events)
    lines += ["", "entities/event " + "  ".join(f"{k}: {sizes[k]}" for k in sorted(sizes))]
    lines += ["", f"{'clean kind':<14} {'events':>6}"]
    kinds = Counter(r["kind"] for r in clean)
    lines += [f"{k:<14} {kinds[k]:>6}" for k in CLEAN_KINDS]
    lines += ["", f"total: {len(events)} PII events, {len(clean)} clean events"]
    return "\n".join(lines)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    events, used = build_pii(rng)
    clean = build_clean(rng)
    check_pii(events, used)
    check_clean(clean)
    write_jsonl(PII_PATH, events)
    write_jsonl(CLEAN_PATH, clean)
    print(summary(events, clean))


if __name__ == "__main__":
    main()
