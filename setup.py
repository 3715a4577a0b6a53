"""The compiled parts, both for the request log's conversion process:

- the scrubber's rules in C (PCRE2), loragate.common._scrubnative;
- the answers' and chat requests' JSON read in C, loragate.service._lognative.

Both optional: without a C compiler (or PCRE2's headers, Debian: libpcre2-dev) the package installs
without them and the log takes the Python paths alone (same output, slower).
Everything else is configured in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("loragate.common._scrubnative", ["loragate/common/_scrubnative.c"],
                             libraries=["pcre2-8"], extra_compile_args=["-O2"], optional=True),
                   Extension("loragate.service._lognative", ["service/_lognative.c"], extra_compile_args=["-O2"],
                             optional=True)])
