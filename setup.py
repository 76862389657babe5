"""The one compiled part: model/_native.c (everything else is in pyproject.toml).

It builds with the C compiler Python extensions use; without one the install
fails rather than quietly serving tabular models several times slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "model._native",
            sources=["model/_native.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit"],
        )
    ]
)
