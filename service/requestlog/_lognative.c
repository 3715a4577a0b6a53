/* The request log's JSON reading in C: loragate.service.requestlog.columns's fast paths for the answers (a whole
 * JSON body, an SSE stream) and a chat request's turns.
 *
 * Each function reads the bytes once, validating them as strictly as orjson does, and keeps only the
 * fields the log keeps, with the meaning service.requestlog.rows (the reference, orjson and Python) gives them.
 * Whatever it cannot decide exactly (invalid JSON, a key written with escapes, a key given twice, a
 * number orjson might read as infinity, a type the reference would turn into something odd) makes it
 * return None: the caller then takes the reference path for that record. tests/unit/test_lognative.py
 * compares both on generated inputs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef const unsigned char *cur_t;

/* Every reader returns one of these; GIVE_UP sets no exception, ERROR does (memory). */
enum { OK = 0, GIVE_UP = 1, ERROR = 2 };
#define TRY(call)                  \
    do {                           \
        int status_ = (call);      \
        if (status_ != OK) return status_; \
    } while (0)

#define MAX_DEPTH 128

typedef struct {
    cur_t p, end;
    int depth;
} reader_t;

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} buf_t;

static int buf_add(buf_t *b, const void *s, Py_ssize_t n) {
    if (n <= 0) return OK; /* nothing to copy: b->data and s may be NULL (memcpy with NULL is undefined) */
    if (b->len + n > b->cap) {
        Py_ssize_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) cap *= 2;
        char *data = PyMem_Realloc(b->data, cap);
        if (data == NULL) {
            PyErr_NoMemory();
            return ERROR;
        }
        b->data = data;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return OK;
}

static void skip_ws(reader_t *r) {
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r')) r->p++;
}

static int expect(reader_t *r, unsigned char c) {
    skip_ws(r);
    if (r->p >= r->end || *r->p != c) return GIVE_UP;
    r->p++;
    skip_ws(r);
    return OK;
}

/* --- strings --------------------------------------------------------------------------------- */

/* A JSON string's contents, between the quotes, as read: escaped says whether decode_into is needed. */
typedef struct {
    cur_t s;
    Py_ssize_t n;
    int escaped;
} str_t;

static int hex4(cur_t p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = p[i], d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return GIVE_UP;
        v = v * 16 + d;
    }
    *out = v;
    return OK;
}

/* Length of the valid UTF-8 sequence at p (no overlongs, surrogates or code points past U+10FFFF), 0 if none. */
static int utf8_length(cur_t p, cur_t end) {
    unsigned c = p[0];
    Py_ssize_t left = end - p;
    unsigned lo = 0x80, hi = 0xBF;
    int n;
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return 0;
    if (left < n || p[1] < lo || p[1] > hi) return 0;
    for (int i = 2; i < n; i++)
        if (p[i] < 0x80 || p[i] > 0xBF) return 0;
    return n;
}

/* Bytes a string holds as they are: printable ASCII but the quote and the backslash. */
static unsigned char PLAIN[256];

static void init_plain(void) {
    for (int c = 0x20; c < 0x80; c++) PLAIN[c] = c != '"' && c != '\\';
}

/* Past the bytes a string holds as they are: 8 at a time where the CPU is little-endian. A byte is special
 * when it is a quote, a backslash, below 0x20 or above 0x7F; the lowest flagged byte of a word is always a
 * special one (a borrow only carries upwards), so the word is left at the first special byte. */
static cur_t skip_plain(cur_t p, cur_t end) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    while (end - p >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        uint64_t quote = v ^ (ones * '"'), backslash = v ^ (ones * '\\');
        uint64_t special = (((quote - ones) & ~quote) | ((backslash - ones) & ~backslash) | (v - ones * 0x20) | v) & highs;
        if (special) return p + (__builtin_ctzll(special) >> 3);
        p += 8;
    }
#endif
    while (p < end && PLAIN[*p]) p++;
    return p;
}

/* At an opening quote: checks the string as orjson would (no raw control characters, valid escapes,
 * surrogates in pairs, valid UTF-8) and moves past its closing quote. */
static int read_string(reader_t *r, str_t *out) {
    cur_t p = r->p + 1, end = r->end;
    int escaped = 0;
    while (p < end) {
        p = skip_plain(p, end);
        if (p >= end) break;
        unsigned c = *p;
        if (c == '"') {
            out->s = r->p + 1;
            out->n = p - out->s;
            out->escaped = escaped;
            r->p = p + 1;
            return OK;
        }
        if (c < 0x20) return GIVE_UP;
        if (c < 0x80 && c != '\\') {
            p++;
            continue;
        }
        if (c >= 0x80) {
            int n = utf8_length(p, end);
            if (n == 0) return GIVE_UP;
            p += n;
            continue;
        }
        escaped = 1;
        if (end - p < 2) return GIVE_UP;
        c = p[1];
        if (c != 'u') {
            if (!strchr("\"\\/bfnrt", (int)c) || c == 0) return GIVE_UP;
            p += 2;
            continue;
        }
        unsigned unit;
        if (end - p < 6 || hex4(p + 2, &unit) != OK) return GIVE_UP;
        p += 6;
        if (unit >= 0xDC00 && unit <= 0xDFFF) return GIVE_UP; /* a low surrogate first */
        if (unit >= 0xD800 && unit <= 0xDBFF) {                /* a high one: its low one must follow */
            unsigned low;
            if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, &low) != OK || low < 0xDC00 ||
                low > 0xDFFF)
                return GIVE_UP;
            p += 6;
        }
    }
    return GIVE_UP;
}

static int put_utf8(buf_t *b, unsigned cp) {
    unsigned char u[4];
    int n;
    if (cp < 0x80) u[0] = (unsigned char)cp, n = 1;
    else if (cp < 0x800) u[0] = 0xC0 | (cp >> 6), u[1] = 0x80 | (cp & 0x3F), n = 2;
    else if (cp < 0x10000) u[0] = 0xE0 | (cp >> 12), u[1] = 0x80 | ((cp >> 6) & 0x3F), u[2] = 0x80 | (cp & 0x3F), n = 3;
    else
        u[0] = 0xF0 | (cp >> 18), u[1] = 0x80 | ((cp >> 12) & 0x3F), u[2] = 0x80 | ((cp >> 6) & 0x3F),
        u[3] = 0x80 | (cp & 0x3F), n = 4;
    return buf_add(b, u, n);
}

/* Appends the string's UTF-8 to b, escapes decoded (the string was checked by read_string). */
static int decode_into(buf_t *b, const str_t *str) {
    if (!str->escaped) return buf_add(b, str->s, str->n);
    cur_t p = str->s, end = str->s + str->n;
    while (p < end) {
        cur_t run = p;
        while (p < end && *p != '\\') p++;
        TRY(buf_add(b, run, p - run));
        if (p >= end) break;
        unsigned c = p[1], cp;
        p += 2;
        switch (c) {
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'u':
            hex4(p, &cp);
            p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned low;
                hex4(p + 2, &low);
                p += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            }
            break;
        default: cp = c; /* " \ / */
        }
        TRY(put_utf8(b, cp));
    }
    return OK;
}

static PyObject *new_str(const str_t *str) {
    if (!str->escaped) return PyUnicode_DecodeUTF8((const char *)str->s, str->n, NULL);
    buf_t b = {0};
    PyObject *text = decode_into(&b, str) == OK ? PyUnicode_DecodeUTF8(b.data ? b.data : "", b.len, NULL) : NULL;
    PyMem_Free(b.data);
    return text;
}

static int str_is(const str_t *str, const char *word) {
    return !str->escaped && (size_t)str->n == strlen(word) && memcmp(str->s, word, str->n) == 0;
}

/* --- numbers, literals, any value --------------------------------------------------------------- */

/* At a number: checks its grammar and that orjson reads it as a finite double or an int (at most 200
 * digits, an exponent of at most two digits: |value| in 1e-299..1e299). zero: all its digits are 0. */
static int read_number(reader_t *r, int *zero) {
    cur_t p = r->p, end = r->end;
    int digits = 0, nonzero = 0;
    if (p < end && *p == '-') p++;
    if (p >= end || *p < '0' || *p > '9') return GIVE_UP;
    if (*p == '0') p++, digits++;
    else
        while (p < end && *p >= '0' && *p <= '9') nonzero |= *p != '0', p++, digits++;
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9') return GIVE_UP;
        while (p < end && *p >= '0' && *p <= '9') nonzero |= *p != '0', p++, digits++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        int exponent_digits = 0;
        while (p < end && *p >= '0' && *p <= '9') p++, exponent_digits++;
        if (exponent_digits == 0 || exponent_digits > 2) return GIVE_UP;
    }
    if (digits > 200) return GIVE_UP;
    if (zero) *zero = !nonzero;
    r->p = p;
    return OK;
}

static int literal(reader_t *r, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(r->end - r->p) < n || memcmp(r->p, word, n) != 0) return GIVE_UP;
    r->p += n;
    return OK;
}

/* What a value is, for the fields the log reads; the objects and arrays among them are read by callbacks. */
enum { V_STRING, V_NUMBER, V_TRUE, V_FALSE, V_NULL, V_OBJECT, V_ARRAY, V_END };

static int kind_at(const reader_t *r) {
    if (r->p >= r->end) return V_END;
    switch (*r->p) {
    case '"': return V_STRING;
    case '{': return V_OBJECT;
    case '[': return V_ARRAY;
    case 't': return V_TRUE;
    case 'f': return V_FALSE;
    case 'n': return V_NULL;
    default: return V_NUMBER;
    }
}

typedef int (*member_fn)(reader_t *r, const str_t *key, void *ctx);
typedef int (*element_fn)(reader_t *r, Py_ssize_t index, void *ctx);

static int skip_value(reader_t *r);
static int skip_member(reader_t *r, const str_t *key, void *ctx) { return skip_value(r); }
static int skip_element(reader_t *r, Py_ssize_t index, void *ctx) { return skip_value(r); }

/* Moves past c, and the whitespace after it, when the reader is at c. */
static int at(reader_t *r, unsigned char c) {
    if (r->p >= r->end || *r->p != c) return 0;
    r->p++;
    skip_ws(r);
    return 1;
}

/* At '{': calls on_member for each member with the reader at its value, which the callback reads. */
static int each_member(reader_t *r, member_fn on_member, void *ctx) {
    if (++r->depth > MAX_DEPTH) return GIVE_UP;
    at(r, '{');
    if (!at(r, '}')) {
        do {
            str_t key;
            if (r->p >= r->end || *r->p != '"') return GIVE_UP;
            TRY(read_string(r, &key));
            if (key.escaped) return GIVE_UP; /* it may spell a key the log reads: left to the reference */
            TRY(expect(r, ':'));
            TRY(on_member(r, &key, ctx));
            skip_ws(r);
        } while (at(r, ','));
        if (!at(r, '}')) return GIVE_UP;
    }
    r->depth--;
    return OK;
}

/* At '[': calls on_element for each element with the reader at it. */
static int each_element(reader_t *r, element_fn on_element, void *ctx) {
    if (++r->depth > MAX_DEPTH) return GIVE_UP;
    at(r, '[');
    if (!at(r, ']')) {
        Py_ssize_t index = 0;
        do {
            TRY(on_element(r, index++, ctx));
            skip_ws(r);
        } while (at(r, ','));
        if (!at(r, ']')) return GIVE_UP;
    }
    r->depth--;
    return OK;
}

static int skip_value(reader_t *r) {
    str_t ignored;
    switch (kind_at(r)) {
    case V_STRING: return read_string(r, &ignored);
    case V_OBJECT: return each_member(r, skip_member, NULL);
    case V_ARRAY: return each_element(r, skip_element, NULL);
    case V_TRUE: return literal(r, "true");
    case V_FALSE: return literal(r, "false");
    case V_NULL: return literal(r, "null");
    case V_END: return GIVE_UP;
    default: return read_number(r, NULL);
    }
}

/* A string value read into *out (has = 1), or any other value skipped (has = 0). */
static int string_or_skip(reader_t *r, str_t *out, int *has) {
    *has = kind_at(r) == V_STRING;
    return *has ? read_string(r, out) : skip_value(r);
}

/* A key the log reads, seen once: a second one (orjson keeps the last) is left to the reference. */
static int first_time(unsigned *seen, unsigned bit) {
    if (*seen & bit) return 0;
    *seen |= bit;
    return 1;
}

/* The whole input is one JSON object (whitespace around it), read by on_member. */
static int read_document(cur_t s, Py_ssize_t n, member_fn on_member, void *ctx) {
    reader_t r = {s, s + n, 0};
    skip_ws(&r);
    if (kind_at(&r) != V_OBJECT) return GIVE_UP;
    TRY(each_member(&r, on_member, ctx));
    skip_ws(&r);
    return r.p == r.end ? OK : GIVE_UP;
}

/* --- streamed answers: logrows._stream_answer --------------------------------------------------- */

typedef struct {
    buf_t text;      /* choice 0's texts, joined */
    int seen;        /* a choice 0 was there */
    str_t finish;    /* its last truthy finish_reason */
    int has_finish;
} stream_t;

typedef struct {
    unsigned seen;
    int index_zero;       /* choice.get("index", 0) == 0 */
    int delta_is_object;
    str_t delta_content, text, finish;
    int has_delta_content, has_text, has_finish;
} choice_t;

static int delta_member(reader_t *r, const str_t *key, void *ctx) {
    choice_t *c = ctx;
    if (str_is(key, "content")) {
        if (!first_time(&c->seen, 16)) return GIVE_UP;
        return string_or_skip(r, &c->delta_content, &c->has_delta_content);
    }
    return skip_value(r);
}

/* A stream choice's delta or a body choice's message: its "content" is read when it is an object. */
static int content_holder(reader_t *r, choice_t *c) {
    c->delta_is_object = kind_at(r) == V_OBJECT;
    return c->delta_is_object ? each_member(r, delta_member, c) : skip_value(r);
}

static int choice_member(reader_t *r, const str_t *key, void *ctx) {
    choice_t *c = ctx;
    if (str_is(key, "index")) {
        if (!first_time(&c->seen, 1)) return GIVE_UP;
        int kind = kind_at(r);
        if (kind == V_NUMBER) return read_number(r, &c->index_zero);
        c->index_zero = kind == V_FALSE; /* False == 0; None, True, strings, lists... != 0 */
        return skip_value(r);
    }
    if (str_is(key, "delta")) {
        if (!first_time(&c->seen, 2)) return GIVE_UP;
        return content_holder(r, c);
    }
    if (str_is(key, "text")) {
        if (!first_time(&c->seen, 4)) return GIVE_UP;
        return string_or_skip(r, &c->text, &c->has_text);
    }
    if (str_is(key, "finish_reason")) {
        if (!first_time(&c->seen, 8)) return GIVE_UP;
        int kind = kind_at(r);
        if (kind == V_STRING) {
            TRY(read_string(r, &c->finish));
            c->has_finish = c->finish.n > 0; /* "" is falsy: the last finish reason stays */
            return OK;
        }
        if (kind != V_NULL) return GIVE_UP; /* a truthy non-string: left to the reference */
        return literal(r, "null");
    }
    return skip_value(r);
}

static int stream_choice(reader_t *r, Py_ssize_t index, void *ctx) {
    stream_t *s = ctx;
    if (kind_at(r) != V_OBJECT) return skip_value(r); /* not a dict: skipped */
    choice_t c = {0};
    c.index_zero = 1; /* no index: 0 */
    TRY(each_member(r, choice_member, &c));
    if (!c.index_zero) return OK;
    s->seen = 1;
    if (c.delta_is_object ? c.has_delta_content : c.has_text)
        TRY(decode_into(&s->text, c.delta_is_object ? &c.delta_content : &c.text));
    if (c.has_finish) {
        s->finish = c.finish;
        s->has_finish = 1;
    }
    return OK;
}

typedef struct {
    stream_t *stream;
    unsigned seen;
} event_t;

static int event_member(reader_t *r, const str_t *key, void *ctx) {
    event_t *e = ctx;
    if (!str_is(key, "choices")) return skip_value(r);
    if (!first_time(&e->seen, 1)) return GIVE_UP;
    return kind_at(r) == V_ARRAY ? each_element(r, stream_choice, e->stream) : skip_value(r); /* else: none */
}

/* logrows._simple_stream_parts and the answer of its events: every event one "data: {...}" line, LF
 * ends, an optional "data: [DONE]" last; anything else is left to the reference. An event holds no LF,
 * so the next LF ends it: it opens the "\n\ndata: " before the next event, or the stream's last LFs. */
static int read_stream(cur_t s, Py_ssize_t n, stream_t *stream) {
    if (memchr(s, '\r', n) != NULL || n < 7 || memcmp(s, "data: {", 7) != 0) return GIVE_UP;
    cur_t end = s + n, part = s + 6;
    for (;;) {
        cur_t part_end = memchr(part, '\n', end - part), next = NULL;
        if (part_end != NULL && end - part_end >= 8 && memcmp(part_end, "\n\ndata: ", 8) == 0) next = part_end + 8;
        else { /* the last part: only LFs may follow it; "[DONE]" ends the stream */
            for (cur_t tail = part_end; tail != NULL && tail < end; tail++)
                if (*tail != '\n') return GIVE_UP;
            if (part_end == NULL) part_end = end;
            if (part_end - part == 6 && memcmp(part, "[DONE]", 6) == 0) return OK;
        }
        if (part_end == part || *part != '{') return GIVE_UP; /* every event opens an object */
        event_t event = {stream, 0};
        TRY(read_document(part, part_end - part, event_member, &event));
        if (next == NULL) return OK;
        part = next;
    }
}

static PyObject *answer(int status, buf_t *text, int has_text, const str_t *finish, int has_finish) {
    if (status != OK) {
        PyMem_Free(text->data);
        if (status == ERROR) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *t = has_text ? PyUnicode_DecodeUTF8(text->data ? text->data : "", text->len, NULL) : Py_NewRef(Py_None);
    PyMem_Free(text->data);
    PyObject *f = has_finish ? new_str(finish) : Py_NewRef(Py_None);
    if (t == NULL || f == NULL) {
        Py_XDECREF(t);
        Py_XDECREF(f);
        return NULL;
    }
    return Py_BuildValue("(NN)", t, f);
}

static PyObject *stream_answer(PyObject *module, PyObject *data) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    stream_t stream = {0};
    int status = read_stream(view.buf, view.len, &stream);
    /* finish points into the buffer: read it before the buffer is released */
    PyObject *result = answer(status, &stream.text, stream.seen, &stream.finish, stream.has_finish);
    PyBuffer_Release(&view);
    return result;
}

/* --- whole answers: logrows._body_answer -------------------------------------------------------- */

typedef struct {
    unsigned seen;
    int choices; /* a non-empty list whose first element is an object */
    choice_t first;
} body_t;

/* A choice's message: its "content" is read as a delta's is. */
static int body_choice_member(reader_t *r, const str_t *key, void *ctx) {
    choice_t *c = ctx;
    if (str_is(key, "message")) {
        if (!first_time(&c->seen, 2)) return GIVE_UP;
        return content_holder(r, c);
    }
    if (str_is(key, "text")) {
        if (!first_time(&c->seen, 4)) return GIVE_UP;
        return string_or_skip(r, &c->text, &c->has_text);
    }
    if (str_is(key, "finish_reason")) { /* returned as it is: a string, or None */
        if (!first_time(&c->seen, 8)) return GIVE_UP;
        int kind = kind_at(r);
        if (kind == V_STRING) {
            c->has_finish = 1;
            return read_string(r, &c->finish);
        }
        return kind == V_NULL ? literal(r, "null") : GIVE_UP;
    }
    return skip_value(r);
}

static int body_choice(reader_t *r, Py_ssize_t index, void *ctx) {
    body_t *b = ctx;
    if (index > 0 || kind_at(r) != V_OBJECT) return skip_value(r); /* only choice 0 counts */
    b->choices = 1;
    return each_member(r, body_choice_member, &b->first);
}

static int body_member(reader_t *r, const str_t *key, void *ctx) {
    body_t *b = ctx;
    if (!str_is(key, "choices")) return skip_value(r);
    if (!first_time(&b->seen, 1)) return GIVE_UP;
    return kind_at(r) == V_ARRAY ? each_element(r, body_choice, b) : skip_value(r); /* else: (None, None) */
}

static PyObject *body_answer(PyObject *module, PyObject *data) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    body_t body = {0};
    int status = read_document(view.buf, view.len, body_member, &body);
    buf_t text = {0};
    choice_t *c = &body.first;
    const str_t *chosen = c->delta_is_object ? &c->delta_content : &c->text;
    int has_text = body.choices && (c->delta_is_object ? c->has_delta_content : c->has_text);
    /* the strings found point into the buffer: read them all before it is released */
    if (status == OK && has_text) status = decode_into(&text, chosen);
    PyObject *result = answer(status, &text, has_text, &c->finish, body.choices && c->has_finish);
    PyBuffer_Release(&view);
    return result;
}

/* --- a chat request's turns: logrows.prompt_of's (role, content) per message --------------------- */

typedef struct {
    PyObject *roles, *contents; /* the caller's lists, appended to */
    unsigned seen;
    int has_messages;
} chat_t;

typedef struct {
    unsigned seen;
    int has_role, has_content, content_is_parts;
    str_t role, content;
    buf_t parts; /* content parts: their texts joined by spaces */
    int n_parts;
} message_t;

typedef struct {
    unsigned seen;
    str_t text;
    int has_text;
} part_t;

static int part_member(reader_t *r, const str_t *key, void *ctx) {
    part_t *p = ctx;
    if (!str_is(key, "text")) return skip_value(r);
    if (!first_time(&p->seen, 1)) return GIVE_UP;
    return string_or_skip(r, &p->text, &p->has_text);
}

static int content_part(reader_t *r, Py_ssize_t index, void *ctx) {
    message_t *m = ctx;
    if (kind_at(r) != V_OBJECT) return skip_value(r); /* only dicts with a str "text" count */
    part_t part = {0};
    TRY(each_member(r, part_member, &part));
    if (!part.has_text) return OK;
    if (m->n_parts++ > 0) TRY(buf_add(&m->parts, " ", 1));
    return decode_into(&m->parts, &part.text);
}

static int message_member(reader_t *r, const str_t *key, void *ctx) {
    message_t *m = ctx;
    if (str_is(key, "role")) { /* str(role or ""): a string, or a falsy null/false; others to the reference */
        if (!first_time(&m->seen, 1)) return GIVE_UP;
        int kind = kind_at(r);
        if (kind == V_STRING) {
            m->has_role = 1;
            return read_string(r, &m->role);
        }
        if (kind == V_NULL) return literal(r, "null");
        return kind == V_FALSE ? literal(r, "false") : GIVE_UP;
    }
    if (str_is(key, "content")) { /* a string, or content parts; anything else is "" */
        if (!first_time(&m->seen, 2)) return GIVE_UP;
        int kind = kind_at(r);
        if (kind == V_ARRAY) {
            m->content_is_parts = 1;
            return each_element(r, content_part, m);
        }
        return string_or_skip(r, &m->content, &m->has_content);
    }
    return skip_value(r);
}

static PyObject *ROLES[3]; /* "system", "user", "assistant": one object each, not one per turn */

static PyObject *role_str(const message_t *m) {
    if (!m->has_role) return PyUnicode_FromStringAndSize("", 0);
    for (int i = 0; i < 3; i++)
        if (str_is(&m->role, PyUnicode_AsUTF8(ROLES[i]))) return Py_NewRef(ROLES[i]);
    return new_str(&m->role);
}

static int append(PyObject *list, PyObject *item) {
    if (item == NULL) return ERROR;
    int failed = PyList_Append(list, item) < 0;
    Py_DECREF(item);
    return failed ? ERROR : OK;
}

static int chat_message(reader_t *r, Py_ssize_t index, void *ctx) {
    chat_t *chat = ctx;
    if (kind_at(r) != V_OBJECT) return skip_value(r); /* not a dict: no turn */
    message_t m = {0};
    int status = each_member(r, message_member, &m);
    if (status == OK) status = append(chat->roles, role_str(&m));
    if (status == OK) {
        PyObject *content =
            m.content_is_parts ? PyUnicode_DecodeUTF8(m.parts.data ? m.parts.data : "", m.parts.len, NULL)
            : m.has_content    ? new_str(&m.content)
                               : PyUnicode_FromStringAndSize("", 0);
        status = append(chat->contents, content);
    }
    PyMem_Free(m.parts.data);
    return status;
}

static int chat_member(reader_t *r, const str_t *key, void *ctx) {
    chat_t *chat = ctx;
    if (!str_is(key, "messages")) return skip_value(r);
    if (!first_time(&chat->seen, 1)) return GIVE_UP;
    chat->has_messages = kind_at(r) == V_ARRAY;
    return chat->has_messages ? each_element(r, chat_message, chat) : skip_value(r); /* else: no turns */
}

/* True, False (no list of messages) or None (nothing appended: the reference must decide); NULL: an error. */
static PyObject *read_chat(PyObject *body, PyObject *roles, PyObject *contents) {
    Py_buffer view;
    if (PyObject_GetBuffer(body, &view, PyBUF_SIMPLE) < 0) return NULL;
    chat_t chat = {roles, contents, 0, 0};
    Py_ssize_t roles_before = PyList_GET_SIZE(roles), contents_before = PyList_GET_SIZE(contents);
    int status = read_document(view.buf, view.len, chat_member, &chat); /* copies what it keeps */
    PyBuffer_Release(&view);
    if (status == OK) return PyBool_FromLong(chat.has_messages);
    /* nothing of this request stays in the lists */
    PyObject *error_type, *error_value, *error_tb;
    PyErr_Fetch(&error_type, &error_value, &error_tb);
    if (PyList_SetSlice(roles, roles_before, PyList_GET_SIZE(roles), NULL) < 0 ||
        PyList_SetSlice(contents, contents_before, PyList_GET_SIZE(contents), NULL) < 0) {
        Py_XDECREF(error_type);
        Py_XDECREF(error_value);
        Py_XDECREF(error_tb);
        return NULL;
    }
    if (status == ERROR) {
        PyErr_Restore(error_type, error_value, error_tb);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *chat_turns(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_CheckExact(args[1]) || !PyList_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "chat_turns(body, roles: list, contents: list)");
        return NULL;
    }
    return read_chat(args[0], args[1], args[2]);
}

/* --- a whole batch: one call for its turns, one for its answers ---------------------------------- */

static int append_steal(PyObject *list, PyObject *item) { return append(list, item) == OK ? 0 : -1; }

/* read_turns(endpoints, payloads, roles, contents, offsets, no_turns, general): every request's turns appended
 * to roles and contents, and after each request the turns so far to offsets and whether it had none to
 * no_turns. A chat request this reader cannot decide, and every other request, goes to general(index),
 * which appends that request's turns itself and says whether it has a list of them. */
static PyObject *read_turns(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7 || !PyList_CheckExact(args[2]) || !PyList_CheckExact(args[3]) || !PyList_CheckExact(args[4]) ||
        !PyList_CheckExact(args[5])) {
        PyErr_SetString(PyExc_TypeError,
                        "read_turns(endpoints, payloads, roles: list, contents: list, offsets: list, no_turns: list, "
                        "general)");
        return NULL;
    }
    /* Tuples (copies where lists were given): general(index) runs Python code that may change the caller's lists. */
    PyObject *endpoints = PySequence_Tuple(args[0]), *payloads = PySequence_Tuple(args[1]);
    PyObject *roles = args[2], *contents = args[3], *offsets = args[4], *no_turns = args[5], *general = args[6];
    PyObject *result = NULL;
    if (endpoints == NULL || payloads == NULL) goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(endpoints);
    if (PySequence_Fast_GET_SIZE(payloads) != count) {
        PyErr_SetString(PyExc_ValueError, "endpoints and payloads differ in length");
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *endpoint = PySequence_Fast_GET_ITEM(endpoints, i), *has = NULL;
        if (PyUnicode_Check(endpoint) && PyUnicode_CompareWithASCIIString(endpoint, "chat/completions") == 0) {
            has = read_chat(PySequence_Fast_GET_ITEM(payloads, i), roles, contents);
            if (has == NULL) goto done;
        }
        if (has == NULL || has == Py_None) {
            Py_XDECREF(has);
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL) goto done;
            has = PyObject_CallOneArg(general, index);
            Py_DECREF(index);
            if (has == NULL) goto done;
        }
        int truth = PyObject_IsTrue(has);
        Py_DECREF(has);
        if (truth < 0 || append_steal(no_turns, PyBool_FromLong(!truth)) < 0 ||
            append_steal(offsets, PyLong_FromSsize_t(PyList_GET_SIZE(roles))) < 0)
            goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(endpoints);
    Py_XDECREF(payloads);
    return result;
}

/* read_answers(streams, statuses, answers, general) -> (texts, finish reasons): logrows.answer_of's per record.
 * A non-empty answer of a stream or of a 200 is read here; what this reader cannot decide, and every other
 * record, goes to general(index), which returns the (text, finish reason) pair. */
static PyObject *read_answers(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "read_answers(streams, statuses, answers, general)");
        return NULL;
    }
    /* Tuples (copies where lists were given): general(index) runs Python code that may change the caller's lists. */
    PyObject *streams = PySequence_Tuple(args[0]), *statuses = PySequence_Tuple(args[1]);
    PyObject *answers = PySequence_Tuple(args[2]), *general = args[3];
    PyObject *texts = NULL, *reasons = NULL, *result = NULL;
    if (streams == NULL || statuses == NULL || answers == NULL) goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(answers);
    if (PySequence_Fast_GET_SIZE(streams) != count || PySequence_Fast_GET_SIZE(statuses) != count) {
        PyErr_SetString(PyExc_ValueError, "streams, statuses and answers differ in length");
        goto done;
    }
    if ((texts = PyList_New(count)) == NULL || (reasons = PyList_New(count)) == NULL) goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *answer = PySequence_Fast_GET_ITEM(answers, i), *pair = NULL;
        if (PyBytes_Check(answer) && PyBytes_GET_SIZE(answer) > 0) {
            int stream = PyObject_IsTrue(PySequence_Fast_GET_ITEM(streams, i));
            if (stream < 0) goto done;
            PyObject *status = PySequence_Fast_GET_ITEM(statuses, i);
            int overflow = 0;
            if (stream || (PyLong_CheckExact(status) && PyLong_AsLongAndOverflow(status, &overflow) == 200)) {
                pair = stream ? stream_answer(module, answer) : body_answer(module, answer);
                if (pair == NULL) goto done;
            }
        }
        if (pair == NULL || pair == Py_None) {
            Py_XDECREF(pair);
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL) goto done;
            pair = PyObject_CallOneArg(general, index);
            Py_DECREF(index);
            if (pair == NULL) goto done;
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
                Py_DECREF(pair);
                PyErr_SetString(PyExc_TypeError, "general(index) must return a (text, finish reason) pair");
                goto done;
            }
        }
        PyList_SET_ITEM(texts, i, Py_NewRef(PyTuple_GET_ITEM(pair, 0)));
        PyList_SET_ITEM(reasons, i, Py_NewRef(PyTuple_GET_ITEM(pair, 1)));
        Py_DECREF(pair);
    }
    result = PyTuple_Pack(2, texts, reasons);
done:
    Py_XDECREF(streams);
    Py_XDECREF(statuses);
    Py_XDECREF(answers);
    Py_XDECREF(texts);
    Py_XDECREF(reasons);
    return result;
}

static PyMethodDef methods[] = {
    {"stream_answer", stream_answer, METH_O,
     "(text, finish reason) of choice 0 of an SSE stream, as logrows reads it; None: the reference must decide."},
    {"body_answer", body_answer, METH_O,
     "(text, finish reason) of choice 0 of a whole JSON answer, as logrows reads it; None: the reference must "
     "decide."},
    {"chat_turns", (PyCFunction)(void (*)(void))chat_turns, METH_FASTCALL,
     "Appends a chat request's roles and contents (as logrows.prompt_of reads them) to the two lists: True, or "
     "False when it has no list of messages; None (nothing appended): the reference must decide."},
    {"read_turns", (PyCFunction)(void (*)(void))read_turns, METH_FASTCALL,
     "A batch's chat turns (see chat_turns), each request's end in offsets and whether it had none in no_turns; "
     "general(index) reads what this cannot."},
    {"read_answers", (PyCFunction)(void (*)(void))read_answers, METH_FASTCALL,
     "A batch's (texts, finish reasons), as logrows.answer_of reads them; general(index) reads what this cannot."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lognative", "The request log's JSON reading in C (answers, chat turns).", -1, methods,
};

PyMODINIT_FUNC PyInit__lognative(void) {
    init_plain();
    const char *roles[3] = {"system", "user", "assistant"};
    for (int i = 0; i < 3; i++)
        if (ROLES[i] == NULL && (ROLES[i] = PyUnicode_InternFromString(roles[i])) == NULL) return NULL;
    return PyModule_Create(&module);
}
