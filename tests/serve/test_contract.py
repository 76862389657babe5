"""The shared model contract, run against each servable model kind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serve.models import ServableModel, wrap
from serve.scripts import ScriptModel, load_servable
from tests.serve.conftest import PRODUCT_IDS, USER_IDS
from tests.serve.contract import ServableModelContract


def recommender_csv(n: int) -> list[bytes]:
    return [
        f"{USER_IDS[i % len(USER_IDS)]},{PRODUCT_IDS[(7 * i) % len(PRODUCT_IDS)]}".encode()
        for i in range(n)
    ]


class TestRecommenderContract(ServableModelContract):
    @pytest.fixture
    def servable(self, recommender) -> ServableModel:
        return wrap(recommender)

    def good_csv(self, n: int) -> list[bytes]:
        return recommender_csv(n)


class TestScriptContract(ServableModelContract):
    """A user script with only model_fn: recsql's codecs and adapter do the rest."""

    @pytest.fixture
    def servable(self, model_dir: Path, tmp_path: Path) -> ServableModel:
        served = tmp_path / "scripted"
        shutil.copytree(model_dir, served)
        (served / "code").mkdir()
        (served / "code" / "inference.py").write_text(
            "from model import load_model\n\ndef model_fn(model_dir):\n"
            "    return load_model(model_dir)\n"
        )
        model = load_servable(served)
        assert isinstance(model, ScriptModel)
        return model

    def good_csv(self, n: int) -> list[bytes]:
        return recommender_csv(n)
