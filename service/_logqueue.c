/* The request log's queue in C: records waiting for their batch, each written at once as the bytes that
 * marshal.dumps(record, 2) gives, into one growing buffer (service/logqueue.py has the Python twin and says
 * why). ``take(limit)`` hands the first ``limit`` records over as one marshalled list: the batch, as
 * marshal.loads reads it in the conversion process; there ``read_columns`` reads it back one column a field
 * instead, where it can (below).
 *
 * The formats written here (marshal version 2, no references): None "N", True "T", False "F", an int that
 * fits 32 bits "i" + 4 bytes, a float "g" + 8 bytes, bytes "s" + length + data, an ASCII str "u" + length +
 * data, a tuple "(" + count + items, a list "[" + count + items (little-endian 32-bit counts and lengths).
 * Any other value (a non-ASCII str, a large int, a nested container) is written by marshal itself.
 * Every method runs holding the GIL and never releases it: the event loop appends while the writer thread
 * takes, one at a time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <marshal.h>
#include <stdint.h>
#include <string.h>

#define MARSHAL_VERSION 2
#define SHRINK_ABOVE (1 << 20) /* an emptied buffer this large and 4x what it held is cut down */

typedef struct {
    PyObject_HEAD
    char *data;
    Py_ssize_t len, cap;
    Py_ssize_t *ends; /* the end of each record in data */
    Py_ssize_t count, ends_cap;
} Queue;

static int reserve(Queue *q, Py_ssize_t more) {
    if (q->len + more <= q->cap) return 0;
    Py_ssize_t cap = q->cap ? q->cap : 65536;
    while (cap < q->len + more) cap *= 2;
    char *data = PyMem_RawRealloc(q->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    q->data = data;
    q->cap = cap;
    return 0;
}

/* Bytes ``value`` takes when this file writes it itself; -1 for the values marshal writes (any other type,
 * a non-ASCII str, an int over 32 bits, a str or bytes over 2 GiB, which marshal refuses). */
static Py_ssize_t own_size(PyObject *value) {
    Py_ssize_t n = -1;
    if (value == Py_None || value == Py_True || value == Py_False) return 1;
    if (PyFloat_CheckExact(value)) return 9;
    if (PyUnicode_CheckExact(value) && PyUnicode_IS_ASCII(value)) n = PyUnicode_GET_LENGTH(value);
    else if (PyBytes_CheckExact(value)) n = PyBytes_GET_SIZE(value);
    else if (PyLong_CheckExact(value)) {
        int overflow;
        long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (!overflow && number >= INT32_MIN && number <= INT32_MAX) return 5;
        PyErr_Clear();
    }
    return n >= 0 && n <= INT32_MAX ? 5 + n : -1;
}

static unsigned char *le32(unsigned char *out, char type, uint32_t value) {
    out[0] = (unsigned char)type;
    out[1] = value & 0xff;
    out[2] = (value >> 8) & 0xff;
    out[3] = (value >> 16) & 0xff;
    out[4] = (value >> 24) & 0xff;
    return out + 5;
}

static unsigned char *put_bytes(unsigned char *out, char type, const void *bytes, Py_ssize_t n) {
    out = le32(out, type, (uint32_t)n);
    memcpy(out, bytes, n);
    return out + n;
}

/* Writes a value own_size measured; NULL on error (a float PyFloat_Pack8 cannot write). */
static unsigned char *put_own(unsigned char *out, PyObject *value) {
    if (value == Py_None) *out++ = 'N';
    else if (value == Py_True) *out++ = 'T';
    else if (value == Py_False) *out++ = 'F';
    else if (PyUnicode_CheckExact(value))
        out = put_bytes(out, 'u', PyUnicode_1BYTE_DATA(value), PyUnicode_GET_LENGTH(value));
    else if (PyBytes_CheckExact(value))
        out = put_bytes(out, 's', PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
    else if (PyFloat_CheckExact(value)) {
        *out++ = 'g';
        if (PyFloat_Pack8(PyFloat_AS_DOUBLE(value), (char *)out, 1) < 0) return NULL;
        out += 8;
    } else /* an int of 32 bits */
        out = le32(out, 'i', (uint32_t)(int32_t)PyLong_AsLongLong(value));
    return out;
}

/* A record is measured first, then written with one reservation, so nothing of one that fails stays behind.
 * Its fields this file does not write are marshalled while measuring (rare: the gateway's records hold none). */
static PyObject *queue_append(Queue *q, PyObject *record) {
    if (!PyTuple_Check(record)) {
        PyErr_Format(PyExc_TypeError, "a request log record is a tuple, not %.100s", Py_TYPE(record)->tp_name);
        return NULL;
    }
    if (q->count == q->ends_cap) {
        Py_ssize_t cap = q->ends_cap ? q->ends_cap * 2 : 1024;
        Py_ssize_t *ends = PyMem_RawRealloc(q->ends, cap * sizeof(Py_ssize_t));
        if (ends == NULL) return PyErr_NoMemory();
        q->ends = ends;
        q->ends_cap = cap;
    }
    Py_ssize_t fields = PyTuple_GET_SIZE(record), size = 5;
    PyObject **marshalled = NULL; /* per field: marshal's bytes, or NULL where this file writes it */
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < fields; i++) {
        PyObject *value = PyTuple_GET_ITEM(record, i);
        Py_ssize_t own = own_size(value);
        if (own >= 0) {
            size += own;
            continue;
        }
        if (marshalled == NULL && (marshalled = PyMem_Calloc(fields, sizeof(PyObject *))) == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        if ((marshalled[i] = PyMarshal_WriteObjectToString(value, MARSHAL_VERSION)) == NULL) goto done;
        size += PyBytes_GET_SIZE(marshalled[i]);
    }
    if (reserve(q, size) < 0) goto done;
    unsigned char *out = le32((unsigned char *)q->data + q->len, '(', (uint32_t)fields);
    for (Py_ssize_t i = 0; i < fields; i++) {
        PyObject *bytes = marshalled ? marshalled[i] : NULL;
        if (bytes != NULL) {
            memcpy(out, PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes));
            out += PyBytes_GET_SIZE(bytes);
        } else if ((out = put_own(out, PyTuple_GET_ITEM(record, i))) == NULL) {
            goto done;
        }
    }
    q->len = (char *)out - q->data;
    q->ends[q->count++] = q->len;
    result = Py_NewRef(Py_None);
done:
    if (marshalled != NULL) {
        for (Py_ssize_t i = 0; i < fields; i++) Py_XDECREF(marshalled[i]);
        PyMem_Free(marshalled);
    }
    return result;
}

static PyObject *queue_take(Queue *q, PyObject *arg) {
    Py_ssize_t limit = PyLong_AsSsize_t(arg);
    if (limit == -1 && PyErr_Occurred()) return NULL;
    if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "take: limit must be >= 0");
        return NULL;
    }
    Py_ssize_t n = limit < q->count ? limit : q->count;
    Py_ssize_t end = n ? q->ends[n - 1] : 0;
    PyObject *batch = PyBytes_FromStringAndSize(NULL, 5 + end);
    if (batch == NULL) return NULL;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(batch);
    out[0] = '[';
    for (int i = 0; i < 4; i++) out[1 + i] = ((uint32_t)n >> (8 * i)) & 0xff;
    if (end) memcpy(out + 5, q->data, end);
    memmove(q->data, q->data + end, q->len - end);
    q->len -= end;
    for (Py_ssize_t i = n; i < q->count; i++) q->ends[i - n] = q->ends[i] - end;
    q->count -= n;
    if (q->count == 0 && q->cap > SHRINK_ABOVE && q->cap > 4 * end) { /* the memory follows the load down */
        PyMem_RawFree(q->data);
        PyMem_RawFree(q->ends);
        q->data = NULL;
        q->ends = NULL;
        q->cap = q->ends_cap = 0;
    }
    return batch;
}

static Py_ssize_t queue_len(Queue *q) { return q->count; }

static PyObject *queue_nbytes(Queue *q, void *closure) { return PyLong_FromSsize_t(q->len); }

static void queue_dealloc(Queue *q) {
    PyMem_RawFree(q->data);
    PyMem_RawFree(q->ends);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

static PyMethodDef queue_methods[] = {
    {"append", (PyCFunction)queue_append, METH_O,
     "Queue a record (a tuple of plain values) as marshal.dumps(record, 2) writes it; a value marshal cannot "
     "write raises ValueError and leaves nothing queued."},
    {"take", (PyCFunction)queue_take, METH_O,
     "The first min(limit, len) records, removed, as one marshalled list (what marshal.dumps(list_of_them, 2) "
     "gives)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef queue_getset[] = {
    {"nbytes", (getter)queue_nbytes, NULL, "Bytes the queued records take.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods queue_as_sequence = {.sq_length = (lenfunc)queue_len};

static PyTypeObject QueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "loragate.service._logqueue.RecordQueue",
    .tp_basicsize = sizeof(Queue),
    .tp_dealloc = (destructor)queue_dealloc,
    .tp_as_sequence = &queue_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Records waiting for their batch, each already marshalled, in one buffer.",
    .tp_methods = queue_methods,
    .tp_getset = queue_getset,
    .tp_new = PyType_GenericNew,
};

/* --- a batch read back as columns --------------------------------------------------------------------
 *
 * read_columns(batch, spec): a batch ``take`` gave (a marshalled list of equal tuples) as one column a field,
 * without a tuple a record: what the conversion process turns into Arrow. ``spec`` has a letter a field, and
 * "?" after the letter of a field that may be None:
 *   A  str    -> (validity, offsets, data, null count): an Arrow string array's buffers (int32 offsets)
 *   F  float  -> (validity, values, null count): float64 (an int of 32 bits is taken as its float)
 *   I  int    -> (validity, values, null count): int64 (32-bit ints only)
 *   S  str    -> a list (a value equal to the one before is the same object: routes and variants repeat)
 *   i  int, b bool, y bytes -> a list
 * validity is None when no value is None. Anything else (another type, an int over 32 bits, a str that is not
 * UTF-8, such as a lone surrogate, a record of another length, bytes that end early) returns None and no
 * exception: the caller unmarshals the batch instead. */

typedef struct {
    const unsigned char *p, *end;
} cursor_t;

static int read_u32(cursor_t *c, uint32_t *out) {
    if (c->end - c->p < 4) return -1;
    *out = (uint32_t)c->p[0] | (uint32_t)c->p[1] << 8 | (uint32_t)c->p[2] << 16 | (uint32_t)c->p[3] << 24;
    c->p += 4;
    return 0;
}

/* A "u" or "s" value's bytes: its length read, the cursor moved past them. */
static int read_sized(cursor_t *c, const unsigned char **data, uint32_t *n) {
    if (read_u32(c, n) < 0 || (Py_ssize_t)*n > c->end - c->p) return -1;
    *data = c->p;
    c->p += *n;
    return 0;
}

static int is_utf8(const unsigned char *s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n;) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        unsigned lo = 0x80, hi = 0xBF;
        int len;
        if (c >= 0xC2 && c <= 0xDF) len = 2;
        else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F; /* no surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else return 0;
        if (n - i < len || s[i + 1] < lo || s[i + 1] > hi) return 0;
        for (int k = 2; k < len; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xBF) return 0;
        i += len;
    }
    return 1;
}

typedef struct {
    char kind;
    int nullable;
    Py_ssize_t nulls;
    PyObject *validity, *values, *list; /* validity and values: bytes; list: the list kinds' */
    unsigned char *bits;                /* validity's bytes, all set until a None clears one */
    int32_t *offsets;                   /* A: values holds the offsets; the characters go to chars */
    char *chars;
    Py_ssize_t chars_len, chars_cap;
    PyObject *last;                     /* S: the value before, borrowed from list */
    const unsigned char *last_data;
    uint32_t last_n;
} column_t;

static void column_clear(column_t *col) {
    Py_CLEAR(col->validity);
    Py_CLEAR(col->values);
    Py_CLEAR(col->list);
    PyMem_Free(col->chars);
    col->chars = NULL;
}

/* 0: read; 1: give up; -1: an error (memory) */
static int read_value(cursor_t *c, column_t *col, Py_ssize_t row) {
    if (c->p >= c->end) return 1;
    unsigned char type = *c->p++;
    if (type == 'N') {
        if (!col->nullable) return 1;
        col->nulls++;
        if (col->bits != NULL) col->bits[row >> 3] &= (unsigned char)~(1u << (row & 7));
        switch (col->kind) {
        case 'A': col->offsets[row + 1] = (int32_t)col->chars_len; return 0;
        case 'F': ((double *)PyBytes_AS_STRING(col->values))[row] = 0.0; return 0;
        case 'I': ((int64_t *)PyBytes_AS_STRING(col->values))[row] = 0; return 0;
        default: PyList_SET_ITEM(col->list, row, Py_NewRef(Py_None)); col->last = NULL; return 0;
        }
    }
    uint32_t n;
    const unsigned char *data;
    switch (col->kind) {
    case 'A':
        if (type != 'u' || read_sized(c, &data, &n) < 0 || !is_utf8(data, n)) return 1;
        if (col->chars_len + (Py_ssize_t)n > INT32_MAX) return 1;
        if (col->chars_len + (Py_ssize_t)n > col->chars_cap) {
            Py_ssize_t cap = col->chars_cap ? col->chars_cap : 65536;
            while (cap < col->chars_len + (Py_ssize_t)n) cap *= 2;
            char *chars = PyMem_Realloc(col->chars, cap);
            if (chars == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            col->chars = chars;
            col->chars_cap = cap;
        }
        memcpy(col->chars + col->chars_len, data, n);
        col->chars_len += n;
        col->offsets[row + 1] = (int32_t)col->chars_len;
        return 0;
    case 'F':
    case 'I': {
        double number;
        int64_t whole = 0;
        if (type == 'i') {
            uint32_t bits;
            if (read_u32(c, &bits) < 0) return 1;
            whole = (int32_t)bits;
            number = (double)whole;
        } else if (type == 'g' && col->kind == 'F') {
            if (c->end - c->p < 8) return 1;
            number = PyFloat_Unpack8((const char *)c->p, 1);
            if (number == -1.0 && PyErr_Occurred()) return -1;
            c->p += 8;
        } else return 1;
        if (col->kind == 'F') ((double *)PyBytes_AS_STRING(col->values))[row] = number;
        else ((int64_t *)PyBytes_AS_STRING(col->values))[row] = whole;
        return 0;
    }
    case 'S': {
        if (type != 'u' || read_sized(c, &data, &n) < 0) return 1;
        PyObject *value;
        if (col->last != NULL && n == col->last_n && memcmp(data, col->last_data, n) == 0) {
            value = Py_NewRef(col->last);
        } else if ((value = PyUnicode_DecodeUTF8((const char *)data, n, "surrogatepass")) == NULL) {
            return -1;
        }
        PyList_SET_ITEM(col->list, row, value);
        col->last = value;
        col->last_data = data;
        col->last_n = n;
        return 0;
    }
    case 'i': {
        uint32_t bits;
        if (type != 'i' || read_u32(c, &bits) < 0) return 1;
        PyObject *value = PyLong_FromLong((int32_t)bits);
        if (value == NULL) return -1;
        PyList_SET_ITEM(col->list, row, value);
        return 0;
    }
    case 'b':
        if (type != 'T' && type != 'F') return 1;
        PyList_SET_ITEM(col->list, row, Py_NewRef(type == 'T' ? Py_True : Py_False));
        return 0;
    case 'y': {
        if (type != 's' || read_sized(c, &data, &n) < 0) return 1;
        PyObject *value = PyBytes_FromStringAndSize((const char *)data, n);
        if (value == NULL) return -1;
        PyList_SET_ITEM(col->list, row, value);
        return 0;
    }
    }
    return 1;
}

/* The column's value for Python, built once every row is read. */
static PyObject *column_result(column_t *col) {
    PyObject *validity = col->nulls ? col->validity : Py_None;
    switch (col->kind) {
    case 'A': {
        PyObject *chars = PyBytes_FromStringAndSize(col->chars ? col->chars : "", col->chars_len);
        if (chars == NULL) return NULL;
        PyObject *out = Py_BuildValue("(OOOn)", validity, col->values, chars, col->nulls);
        Py_DECREF(chars);
        return out;
    }
    case 'F':
    case 'I': return Py_BuildValue("(OOn)", validity, col->values, col->nulls);
    default: return Py_NewRef(col->list);
    }
}

static PyObject *read_columns(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyUnicode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "read_columns(batch, spec: str)");
        return NULL;
    }
    Py_ssize_t spec_len;
    const char *spec = PyUnicode_AsUTF8AndSize(args[1], &spec_len);
    if (spec == NULL) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    cursor_t c = {view.buf, (const unsigned char *)view.buf + view.len};
    column_t columns[64];
    int fields = 0;
    PyObject *result = NULL;
    int status = 1;
    for (Py_ssize_t i = 0; i < spec_len; i++) {
        if (spec[i] == '?' && fields > 0) {
            columns[fields - 1].nullable = 1;
            continue;
        }
        if (fields == 64 || strchr("AFISiby", spec[i]) == NULL) {
            PyErr_Format(PyExc_ValueError, "read_columns: bad spec %R", args[1]);
            PyBuffer_Release(&view);
            return NULL;
        }
        columns[fields++] = (column_t){.kind = spec[i]};
    }
    uint32_t rows;
    if (c.p >= c.end || *c.p++ != '[' || read_u32(&c, &rows) < 0 || rows > (uint32_t)(c.end - c.p)) goto done;
    for (int f = 0; f < fields; f++) { /* every row takes at least a byte: rows is bounded by the batch's size */
        column_t *col = &columns[f];
        status = -1;
        if (col->kind == 'A' || col->kind == 'F' || col->kind == 'I') {
            Py_ssize_t width = col->kind == 'A' ? 4 : 8, count = col->kind == 'A' ? (Py_ssize_t)rows + 1 : rows;
            if ((col->values = PyBytes_FromStringAndSize(NULL, width * count)) == NULL) goto done;
            if (col->kind == 'A') (col->offsets = (int32_t *)PyBytes_AS_STRING(col->values))[0] = 0;
            if (col->nullable) {
                if ((col->validity = PyBytes_FromStringAndSize(NULL, ((Py_ssize_t)rows + 7) / 8)) == NULL) goto done;
                col->bits = (unsigned char *)PyBytes_AS_STRING(col->validity);
                memset(col->bits, 0xff, ((Py_ssize_t)rows + 7) / 8);
            }
        } else if ((col->list = PyList_New(rows)) == NULL) goto done;
    }
    status = 1;
    for (Py_ssize_t row = 0; row < (Py_ssize_t)rows; row++) {
        uint32_t n;
        if (c.p >= c.end || *c.p++ != '(' || read_u32(&c, &n) < 0 || n != (uint32_t)fields) {
            status = 1;
            goto done;
        }
        for (int f = 0; f < fields; f++) {
            if ((status = read_value(&c, &columns[f], row)) != 0) goto done; /* a list's unset items: NULL, freed */
        }
    }
    status = c.p == c.end ? 0 : 1;
    if (status == 0) {
        if ((result = PyList_New(fields)) == NULL) goto done;
        for (int f = 0; f < fields; f++) {
            PyObject *column = column_result(&columns[f]);
            if (column == NULL) {
                Py_CLEAR(result);
                goto done;
            }
            PyList_SET_ITEM(result, f, column);
        }
    }
done:
    for (int f = 0; f < fields; f++) column_clear(&columns[f]);
    PyBuffer_Release(&view);
    if (result == NULL && status > 0) Py_RETURN_NONE; /* gave up: the caller unmarshals */
    return result;
}

static PyMethodDef module_methods[] = {
    {"read_columns", (PyCFunction)(void (*)(void))read_columns, METH_FASTCALL,
     "read_columns(batch, spec): a batch take() gave, as one column a field (see the source); None where it "
     "cannot: the caller unmarshals the batch."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_logqueue", "The request log's queue in C (records kept marshalled).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__logqueue(void) {
    if (PyType_Ready(&QueueType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "RecordQueue", (PyObject *)&QueueType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
