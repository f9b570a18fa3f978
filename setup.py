"""Build step beside pyproject.toml: the package's optional CPU kernels (``models/_cpukernels.c``).

On Linux x86-64 the kernels are compiled as a plain shared library (no Python API; ``models/cpukernels.py``
loads it with ctypes). The extension is optional: without a C compiler the install goes on and the server
runs torch's kernels only (``/health`` then says the kernels are off). Everything else is in pyproject.toml.
"""

import platform
import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64"):
    ext_modules.append(
        Extension(
            "deepseek_ocr_server.models._cpukernels",
            sources=["src/deepseek_ocr_server/models/_cpukernels.c"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
