"""The contract every servable model kind must keep, as a test mixin.

Subclass `ServableModelContract` for a model kind, provide the `servable`
fixture and `good_csv(n)` (n CSV records the model can score), and pytest
runs every check below against it (see test_contract.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from serve import codecs
from serve.models import ADAPTERS, Options, ServableModel
from serve.records import Scores


class ServableModelContract:
    @pytest.fixture
    def servable(self) -> ServableModel:
        raise NotImplementedError

    def good_csv(self, n: int) -> list[bytes]:
        raise NotImplementedError

    def predict_csv(self, model: ServableModel, lines: list[bytes]) -> Scores:
        body = b"\n".join(lines) + (b"\n" if lines else b"")
        prediction = model.predict(codecs.decode(body, "text/csv"), Options())
        assert isinstance(prediction, Scores)
        return prediction

    def test_one_output_per_record_in_order(self, servable: ServableModel) -> None:
        lines = self.good_csv(20)
        forward = self.predict_csv(servable, lines).values
        backward = self.predict_csv(servable, lines[::-1]).values
        assert len(forward) == 20
        np.testing.assert_array_equal(forward, backward[::-1])
        assert np.isfinite(forward).all()

    def test_bad_records_are_nan_in_place(self, servable: ServableModel) -> None:
        good = self.good_csv(3)
        lines = [good[0], b"", b"\x00,\xff,,,,,,,", good[1], b'"unterminated', good[2]]
        scores = self.predict_csv(servable, lines)
        assert len(scores) == 6
        assert np.isnan(scores.values[[1, 2, 4]]).all()
        assert np.isfinite(scores.values[[0, 3, 5]]).all()
        assert scores.counts["null"] >= 3

    def test_empty_body_gives_no_outputs(self, servable: ServableModel) -> None:
        assert len(self.predict_csv(servable, [])) == 0

    def test_scores_are_floats(self, servable: ServableModel) -> None:
        scores = self.predict_csv(servable, self.good_csv(5))
        assert scores.values.dtype.kind == "f"

    def test_describe_is_json_with_kind(self, servable: ServableModel) -> None:
        doc = servable.describe()
        assert json.loads(json.dumps(doc))["kind"] == servable.kind

    def test_kind_has_an_adapter(self, servable: ServableModel) -> None:
        assert servable.kind in ADAPTERS or servable.kind == "script"
        assert servable.memory_bytes() >= 0
