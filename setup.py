"""The one compiled part: the scrubber's rules in C (PCRE2), loragate.common._scrubnative.

Optional: without a C compiler or PCRE2's headers (Debian: libpcre2-dev) the package installs
without it and the request log scrubs with Python's re alone (same output, slower).
Everything else is configured in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("loragate.common._scrubnative", ["loragate/common/_scrubnative.c"],
                             libraries=["pcre2-8"], extra_compile_args=["-O2"], optional=True)])
