"""The compiled parts, all for the request log:

- the scrubber's rules in C (PCRE2), loragate.common._scrubnative (conversion process);
- the answers' and chat requests' JSON read in C, loragate.service.requestlog._lognative (conversion process);
- the queue of records waiting for their batch, kept marshalled, loragate.service.requestlog._logqueue (gateway).

All optional: without a C compiler (or PCRE2's headers, Debian: libpcre2-dev) the package installs
without them and the log takes the Python paths alone (same output, slower).
Everything else is configured in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "loragate.common._scrubnative",
            ["loragate/common/_scrubnative.c"],
            libraries=["pcre2-8"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "loragate.service.requestlog._lognative",
            ["service/requestlog/_lognative.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "loragate.service.requestlog._logqueue",
            ["service/requestlog/_logqueue.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
    ]
)
