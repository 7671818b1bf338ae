import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"

# Small enough to run in milliseconds, with every feature of the published spec (cls token in the
# last stage, dw_bn projections with strided k/v, three stages).
TINY_SPEC = {
    "NUM_STAGES": 3,
    "DIM_EMBED": [16, 32, 48],
    "NUM_HEADS": [1, 2, 3],
    "DEPTH": [1, 2, 3],
}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def official_keys() -> dict:
    """Every key and shape of the published state dicts, from the reference folder beside the repo
    (not shipped with the project); the tests that need it skip, saying so, where it is absent."""
    path = REFERENCE / "official_keys.json"
    if not path.is_file():
        pytest.skip(f"{path} not beside the repo")
    return json.loads(path.read_text())
