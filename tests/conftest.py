import json
import pytest
import torch

from helpers import REFERENCE


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def official_keys() -> dict:
    """Every key and shape of the published state dicts, from the reference folder beside the repo
    (not shipped with the project); the tests that need it skip, saying so, where it is absent."""
    path = REFERENCE / "official_keys.json"
    if not path.is_file():
        pytest.skip(
            "needs the published checkpoints' key list (official_keys.json), which is not shipped with the "
            f"project; put it at {path} to run this test"
        )
    return json.loads(path.read_text())
