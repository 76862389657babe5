"""User scripts: `code/inference.py` in the SageMaker framework-container style.

The script may define `model_fn(model_dir)` and either `transform_fn(model,
body, content_type, accept)` or any of `input_fn(body, content_type)`,
`predict_fn(data, model)`, `output_fn(prediction, accept)`; each may take a
trailing `context`. What the script leaves out, recsql supplies: no
`model_fn` -> `model.load_model(model_dir)`; no `input_fn` -> recsql's
decoders; no `predict_fn` -> the model's servable adapter; no `output_fn` ->
recsql's encoders. A tuple return is `(body, content_type)`.

The script is code that ships inside the model artifact, trusted as much as
the artifact itself (as in SageMaker); request data is never unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from model import load_model
from model.errors import ArtifactError, BadRequest
from serve import codecs
from serve.models import ADAPTERS, Options, ServableModel, wrap
from serve.records import Payload, Prediction, Rankings, Scores

log = logging.getLogger(__name__)
_HANDLERS = ("model_fn", "input_fn", "predict_fn", "output_fn", "transform_fn")


@dataclass
class ScriptContext:
    """The optional trailing `context` argument (shaped like the MMS context)."""

    system_properties: dict[str, Any]
    request_headers: Mapping[str, str] = field(default_factory=dict)

    def get_request_header(self, idx: int, key: str) -> str | None:
        return self.request_headers.get(key) or self.request_headers.get(key.lower())


def find_script(model_dir: Path, program: str, submit_dir: Path | None) -> Path | None:
    """SAGEMAKER_SUBMIT_DIRECTORY/SAGEMAKER_PROGRAM first, then model_dir/code/<program>."""
    for folder in (submit_dir, model_dir / "code"):
        if folder is not None and (Path(folder) / program).is_file():
            return Path(folder) / program
    return None


def load_servable(
    model_dir: Path, program: str = "inference.py", submit_dir: Path | None = None
) -> ServableModel:
    """A model directory -> servable model; a user script in it takes precedence."""
    script = find_script(Path(model_dir), program, submit_dir)
    if script is not None:
        return ScriptModel.load(Path(model_dir), script)
    return wrap(load_model(model_dir))


def _import(script: Path) -> ModuleType:
    name = "recsql_user_" + hashlib.sha1(str(script.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, script)
    if spec is None or spec.loader is None:
        raise ArtifactError(f"{script}: cannot import the user script")
    module = importlib.util.module_from_spec(spec)
    folder = str(script.parent.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the script may import helpers beside it
    if (script.parent / "requirements.txt").is_file():
        log.warning("%s: requirements.txt is not installed at run time", script.parent)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ArtifactError(f"{script}: the user script failed to import ({exc})") from exc
    return module


def _call(fn: Callable[..., Any], args: tuple[Any, ...], context: ScriptContext) -> Any:
    """Call a handler, adding `context` when it takes one more argument."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn(*args)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) > len(args) or any(p.kind == p.VAR_POSITIONAL for p in params):
        return fn(*args, context)
    return fn(*args)


class ScriptModel(ServableModel):
    kind = "script"

    def __init__(self, module: ModuleType, model: Any, model_dir: Path, script: Path) -> None:
        self.handlers = {
            n: getattr(module, n) for n in _HANDLERS if callable(getattr(module, n, None))
        }
        self.model, self.model_dir, self.script = model, model_dir, script
        kind = getattr(model, "kind", None)
        self.inner = wrap(model) if isinstance(kind, str) and kind in ADAPTERS else None

    @classmethod
    def load(cls, model_dir: Path, script: Path) -> ScriptModel:
        module = _import(script)
        defined = {n for n in _HANDLERS if callable(getattr(module, n, None))}
        if "transform_fn" in defined and defined & {"input_fn", "predict_fn", "output_fn"}:
            raise ArtifactError(
                f"{script}: defines transform_fn together with input_fn/predict_fn/output_fn;"
                " define one or the other"
            )
        context = ScriptContext({"model_dir": str(model_dir), "gpu_id": None})
        if "model_fn" in defined:
            model = _call(module.model_fn, (str(model_dir),), context)
        else:
            model = load_model(model_dir)
        log.info("user script %s loaded (%s)", script, ", ".join(sorted(defined)) or "no handlers")
        return cls(module, model, model_dir, script)

    def transform(
        self,
        body: bytes,
        content_type: str | None,
        accept: str,
        options: Options,
        headers: Mapping[str, str],
    ) -> tuple[bytes, str]:
        """decode -> predict -> encode through the script's handlers (or recsql's)."""
        context = ScriptContext({"model_dir": str(self.model_dir), "gpu_id": None}, headers)
        h = self.handlers
        if "transform_fn" in h:
            result = _call(h["transform_fn"], (self.model, body, content_type, accept), context)
            return _as_body(result, accept)
        if "input_fn" in h:
            data = _call(h["input_fn"], (body, content_type), context)
        else:
            data = codecs.decode(body, content_type)
        if "predict_fn" in h:
            prediction = _call(h["predict_fn"], (data, self.model), context)
        else:
            prediction = self.predict(data, options)
        if "output_fn" in h:
            return _as_body(_call(h["output_fn"], (prediction, accept), context), accept)
        if isinstance(prediction, (Scores, Rankings)):
            accept = codecs.negotiate(accept, content_type, None)
            return codecs.encode(prediction, accept), accept
        return _as_body(prediction, accept)

    def predict(self, payload: Payload, options: Options) -> Prediction:
        if self.inner is None or not isinstance(payload, Payload):
            raise BadRequest(f"{self.script.name}: the script's model needs its own predict_fn")
        return self.inner.predict(payload, options)

    def describe(self) -> dict[str, Any]:
        inner = self.inner.describe() if self.inner is not None else {}
        return {
            **inner,
            "kind": self.kind,
            "script": self.script.name,
            "handlers": sorted(self.handlers),
        }

    def memory_bytes(self) -> int:
        return self.inner.memory_bytes() if self.inner is not None else 0


def _as_body(result: Any, accept: str) -> tuple[bytes, str]:
    content_type = accept
    if isinstance(result, tuple) and len(result) == 2:
        result, content_type = result
    if isinstance(result, str):
        result = result.encode()
    elif not isinstance(result, (bytes, bytearray)):
        result = json.dumps(result, default=_to_jsonable).encode()
        content_type = content_type if content_type and "*" not in content_type else codecs.JSON
    return bytes(result), content_type or codecs.JSON


def _to_jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")
