/* The byte counts the POP3 parser needs of a message body, in one pass.
 *
 * connector/pop3/protocol.py (_unstuff) decides from them, for every retrieved message, whether
 * the body is CRLF-clean (RFC 5321 §2.3.8: SMTP must not see a bare CR or LF) and whether every
 * line that starts with a dot came dot-stuffed (RFC 1939 §3), so that the body can go to SMTP's
 * DATA as it is (RFC 5321 §4.5.2).  Five bytes.count() calls cost ~130 us on the benchmark's
 * average 47 KB message, most of the parser's time; this loop costs a tenth of that.  The
 * pure-Python fallback (protocol._line_counts) gives the same numbers; a property test holds
 * the two equal.
 *
 * line_counts(body) -> (LF, CR, CRLF, CRLF ".", CRLF "..") as five ints, each the number of
 * occurrences bytes.count() would report (none of the patterns overlaps itself).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Above this many octets the GIL is released while counting (the ledger thread may run). */
#define RELEASE_GIL_ABOVE (1024 * 1024)

static PyObject *
line_counts(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)view.buf;
    const Py_ssize_t n = view.len;
    Py_ssize_t lf = 0, cr = 0, crlf = 0, dot = 0, dotdot = 0;
    PyThreadState *released = n > RELEASE_GIL_ABOVE ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char c = p[i];
        if (c > '\r') {
            continue; /* LF (10) and CR (13) are the only bytes of interest */
        }
        if (c == '\n') {
            lf++;
        }
        else if (c == '\r') {
            cr++;
            if (i + 1 < n && p[i + 1] == '\n') {
                crlf++;
                if (i + 2 < n && p[i + 2] == '.') {
                    dot++;
                    if (i + 3 < n && p[i + 3] == '.') {
                        dotdot++;
                    }
                }
            }
        }
    }
    if (released != NULL) {
        PyEval_RestoreThread(released);
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nnnnn)", lf, cr, crlf, dot, dotdot);
}

static PyMethodDef scan_methods[] = {
    {"line_counts", line_counts, METH_O,
     "line_counts(body) -> (LF, CR, CRLF, CRLF '.', CRLF '..') occurrence counts."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT,
    "_scan",
    "One-pass byte counts for the POP3 parser (see _scan.c).",
    -1,
    scan_methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModule_Create(&scan_module);
}
