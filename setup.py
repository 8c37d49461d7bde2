"""The optional compiled module (proxy/ingress/_compiled.pyx), built the way aiohttp, yarl and multidict build theirs.

Everything else is in pyproject.toml. With Cython and a C compiler the twin of `prepare()` is
compiled at install time; without them, or when the build fails, or with SPLITTER_NO_EXTENSIONS=1,
the install goes on with a warning and splitter runs the pure-Python `prepare()`.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = "proxy/ingress/_compiled.pyx"


def _warn(message: str) -> None:
    print(f"splitter: {message}; the pure-Python prepare() will run instead (same behaviour, slower)", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """A failed compile is a warning, not a failed install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            _warn(f"the compiled module could not be built ({exc})")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            _warn(f"{ext.name} could not be built ({exc})")


def extensions() -> list[Extension]:
    if os.environ.get("SPLITTER_NO_EXTENSIONS", "") not in ("", "0"):  # as proxy/ingress/implementation.py reads it
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _warn("Cython is not installed, so the compiled module is not built")
        return []
    try:
        return list(cythonize([Extension("proxy.ingress._compiled", [SOURCE])], quiet=True))
    except Exception as exc:
        _warn(f"Cython could not translate {SOURCE} ({exc})")
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
