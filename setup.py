"""Packaging: ``kernels/`` ships as ``loramix_fast.kernels`` (never a top-level ``kernels`` module:
that name belongs to another PyPI package, and transformers probes for it) and ``csrc/`` ships as
package data, JIT-built with ninja at first use (see loramix_fast/_cpp.py)."""
from setuptools import setup

setup(
    packages=["loramix_fast", "loramix_fast.ops", "loramix_fast.kernels", "loramix_fast.csrc",
              "loramix_fast.integrations", "loramix_fast.integrations.vllm"],
    package_dir={"loramix_fast": "loramix_fast", "loramix_fast.kernels": "kernels",
                 "loramix_fast.csrc": "csrc"},
    package_data={"loramix_fast.csrc": ["*.cpp", "*.h"],
                  "loramix_fast.integrations.vllm": ["requirements-cpu.txt"]},
)
