"""Personal data in free text, replaced by its kind: "call me on <PHONE_NUMBER>".

presidio-analyzer's pattern recognizers on a blank spaCy pipeline (tokens only: no model is
downloaded, and so no named-entity recognition), presidio-anonymizer to replace what they find
(overlaps merged: an e-mail address is one <EMAIL_ADDRESS>, not a URL inside one).

The recognizers are chosen by measurement on real medical text (benchmarks/pii.py): presidio's
full default set masks numbers everywhere (its US driver's licence pattern matches "B12" and "L3",
its schemeless URL pattern "pressure.So", a phone pattern "168/114 mm Hg"). Kept: e-mail, phone
(strict grouping), IP address, credit card, US social security number, IBAN; URLs with a scheme,
"www." or a common top-level domain in lower case; and, after a cue, what a pattern can tell:
a name after "my name is" or a title (Dr., Mr., Mrs., Ms., Prof.), a date after "born" or
"DOB", a record number after "MRN" or "patient ID", a street address (a number, capitalised
words and a street word), a UK postcode and a US state with its ZIP code.

What it misses: a name without such a cue ("Hi, this is Ahmed. My wife Fatima ..."); without NER
no pattern library finds those. tests/data/pii/planted.json lists every planted case and whether
it is caught; tests/test_trainset.py holds this module to it.
"""

from __future__ import annotations

from functools import cache

SCORE_THRESHOLD = 0.4  # presidio's phone recognizer scores 0.4; its weak SSN patterns (0.05) match 9-digit lab values
PHONE_LENIENCY = 2  # libphonenumber's STRICT_GROUPING: "168/114" and "0.375 0.5 2" are no longer numbers (VALID matched 40 in 5,200 QA items)

_NAME = r"[A-Z][a-z]+(?:[ -][A-Z][a-z]+){0,2}"  # one to three capitalised words
# Our patterns, each entity's own recognizer, case-sensitive unless a pattern says (?i). A cue in a
# lookbehind stays in the text: "my name is <PERSON>".
_PATTERNS = {
    "URL": (
        r"(?i)\bhttps?://[^\s()<>\"']+",
        r"(?i)\bwww\d{0,3}\.[a-z0-9\-]+(?:\.[a-z0-9\-]+)+(?:/[^\s()<>\"']*)?",
        r"(?<![\w.@/-])[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.(?:com|org|net|edu|gov|info|in|uk|us|ca|au|io)(?:/[^\s()<>\"']*)?(?![\w-])",
    ),
    "PERSON": (r"(?<=(?i:\bmy name is|\bname:)\s+|\b(?:Dr|Mr|Mrs|Ms|Prof)\.?\s+)" + _NAME,),
    "DATE_OF_BIRTH": (
        r"(?<=(?i:\b(?:DOB|D\.O\.B\.?|date of birth|born(?: on)?))\s*[:\-]?\s*)"
        r"(?i:\d{1,2}[/.\-]\d{1,2}[/.\-]\d{2,4}|\d{1,2}(?:st|nd|rd|th)?\s+[a-z]{3,9},?\s+\d{4}|[a-z]{3,9}\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4})",
    ),
    "RECORD_NUMBER": (
        r"(?<=(?i:\b(?:MRN|UHID|(?:medical )?record (?:number|no\.?)|(?:patient|hospital|case) (?:ID|number|no\.?)|registration (?:number|no\.?)|reg\.? no\.?))\s*(?:is|:|#)?\s*)"
        r"(?=[A-Z0-9\-/]*\d)[A-Z0-9][A-Z0-9\-/]{3,}",  # with a digit in it
    ),
    "STREET_ADDRESS": (
        r"\b\d{1,5}[A-Z]?(?:\s+[A-Z][a-z]+){1,3}\s+(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Boulevard|Blvd|Drive|Way|Court|Ct|Place|Pl|Terrace|Nagar|Marg)\b\.?",
        r"\b[A-Z]{1,2}\d[A-Z\d]?\s+\d[A-Z]{2}\b",  # a UK postcode
        r"(?<=,\s*)[A-Z]{2}\s+\d{5}(?:-\d{4})?\b",  # a US state and ZIP code after a comma
    ),
}


def _recognizers() -> list:
    import regex
    import tldextract
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )

    class OfflineEmailRecognizer(EmailRecognizer):
        """presidio's e-mail recognizer, its domain check on the Public Suffix List that tldextract
        ships: its default first fetches the list from the internet."""

        domains = tldextract.TLDExtract(suffix_list_urls=())

        def validate_result(self, pattern_text: str) -> bool:
            return self.domains(pattern_text).fqdn != ""

    ours = [
        PatternRecognizer(entity, name=entity.lower(), patterns=[Pattern(f"{entity.lower()} {i}", p, 0.6) for i, p in enumerate(patterns)],
                          global_regex_flags=regex.DOTALL | regex.MULTILINE)  # presidio's default adds IGNORECASE: every word a name
        for entity, patterns in _PATTERNS.items()
    ]
    return [OfflineEmailRecognizer(), PhoneRecognizer(leniency=PHONE_LENIENCY), IpRecognizer(), CreditCardRecognizer(), UsSsnRecognizer(), IbanRecognizer(), *ours]


@cache
def _engines():
    import spacy
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_anonymizer import AnonymizerEngine

    nlp = SpacyNlpEngine()
    nlp.nlp = {"en": spacy.blank("en")}  # loaded: presidio would otherwise download en_core_web_lg
    registry = RecognizerRegistry(recognizers=_recognizers(), supported_languages=["en"])
    return AnalyzerEngine(nlp_engine=nlp, registry=registry, supported_languages=["en"], default_score_threshold=SCORE_THRESHOLD), AnonymizerEngine()


def scrub(text: str) -> tuple[str, list[str]]:
    """The text with each piece of personal data found replaced by "<KIND>", and the kinds replaced, in order."""
    analyzer, anonymizer = _engines()
    found = analyzer.analyze(text, language="en")
    if not found:
        return text, []
    result = anonymizer.anonymize(text, found)
    return result.text, [item.entity_type for item in sorted(result.items, key=lambda item: item.start)]
