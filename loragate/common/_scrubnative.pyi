# The C module loragate/common/_scrubnative.c (built by setup.py where PCRE2's headers are there).
CONST: int
PREFIX: int
INTL_PHONE: int
NAT_PHONE: int
IPV4: int
CARD: int
IBAN: int
BASE64: int
IPV6: int
CALL: int

class Scrubber:
    def __init__(self, rules: tuple[tuple[object, ...], ...], id_words: tuple[str, ...], /) -> None: ...
    def scrub(self, text: str, /) -> str | None: ...
