/* The request log's queue in C: records waiting for their batch, each written at once as the bytes that
 * marshal.dumps(record, 2) gives, into one growing buffer (service/requestlog/queue.py has the Python twin
 * and says why). ``take(limit)`` hands the first ``limit`` records over as one marshalled list: the batch, as
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
    if (n > 0) memcpy(out, bytes, n); /* never with n == 0: the source may then be NULL (undefined behaviour) */
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
            memcpy(out, PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes)); /* marshal's bytes: never empty */
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
    if (end > 0) memcpy(out + 5, q->data, end);
    if (end > 0 && q->len > end) memmove(q->data, q->data + end, q->len - end); /* q->data may be NULL */
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
    .tp_name = "loragate.service.requestlog._logqueue.RecordQueue",
    .tp_basicsize = sizeof(Queue),
    .tp_dealloc = (destructor)queue_dealloc,
    .tp_as_sequence = &queue_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Records waiting for their batch, each already marshalled, in one buffer.",
    .tp_methods = queue_methods,
    .tp_getset = queue_getset,
    .tp_new = PyType_GenericNew,
};

static PyMethodDef module_methods[] = {
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
