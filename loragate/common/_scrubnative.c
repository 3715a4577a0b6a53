/* The scrubber's rules, run in C with PCRE2 (JIT) on ASCII texts: loragate.common.scrub builds one
 * Scrubber from its rules and uses it for every ASCII text; other texts stay with Python's re.
 *
 * Exact by construction on ASCII: PCRE2 is a backtracking engine with Python's leftmost-first
 * semantics, and on ASCII text Python's \d, \w, \b and re.IGNORECASE are PCRE2's (the patterns
 * arrive with Python's \s spelt out: it also matches \x1c-\x1f). The facts that decide which rules
 * run are computed here as scrub.Need describes them. Whatever this code cannot decide (a non-ASCII
 * result, a PCRE2 resource limit, an empty match) makes scrub() return None: the caller then runs
 * the Python rules on that text. tests/unit/test_scrub.py compares both on the PII corpus and on
 * generated texts.
 */
#define PY_SSIZE_T_CLEAN
#define PCRE2_CODE_UNIT_WIDTH 8
#include <Python.h>
#include <pcre2.h>
#include <stdint.h>
#include <string.h>

#define OVECTOR_PAIRS 32 /* the match data's: a kept prefix is one of the first 31 groups */

#ifndef JIT_STACK_MAX
#define JIT_STACK_MAX (64 * 1024 * 1024)
#endif

/* How a rule replaces a match (scrub.py's native_kind). */
enum { K_CONST, K_PREFIX, K_INTL_PHONE, K_NAT_PHONE, K_IPV4, K_CARD, K_IBAN, K_BASE64, K_IPV6, K_CALL };

typedef struct {
    const char *s;
    Py_ssize_t n;
} span_t;

typedef struct {
    pcre2_code *code;
    int jit;
    int kind;
    span_t placeholder;
    uint32_t prefix_group;
    PyObject *call; /* borrowed from the spec the Scrubber keeps */
    /* the need */
    Py_ssize_t min_digits;
    int n_any, n_any_lower;
    span_t *any, *any_lower;
    char count_char;
    Py_ssize_t count_min; /* 0: no count test */
    int long_run, ni_shape, id_keyword;
} rule_t;

typedef struct {
    PyObject_HEAD
    PyObject *spec; /* keeps every string and callable the rules point into */
    int n;
    rule_t *rules;
    span_t *id_words; /* scrub._ID_WORDS (id cards are written in id_keyword) */
    int n_id_words;
    uint64_t id_pairs[1024]; /* the first two bytes of each word, and "id": a bit each of 65536 */
    pcre2_match_data *match_data;
    pcre2_jit_stack *jit_stack; /* for a rule's group repeated over a long text (no match runs during a callback) */
    pcre2_match_context *match_context;
    int busy; /* match_data in use (a callback ran Python that scrubs too): take a fresh one */
} Scrubber;

/* --- building ------------------------------------------------------------------------------ */

static pcre2_code *compile(PyObject *pattern, int caseless, int *jit) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(pattern, &n);
    if (s == NULL) return NULL;
    int error;
    PCRE2_SIZE offset;
    pcre2_code *code = pcre2_compile((PCRE2_SPTR)s, (PCRE2_SIZE)n, caseless ? PCRE2_CASELESS : 0, &error,
                                     &offset, NULL);
    if (code == NULL) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(error, message, sizeof message);
        PyErr_Format(PyExc_ValueError, "pcre2 cannot compile %R at %zu: %s", pattern, (size_t)offset, message);
        return NULL;
    }
    int ok = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
    if (jit != NULL) *jit = ok;
    return code;
}

static int ascii_span(PyObject *text, span_t *out) {
    if (!PyUnicode_Check(text) || !PyUnicode_IS_ASCII(text)) {
        PyErr_Format(PyExc_ValueError, "expected an ASCII str, got %R", text);
        return -1;
    }
    out->s = PyUnicode_AsUTF8AndSize(text, &out->n);
    return out->s == NULL ? -1 : 0;
}

static int spans(PyObject *strings, span_t **out, int *count) {
    if (!PyTuple_Check(strings)) {
        PyErr_SetString(PyExc_TypeError, "expected a tuple of str");
        return -1;
    }
    *count = (int)PyTuple_GET_SIZE(strings);
    *out = PyMem_Calloc(*count ? *count : 1, sizeof(span_t));
    if (*out == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < *count; i++)
        if (ascii_span(PyTuple_GET_ITEM(strings, i), &(*out)[i]) < 0) return -1;
    return 0;
}

static void Scrubber_dealloc(Scrubber *self) {
    for (int i = 0; self->rules != NULL && i < self->n; i++) {
        pcre2_code_free(self->rules[i].code);
        PyMem_Free(self->rules[i].any);
        PyMem_Free(self->rules[i].any_lower);
    }
    PyMem_Free(self->rules);
    PyMem_Free(self->id_words);
    pcre2_match_data_free(self->match_data);
    pcre2_match_context_free(self->match_context);
    pcre2_jit_stack_free(self->jit_stack);
    Py_XDECREF(self->spec);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Scrubber(rules, id_words): rules is a tuple of
 * (pattern, caseless, kind, placeholder, prefix_group, call,
 *  min_digits, any, any_lower, count_char, count_min, long_run, ni_shape, id_keyword). */
static int Scrubber_init(Scrubber *self, PyObject *args, PyObject *kwargs) {
    PyObject *rules, *id_words;
    if (!PyArg_ParseTuple(args, "O!O!", &PyTuple_Type, &rules, &PyTuple_Type, &id_words)) return -1;
    if (self->spec != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Scrubber is initialised once");
        return -1;
    }
    self->spec = Py_NewRef(args);
    self->n = (int)PyTuple_GET_SIZE(rules);
    self->rules = PyMem_Calloc(self->n ? self->n : 1, sizeof(rule_t));
    self->match_data = pcre2_match_data_create(OVECTOR_PAIRS, NULL);
    self->match_context = pcre2_match_context_create(NULL);
    self->jit_stack = pcre2_jit_stack_create(32 * 1024, JIT_STACK_MAX, NULL);
    if (self->rules == NULL || self->match_data == NULL || self->match_context == NULL || self->jit_stack == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    pcre2_jit_stack_assign(self->match_context, NULL, self->jit_stack);
    if (spans(id_words, &self->id_words, &self->n_id_words) < 0) return -1;
    for (int i = 0; i <= self->n_id_words; i++) {
        const char *word = i < self->n_id_words ? self->id_words[i].s : "id";
        if (i < self->n_id_words && self->id_words[i].n < 2) {
            PyErr_SetString(PyExc_ValueError, "id words are at least two characters long");
            return -1;
        }
        unsigned pair = (unsigned)(unsigned char)word[0] << 8 | (unsigned char)word[1];
        self->id_pairs[pair >> 6] |= (uint64_t)1 << (pair & 63);
    }
    for (int i = 0; i < self->n; i++) {
        rule_t *r = &self->rules[i];
        PyObject *pattern, *placeholder, *call, *any, *any_lower, *count_char;
        int caseless;
        unsigned int prefix_group;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(rules, i), "UpiUIOnO!O!Unppp", &pattern, &caseless, &r->kind,
                              &placeholder, &prefix_group, &call, &r->min_digits, &PyTuple_Type, &any,
                              &PyTuple_Type, &any_lower, &count_char, &r->count_min, &r->long_run,
                              &r->ni_shape, &r->id_keyword))
            return -1;
        if (r->kind < K_CONST || r->kind > K_CALL || (r->kind == K_CALL && !PyCallable_Check(call))) {
            PyErr_Format(PyExc_ValueError, "rule %d: bad kind %d or callable", i, r->kind);
            return -1;
        }
        r->prefix_group = prefix_group;
        r->call = call;
        span_t c;
        if (ascii_span(placeholder, &r->placeholder) < 0 || ascii_span(count_char, &c) < 0) return -1;
        r->count_char = c.n ? c.s[0] : 0;
        if (spans(any, &r->any, &r->n_any) < 0 || spans(any_lower, &r->any_lower, &r->n_any_lower) < 0) return -1;
        if ((r->code = compile(pattern, caseless, &r->jit)) == NULL) return -1;
        uint32_t captures = 0;
        pcre2_pattern_info(r->code, PCRE2_INFO_CAPTURECOUNT, &captures);
        if (r->kind == K_PREFIX && (prefix_group == 0 || prefix_group > captures || prefix_group >= OVECTOR_PAIRS)) {
            PyErr_Format(PyExc_ValueError, "rule %d: no capture group %u to keep", i, prefix_group);
            return -1;
        }
    }
    return 0;
}

/* --- scrubbing ----------------------------------------------------------------------------- */

typedef struct {
    char *s;
    Py_ssize_t n, cap;
} buf_t;

static int put(buf_t *b, const char *s, Py_ssize_t n) {
    if (n == 0) return 0; /* nothing to copy (and memcpy takes no NULL, which an empty buffer's is) */
    if (b->n + n > b->cap) {
        Py_ssize_t cap = (b->n + n) * 2 + 64;
        char *grown = PyMem_Realloc(b->s, cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->s = grown;
        b->cap = cap;
    }
    memcpy(b->s + b->n, s, n);
    b->n += n;
    return 0;
}

static Py_ssize_t count_digits(const char *s, Py_ssize_t n) {
    Py_ssize_t d = 0;
    for (Py_ssize_t i = 0; i < n; i++) d += (unsigned char)(s[i] - '0') < 10;
    return d;
}

/* Whether needle occurs in haystack: memchr to each candidate first byte (glibc's memmem sets up a
 * two-way search per call, which cost more than all of a short text's matching). */
static int contains(const char *haystack, Py_ssize_t n, const span_t *needle) {
    if (needle->n == 0) return 1;
    if (needle->n > n) return 0;
    const char *p = haystack, *end = haystack + n - needle->n + 1;
    while (p < end && (p = memchr(p, needle->s[0], end - p)) != NULL) {
        if (memcmp(p, needle->s, needle->n) == 0) return 1;
        p++;
    }
    return 0;
}

static int run_char(char c) { /* scrub._LONG_RUN's class: [A-Za-z0-9+/_-] */
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '+' || c == '/' ||
           c == '_' || c == '-';
}

static int space_char(char c) { return (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x20); } /* Python's \s */
static int digit_char(char c) { return c >= '0' && c <= '9'; }
static int letter_char(char c) { return (c | 0x20) >= 'a' && (c | 0x20) <= 'z'; }

/* Whether scrub._NI_SHAPE starts at i: two letters, then three digit pairs, each after an optional \s. Each
 * \s? is decided by the next byte alone (a space is never a digit): no backtracking. */
static int ni_shape_at(const char *s, Py_ssize_t n, Py_ssize_t i) {
    if (!letter_char(s[i]) || !letter_char(s[i + 1])) return 0;
    Py_ssize_t j = i + 2;
    for (int pair = 0; pair < 3; pair++) {
        if (j < n && space_char(s[j])) j++;
        if (j + 2 > n || !digit_char(s[j]) || !digit_char(s[j + 1])) return 0;
        j += 2;
    }
    return 1;
}

/* scrub._NI_SHAPE on ASCII, found from its first digit pair (rarer in text than letter pairs): the two
 * letters end right before it, or one \s before it. */
static int ni_shape(const char *s, Py_ssize_t n) {
    for (Py_ssize_t j = 2; j + 1 < n; j++) {
        if (!digit_char(s[j]) || !digit_char(s[j + 1])) continue;
        if (ni_shape_at(s, n, j - 2) || (j >= 3 && space_char(s[j - 1]) && ni_shape_at(s, n, j - 3))) return 1;
    }
    return 0;
}

/* scrub._ID_KEYWORDS in the lowercased text: one of the words, or "id", an optional separator, "card" (a
 * separator is never "c": no backtracking). Only where the words' first two bytes are is anything compared. */
static int id_keyword(const Scrubber *self, const char *lower, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i + 1 < n; i++) {
        unsigned pair = (unsigned)(unsigned char)lower[i] << 8 | (unsigned char)lower[i + 1];
        if (!(self->id_pairs[pair >> 6] >> (pair & 63) & 1)) continue;
        for (int w = 0; w < self->n_id_words; w++) {
            const span_t *word = &self->id_words[w];
            if (word->n <= n - i && memcmp(lower + i, word->s, word->n) == 0) return 1;
        }
        if (lower[i] == 'i' && lower[i + 1] == 'd') {
            Py_ssize_t j = i + 2;
            if (j < n && (space_char(lower[j]) || lower[j] == '_' || lower[j] == '-')) j++;
            if (n - j >= 4 && memcmp(lower + j, "card", 4) == 0) return 1;
        }
    }
    return 0;
}

/* The facts about the original text that the rules' needs ask for, each found when first asked. */
typedef struct {
    const char *s;
    Py_ssize_t n, digits;
    char *lower; /* owned */
    int long_run, ni_shape, id_keyword; /* -1: not found yet */
} facts_t;

static const char *lower_of(facts_t *f) {
    if (f->lower == NULL) {
        f->lower = PyMem_Malloc(f->n ? f->n : 1);
        if (f->lower == NULL) return NULL;
        for (Py_ssize_t i = 0; i < f->n; i++) {
            char c = f->s[i];
            f->lower[i] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
        }
    }
    return f->lower;
}

/* 1 when the rule may change the text (scrub.Need.holds), 0 when not, -1 on a failure (fall back). */
static int needed(Scrubber *self, const rule_t *r, facts_t *f, pcre2_match_data *md) {
    if (f->digits < r->min_digits) return 0;
    if (r->n_any || r->n_any_lower || r->count_min) {
        int any = 0;
        for (int i = 0; !any && i < r->n_any; i++) any = contains(f->s, f->n, &r->any[i]);
        if (!any && r->n_any_lower) {
            const char *lower = lower_of(f);
            if (lower == NULL) return -1;
            for (int i = 0; !any && i < r->n_any_lower; i++)
                any = contains(lower, f->n, &r->any_lower[i]);
        }
        if (!any && r->count_min) {
            Py_ssize_t count = 0;
            for (Py_ssize_t i = 0; i < f->n; i++) count += f->s[i] == r->count_char;
            any = count >= r->count_min;
        }
        if (!any) return 0;
    }
    if (r->long_run) {
        if (f->long_run < 0) {
            Py_ssize_t run = 0;
            f->long_run = 0;
            for (Py_ssize_t i = 0; i < f->n && !f->long_run; i++) {
                run = run_char(f->s[i]) ? run + 1 : 0;
                f->long_run = run >= 32;
            }
        }
        if (!f->long_run) return 0;
    }
    if (r->ni_shape) {
        if (f->ni_shape < 0) f->ni_shape = f->digits >= 6 && ni_shape(f->s, f->n);
        if (f->ni_shape <= 0) return f->ni_shape;
    }
    if (r->id_keyword) {
        if (f->id_keyword < 0) {
            const char *lower = lower_of(f);
            if (lower == NULL) return -1;
            f->id_keyword = id_keyword(self, lower, f->n);
        }
        if (f->id_keyword <= 0) return f->id_keyword;
    }
    return 1;
}

static int hex_char(char c) { return digit_char(c) || ((c | 0x20) >= 'a' && (c | 0x20) <= 'f'); }

/* ipaddress.IPv4Address(s) succeeds: four dot-separated decimal octets, no leading zero, each <= 255. */
static int ipv4_valid(const char *s, Py_ssize_t n) {
    int octets = 0;
    for (Py_ssize_t i = 0;; i++) {
        Py_ssize_t from = i;
        int value = 0;
        for (; i < n && s[i] != '.'; i++) {
            if (!digit_char(s[i])) return 0;
            value = value * 10 + (s[i] - '0');
            if (value > 1000) value = 1000;
        }
        if (i == from || i - from > 3 || (i - from > 1 && s[from] == '0') || value > 255) return 0;
        octets++;
        if (i >= n) break;
    }
    return octets == 4;
}

/* One hextet ipaddress parses: 1 to 4 hex digits. */
static int hextet_valid(const char *s, Py_ssize_t n) {
    if (n < 1 || n > 4) return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!hex_char(s[i])) return 0;
    return 1;
}

/* ipaddress.IPv6Address(s) succeeds (s has no '%'), step by step as _BaseV6._ip_int_from_string decides.
 * 1 yes, 0 no, -1 more parts than the rule can match (let Python decide). */
static int ipv6_valid(const char *s, Py_ssize_t n) {
    Py_ssize_t at[16], len[16];
    int parts = 0;
    for (Py_ssize_t i = 0, from = 0; i <= n; i++) {
        if (i < n && s[i] != ':') continue;
        if (parts == 16) return -1;
        at[parts] = from;
        len[parts++] = i - from;
        from = i + 1;
    }
    if (n == 0 || parts < 3) return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] == '/') return 0;
    /* An IPv4 suffix stands for two hextets (valid ones): the parts as ipaddress counts them are one more. */
    int ipv4 = memchr(s + at[parts - 1], '.', len[parts - 1]) != NULL;
    if (ipv4 && !ipv4_valid(s + at[parts - 1], len[parts - 1])) return 0;
    int total = parts + ipv4;
    if (total > 9) return 0;
    int skip = -1;
    for (int i = 1; i < total - 1; i++) {
        if (ipv4 && i >= parts - 1) break; /* the suffix's hextets are not empty */
        if (len[i] == 0) {
            if (skip >= 0) return 0;
            skip = i;
        }
    }
    int first_empty = len[0] == 0, last_empty = !ipv4 && len[parts - 1] == 0, hi, lo;
    if (skip >= 0) {
        hi = skip;
        lo = total - skip - 1;
        if (first_empty && --hi) return 0;
        if (last_empty && --lo) return 0;
        if (8 - (hi + lo) < 1) return 0;
    } else {
        if (total != 8 || first_empty || last_empty) return 0;
        hi = total;
        lo = 0;
    }
    for (int k = 0; k < hi + lo; k++) { /* the parts parsed: the first hi and the last lo */
        int i = k < hi ? k : total - lo + (k - hi);
        if (ipv4 && i >= parts - 1) continue;
        if (!hextet_valid(s + at[i], len[i])) return 0;
    }
    return 1;
}

/* Append the replacement of match [start, end) of s. 1 done, 0 fall back, -1 a Python error. */
static int replace(const rule_t *r, const char *s, PCRE2_SIZE *ov, buf_t *out) {
    const char *m = s + ov[0];
    Py_ssize_t n = (Py_ssize_t)(ov[1] - ov[0]);
    switch (r->kind) {
    case K_CONST:
        return put(out, r->placeholder.s, r->placeholder.n) < 0 ? -1 : 1;
    case K_PREFIX: {
        PCRE2_SIZE a = ov[2 * r->prefix_group], b = ov[2 * r->prefix_group + 1];
        if (a == PCRE2_UNSET || b < a) return 0;
        if (put(out, s + a, (Py_ssize_t)(b - a)) < 0) return -1;
        return put(out, r->placeholder.s, r->placeholder.n) < 0 ? -1 : 1;
    }
    case K_INTL_PHONE:
    case K_NAT_PHONE: { /* scrub._international_phone / _national_phone */
        Py_ssize_t digits = count_digits(m, n);
        int ok;
        if (r->kind == K_INTL_PHONE) {
            if (n >= 2 && m[0] == '0' && m[1] == '0') digits -= 2;
            ok = digits >= 8 && digits <= 15;
        } else {
            ok = digits >= 10 && digits <= 11;
        }
        return (ok ? put(out, r->placeholder.s, r->placeholder.n) : put(out, m, n)) < 0 ? -1 : 1;
    }
    case K_CARD: { /* scrub._card: the longest Luhn-valid prefix of 13-19 of the digits, what follows kept */
        Py_ssize_t at[19];
        int digits = 0;
        for (Py_ssize_t i = 0; i < n && digits < 19; i++)
            if (digit_char(m[i])) at[digits++] = i;
        for (int length = digits; length >= 13; length--) {
            int total = 0;
            for (int k = 0; k < length; k++) {
                int value = m[at[length - 1 - k]] - '0';
                if (k % 2 == 1) value = value * 2 > 9 ? value * 2 - 9 : value * 2;
                total += value;
            }
            if (total % 10 == 0) {
                Py_ssize_t end = at[length - 1] + 1;
                return put(out, r->placeholder.s, r->placeholder.n) < 0 || put(out, m + end, n - end) < 0 ? -1 : 1;
            }
        }
        return put(out, m, n) < 0 ? -1 : 1;
    }
    case K_IBAN: { /* scrub._iban: \s dropped, the first four characters moved to the end, mod 97 == 1 */
        char compact[64];
        int length = 0, rest = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (space_char(m[i])) continue;
            if (length == (int)sizeof compact) return 0; /* longer than the rule matches: let Python decide */
            compact[length++] = m[i];
        }
        for (int k = 0; k < length; k++) {
            char c = compact[(k + 4) % length];
            if (digit_char(c))
                rest = (rest * 10 + (c - '0')) % 97;
            else if (c >= 'A' && c <= 'Z')
                rest = (rest * 100 + (c - 'A' + 10)) % 97;
            else
                return 0; /* not what the rule matches: let Python decide */
        }
        if (length <= 4) return 0; /* shorter than the rule matches: let Python decide */
        return (rest == 1 ? put(out, r->placeholder.s, r->placeholder.n) : put(out, m, n)) < 0 ? -1 : 1;
    }
    case K_BASE64: { /* scrub._base64_secret: a digit, an upper- and a lower-case letter */
        int digit = 0, upper = 0, lower = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            digit |= digit_char(m[i]);
            upper |= m[i] >= 'A' && m[i] <= 'Z';
            lower |= m[i] >= 'a' && m[i] <= 'z';
        }
        return (digit && upper && lower ? put(out, r->placeholder.s, r->placeholder.n) : put(out, m, n)) < 0 ? -1 : 1;
    }
    case K_IPV6: { /* scrub._ipv6: a likely address (3 colons or 3 hex digits in a row), valid before any '%' */
        int colons = 0, hex_run = 0, likely = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            colons += m[i] == ':';
            hex_run = hex_char(m[i]) ? hex_run + 1 : 0;
            likely |= hex_run >= 3;
        }
        if (colons >= 3) likely = 1;
        if (!likely) return put(out, m, n) < 0 ? -1 : 1;
        const char *zone = memchr(m, '%', n);
        int valid = ipv6_valid(m, zone != NULL ? zone - m : n);
        if (valid < 0) return 0;
        return (valid ? put(out, r->placeholder.s, r->placeholder.n) : put(out, m, n)) < 0 ? -1 : 1;
    }
    case K_IPV4: { /* scrub._ipv4: every dot-separated part <= 255 */
        int ok = 1, value = 0, seen = 0;
        for (Py_ssize_t i = 0; i <= n && ok; i++) {
            if (i == n || m[i] == '.') {
                ok = seen && value <= 255;
                value = seen = 0;
            } else if ((unsigned char)(m[i] - '0') < 10) {
                value = value * 10 + (m[i] - '0');
                if (value > 100000) value = 100000;
                seen = 1;
            } else {
                return 0; /* not digits and dots: let Python decide */
            }
        }
        return (ok ? put(out, r->placeholder.s, r->placeholder.n) : put(out, m, n)) < 0 ? -1 : 1;
    }
    default: { /* K_CALL: the Python function of the matched text */
        PyObject *matched = PyUnicode_FromStringAndSize(m, n);
        if (matched == NULL) return -1;
        PyObject *result = PyObject_CallOneArg(r->call, matched);
        Py_DECREF(matched);
        if (result == NULL) return -1;
        int done = 0;
        if (PyUnicode_Check(result) && PyUnicode_IS_ASCII(result)) {
            Py_ssize_t rn;
            const char *rs = PyUnicode_AsUTF8AndSize(result, &rn);
            done = rs == NULL ? -1 : put(out, rs, rn) < 0 ? -1 : 1;
        }
        Py_DECREF(result);
        return done;
    }
    }
}

/* One rule over the text in cur (re.sub): the result in next, *changed set when it differs. */
static int substitute(const rule_t *r, const buf_t *cur, buf_t *next, pcre2_match_data *md,
                      pcre2_match_context *mc, int *changed) {
    PCRE2_SIZE start = 0, last = 0;
    next->n = 0;
    *changed = 0;
    while (start <= (PCRE2_SIZE)cur->n) {
        int rc = r->jit ? pcre2_jit_match(r->code, (PCRE2_SPTR)cur->s, cur->n, start, 0, md, mc)
                        : pcre2_match(r->code, (PCRE2_SPTR)cur->s, cur->n, start, 0, md, mc);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) return 0; /* a resource limit: Python decides */
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        if (ov[1] <= ov[0]) return 0; /* an empty match: none of the rules has one; Python decides */
        if (put(next, cur->s + last, (Py_ssize_t)(ov[0] - last)) < 0) return -1;
        Py_ssize_t at = next->n;
        int done = replace(r, cur->s, ov, next);
        if (done <= 0) return done;
        if (next->n - at != (Py_ssize_t)(ov[1] - ov[0]) || memcmp(next->s + at, cur->s + ov[0], ov[1] - ov[0]))
            *changed = 1;
        last = start = ov[1];
    }
    if (*changed && put(next, cur->s + last, cur->n - (Py_ssize_t)last) < 0) return -1;
    return 1;
}

static PyObject *Scrubber_scrub(Scrubber *self, PyObject *text) {
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "scrub() takes a str");
        return NULL;
    }
    if (!PyUnicode_IS_ASCII(text)) Py_RETURN_NONE;
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(text, &n);
    if (s == NULL) return NULL;
    pcre2_match_data *md = self->match_data;
    if (self->busy) {
        md = pcre2_match_data_create(OVECTOR_PAIRS, NULL);
        if (md == NULL) return PyErr_NoMemory();
    } else {
        self->busy = 1;
    }
    facts_t f = {s, n, count_digits(s, n), NULL, -1, -1, -1};
    buf_t a = {0}, b = {0};
    buf_t cur = {(char *)s, n, 0}; /* the text as the rules so far left it (s itself until one changed it) */
    PyObject *result = NULL;
    int outcome = 1;
    for (int i = 0; i < self->n && outcome == 1; i++) {
        const rule_t *r = &self->rules[i];
        int need = needed(self, r, &f, md);
        if (need == 0) continue;
        if (need < 0) {
            outcome = 0; /* a fact PCRE2 could not decide: Python decides */
            break;
        }
        buf_t *next = cur.s == a.s && a.s != NULL ? &b : &a;
        int changed;
        outcome = substitute(r, &cur, next, md, self->match_context, &changed);
        if (outcome == 1 && changed) cur = *next;
    }
    if (outcome == 1)
        result = cur.s == s ? Py_NewRef(text) : PyUnicode_FromStringAndSize(cur.s, cur.n);
    else if (outcome == 0)
        result = Py_NewRef(Py_None);
    PyMem_Free(a.s);
    PyMem_Free(b.s);
    PyMem_Free(f.lower);
    if (md != self->match_data)
        pcre2_match_data_free(md);
    else
        self->busy = 0;
    return result;
}

static PyMethodDef Scrubber_methods[] = {
    {"scrub", (PyCFunction)Scrubber_scrub, METH_O,
     "The text scrubbed, or None when the Python rules must decide (a non-ASCII text, a PCRE2 limit)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ScrubberType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "loragate.common._scrubnative.Scrubber",
    .tp_basicsize = sizeof(Scrubber),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "scrub.py's rules compiled with PCRE2, for ASCII texts.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Scrubber_init,
    .tp_dealloc = (destructor)Scrubber_dealloc,
    .tp_methods = Scrubber_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scrubnative", "scrub.py's rules in C (PCRE2), for ASCII texts.", -1, NULL,
};

PyMODINIT_FUNC PyInit__scrubnative(void) {
    if (PyType_Ready(&ScrubberType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Scrubber", (PyObject *)&ScrubberType) < 0 ||
        PyModule_AddIntConstant(m, "CONST", K_CONST) < 0 || PyModule_AddIntConstant(m, "PREFIX", K_PREFIX) < 0 ||
        PyModule_AddIntConstant(m, "INTL_PHONE", K_INTL_PHONE) < 0 ||
        PyModule_AddIntConstant(m, "NAT_PHONE", K_NAT_PHONE) < 0 || PyModule_AddIntConstant(m, "IPV4", K_IPV4) < 0 ||
        PyModule_AddIntConstant(m, "CARD", K_CARD) < 0 || PyModule_AddIntConstant(m, "IBAN", K_IBAN) < 0 ||
        PyModule_AddIntConstant(m, "BASE64", K_BASE64) < 0 || PyModule_AddIntConstant(m, "IPV6", K_IPV6) < 0 ||
        PyModule_AddIntConstant(m, "CALL", K_CALL) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
