"""Builds the optional C helper of the POP3 parser; everything else is in pyproject.toml.

``optional=True``: without a C compiler (a slim container image, say) the install goes on and
the parser uses its pure-Python counts, which give the same results more slowly
(connector/pop3/_scan.c says why it exists; bench/README.md has the measurement).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "connector.pop3._scan",
            ["connector/pop3/_scan.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
