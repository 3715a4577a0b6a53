/* The request log's queue in C: records waiting for their batch, each written at once as the bytes that
 * marshal.dumps(record, 2) gives, into one growing buffer (service/logqueue.py has the Python twin and says
 * why). ``take(limit)`` hands the first ``limit`` records over as one marshalled list: the batch, as
 * marshal.loads reads it in the conversion process.
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

static int put(Queue *q, const void *bytes, Py_ssize_t n) {
    if (reserve(q, n) < 0) return -1;
    memcpy(q->data + q->len, bytes, n);
    q->len += n;
    return 0;
}

static int put_le32(Queue *q, char type, uint32_t value) {
    unsigned char head[5] = {(unsigned char)type, value & 0xff, (value >> 8) & 0xff, (value >> 16) & 0xff,
                             (value >> 24) & 0xff};
    return put(q, head, 5);
}

static int put_sized(Queue *q, char type, const char *bytes, Py_ssize_t n) {
    if (n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "request log record: a value over 2 GiB");
        return -1;
    }
    if (reserve(q, 5 + n) < 0) return -1;
    put_le32(q, type, (uint32_t)n);
    return put(q, bytes, n);
}

/* What marshal writes for ``value`` (version 2), for the values this file does not write itself. */
static int put_marshalled(Queue *q, PyObject *value) {
    PyObject *bytes = PyMarshal_WriteObjectToString(value, MARSHAL_VERSION);
    if (bytes == NULL) return -1;
    int result = put(q, PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes));
    Py_DECREF(bytes);
    return result;
}

static int put_value(Queue *q, PyObject *value) {
    if (value == Py_None) return put(q, "N", 1);
    if (value == Py_True) return put(q, "T", 1);
    if (value == Py_False) return put(q, "F", 1);
    if (PyUnicode_CheckExact(value) && PyUnicode_IS_ASCII(value))
        return put_sized(q, 'u', (const char *)PyUnicode_1BYTE_DATA(value), PyUnicode_GET_LENGTH(value));
    if (PyBytes_CheckExact(value)) return put_sized(q, 's', PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
    if (PyFloat_CheckExact(value)) {
        unsigned char packed[9] = {'g'};
        if (PyFloat_Pack8(PyFloat_AS_DOUBLE(value), (char *)packed + 1, 1) < 0) return -1;
        return put(q, packed, 9);
    }
    if (PyLong_CheckExact(value)) {
        int overflow;
        long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (number == -1 && PyErr_Occurred()) return -1;
        if (!overflow && number >= INT32_MIN && number <= INT32_MAX)
            return put_le32(q, 'i', (uint32_t)(int32_t)number);
    }
    return put_marshalled(q, value);
}

/* Bytes ``value`` takes when this file writes it itself; -1 for the values marshal writes. */
static Py_ssize_t own_size(PyObject *value) {
    if (value == Py_None || value == Py_True || value == Py_False) return 1;
    if (PyUnicode_CheckExact(value) && PyUnicode_IS_ASCII(value)) return 5 + PyUnicode_GET_LENGTH(value);
    if (PyBytes_CheckExact(value)) return 5 + PyBytes_GET_SIZE(value);
    if (PyFloat_CheckExact(value)) return 9;
    if (PyLong_CheckExact(value)) {
        int overflow;
        long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (!overflow && number >= INT32_MIN && number <= INT32_MAX) return 5;
        PyErr_Clear();
    }
    return -1;
}

static unsigned char *le32(unsigned char *out, char type, uint32_t value) {
    out[0] = (unsigned char)type;
    out[1] = value & 0xff;
    out[2] = (value >> 8) & 0xff;
    out[3] = (value >> 16) & 0xff;
    out[4] = (value >> 24) & 0xff;
    return out + 5;
}

/* The common record, every field one this file writes and none over 2 GiB: its size known first, one
 * reservation and plain stores. 0 written, 1 not such a record (nothing written), -1 error. */
static int put_plain_record(Queue *q, PyObject *record) {
    Py_ssize_t fields = PyTuple_GET_SIZE(record), size = 5;
    for (Py_ssize_t i = 0; i < fields; i++) {
        Py_ssize_t own = own_size(PyTuple_GET_ITEM(record, i));
        if (own < 0 || own > INT32_MAX) return 1;
        size += own;
    }
    if (reserve(q, size) < 0) return -1;
    unsigned char *out = le32((unsigned char *)q->data + q->len, '(', (uint32_t)fields);
    for (Py_ssize_t i = 0; i < fields; i++) {
        PyObject *value = PyTuple_GET_ITEM(record, i);
        if (value == Py_None) {
            *out++ = 'N';
        } else if (value == Py_True) {
            *out++ = 'T';
        } else if (value == Py_False) {
            *out++ = 'F';
        } else if (PyUnicode_CheckExact(value)) { /* ASCII: own_size said so */
            Py_ssize_t n = PyUnicode_GET_LENGTH(value);
            out = le32(out, 'u', (uint32_t)n);
            memcpy(out, PyUnicode_1BYTE_DATA(value), n);
            out += n;
        } else if (PyBytes_CheckExact(value)) {
            Py_ssize_t n = PyBytes_GET_SIZE(value);
            out = le32(out, 's', (uint32_t)n);
            memcpy(out, PyBytes_AS_STRING(value), n);
            out += n;
        } else if (PyFloat_CheckExact(value)) {
            *out++ = 'g';
            if (PyFloat_Pack8(PyFloat_AS_DOUBLE(value), (char *)out, 1) < 0) return -1;
            out += 8;
        } else { /* an int of 32 bits: own_size said so */
            out = le32(out, 'i', (uint32_t)(int32_t)PyLong_AsLongLong(value));
        }
    }
    q->len = (char *)out - q->data;
    return 0;
}

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
    Py_ssize_t start = q->len, fields = PyTuple_GET_SIZE(record);
    int plain = put_plain_record(q, record);
    if (plain < 0) goto undo;
    if (plain == 0) {
        q->ends[q->count++] = q->len;
        Py_RETURN_NONE;
    }
    if (put_le32(q, '(', (uint32_t)fields) < 0) goto undo;
    for (Py_ssize_t i = 0; i < fields; i++)
        if (put_value(q, PyTuple_GET_ITEM(record, i)) < 0) goto undo;
    q->ends[q->count++] = q->len;
    Py_RETURN_NONE;
undo: /* nothing of a record that cannot be written stays behind */
    q->len = start;
    return NULL;
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

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_logqueue", "The request log's queue in C (records kept marshalled).", -1, NULL,
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
