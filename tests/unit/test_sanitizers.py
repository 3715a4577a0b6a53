"""The request log's C code under AddressSanitizer and UndefinedBehaviorSanitizer, fuzzed against its Python twin.

Builds service/requestlog/_lognative.c and _logqueue.c with -fsanitize=address,undefined (every finding
fatal: -fno-sanitize-recover=all) into a temporary folder, and runs tests/unit/sanitized_fuzz.py against
them in a child interpreter with the ASan runtime preloaded (the interpreter itself is not built with it),
for a bounded time. A canary extension with a known out-of-bounds read and a known memcpy from NULL shows
the harness does catch what it is for.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"_lognative": ROOT / "service/requestlog/_lognative.c", "_logqueue": ROOT / "service/requestlog/_logqueue.c"}
FUZZ_SECONDS = 45
FLAGS = [
    "-O1",
    "-g",
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-shared",
    "-fPIC",
]
CANARY = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
static PyObject *overflow(PyObject *m, PyObject *arg) {
    char *p = PyMem_RawMalloc(8);
    volatile char c = p[PyLong_AsLong(arg)];
    PyMem_RawFree(p);
    return PyLong_FromLong(c);
}
static PyObject *null_copy(PyObject *m, PyObject *arg) {
    char out[1];
    char *volatile from = NULL;
    memcpy(out, from, (size_t)PyLong_AsLong(arg));
    Py_RETURN_NONE;
}
static PyMethodDef methods[] = {{"overflow", overflow, METH_O, ""}, {"null_copy", null_copy, METH_O, ""},
                                {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "canary", "", -1, methods};
PyMODINIT_FUNC PyInit_canary(void) { return PyModule_Create(&module); }
"""


def _runtime() -> str:
    path = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert os.path.isabs(path) and os.path.exists(path), f"no ASan runtime for gcc ({path!r}): apt libasan8"
    return path


def _build(source: Path, folder: Path, name: str) -> Path:
    out = folder / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(
        ["gcc", *FLAGS, f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "LD_PRELOAD": _runtime(),
        "PYTHONMALLOC": "malloc",  # every allocation seen by ASan
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=87",
    }
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sanitized")
    for name, source in SOURCES.items():
        _build(source, folder, name)
    return folder


def test_the_harness_catches_an_overflow_and_a_copy_from_null(tmp_path):
    source = tmp_path / "canary.c"
    source.write_text(CANARY)
    _build(source, tmp_path, "canary")
    load = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import canary; "
    fine = _run(["-c", load + "canary.overflow(3); canary.null_copy(0) if False else None; print('ok')"], 60)
    assert fine.returncode == 0 and fine.stdout.strip() == "ok", fine.stderr[-2000:]
    overflow = _run(["-c", load + "canary.overflow(8)"], 60)
    assert overflow.returncode == 86 and "heap-buffer-overflow" in overflow.stderr, overflow.stderr[-2000:]
    null_copy = _run(["-c", load + "canary.null_copy(0)"], 60)
    assert null_copy.returncode == 87 and "null pointer" in null_copy.stderr, null_copy.stderr[-2000:]


@pytest.mark.slow  # builds the C under ASan/UBSan and replays the references, ~50 s
def test_the_c_entry_points_equal_their_references_under_the_sanitizers(sanitized):
    result = _run([str(ROOT / "tests/unit/sanitized_fuzz.py"), str(sanitized), str(FUZZ_SECONDS)], FUZZ_SECONDS + 120)
    findings = [line for line in result.stderr.splitlines() if "runtime error" in line or "Sanitizer" in line]
    assert result.returncode == 0 and not findings, (findings[:5], result.stderr[-4000:])
    examples = int(result.stdout.split("fuzzed ")[1].split()[0])
    assert examples >= 300, result.stdout  # it did run, for long enough to mean something (~1,000 here)
