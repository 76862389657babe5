"""The OpenAPI 3.1 document for the HTTP API, served at GET /openapi.json."""

from __future__ import annotations

from typing import Any

_TEXT_ERROR = {"description": "one-line reason", "content": {"text/plain": {}}}
_ERRORS = {
    "400": {**_TEXT_ERROR, "description": "body cannot be parsed at all, or bad options"},
    "404": {**_TEXT_ERROR, "description": "model not loaded"},
    "406": {**_TEXT_ERROR, "description": "unsupported Accept"},
    "413": {**_TEXT_ERROR, "description": "body over the payload limit"},
    "415": {**_TEXT_ERROR, "description": "unsupported Content-Type"},
}
_PAIRS = {
    "type": "object",
    "properties": {
        "user_id": {"type": "array", "items": {"type": "integer"}},
        "product_id": {"type": "array", "items": {"type": "integer"}},
        "instances": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
        "top_k": {"type": "integer", "minimum": 1, "maximum": 1000},
        "candidates": {"type": "array", "description": "product ids, or one list per user"},
        "exclude": {"type": "array", "description": "product ids, or one list per user"},
        "history": {
            "type": "array",
            "description": "with top_k, instead of user_id: a user's recent events (or one"
            " list per user), for users the model does not know. An event is a product id (a"
            ' view) or {"product_id", "event_type": view|cart|purchase|remove_from_cart,'
            ' "event_time": "2019-11-02 10:00:00 UTC" | ISO 8601 | epoch seconds}; with times'
            " they are ordered by time, without they are read in list order as one session."
            " History models read them as they read a known user's events, repeats included;"
            " older models fold the product ids in. Unknown products are skipped; a history"
            " with none the model knows gets the popularity ranking. Each reply carries"
            ' "ranked_by": "history" or "popularity".',
            "items": {},
        },
        "similar_to": {
            "type": "array",
            "description": "with top_k, instead of user_id: product ids (or one list per"
            " query); ranks every other product by its mean cosine to the known ones (the"
            " item tower's outputs, 0..1); the query products are never returned, unknown"
            " ones are skipped; a list with none the model knows gets the popularity ranking."
            ' Each reply carries "ranked_by": "similar" or "popularity".',
            "items": {},
        },
        "score": {
            "type": "string",
            "enum": ["pair", "similar"],
            "description": "similar: each record is (product_a, product_b), scored by the"
            " cosine of their item vectors; null where either is unknown (no fallback)",
        },
        "events": {
            "type": "array",
            "description": "alone in the body: fresh events to keep, each"
            ' {"user_id" (or "session_id"), "product_id", "event_type":'
            ' view|cart|purchase|remove_from_cart, "event_time" (default: now)}; the next'
            " score or top-K of that user (a session id passed as user_id) reads them. Reply"
            ' {"taken", "users"}; any bad entry: 400 naming each, nothing taken; store down:'
            " 503.",
            "items": {"type": "object"},
        },
        "product_a": {"type": "array", "items": {"type": "integer"}},
        "product_b": {"type": "array", "items": {"type": "integer"}},
        "fallback": {"type": "string", "enum": ["null", "mean", "popularity"]},
        "output": {
            "type": "string",
            "enum": ["probability", "label"],
            "description": "tabular models: label adds the predicted class (P >= 0.5 ->"
            " classes[1]); default RECSQL_TABULAR_OUTPUT, else probability",
        },
    },
}
_HEADERS = [
    {
        "name": "X-Amzn-SageMaker-Custom-Attributes",
        "in": "header",
        "schema": {"type": "string"},
        "description": "e.g. fallback=popularity,top_k=10; output=label (tabular models:"
        ' CSV `label,probability`, JSON {"label", "probability"} per record); score=similar'
        " (CSV records are product_a,product_b: their cosine)",
    },
    {"name": "X-Amzn-SageMaker-Target-Model", "in": "header", "schema": {"type": "string"}},
    {
        "name": "X-Amzn-SageMaker-Target-Variant",
        "in": "header",
        "schema": {"type": "string"},
        "description": "send the whole request to this variant (--variant/--shadow name, or"
        " AllTraffic), whatever the weights; an unknown name is a 400 naming the variants",
    },
    {
        "name": "X-Amzn-SageMaker-Inference-Id",
        "in": "header",
        "schema": {"type": "string"},
        "description": "logged and captured; with several variants, a request without user"
        " ids (history, similar_to, score=similar, events) goes to this id's variant",
    },
]
_INVOKE: dict[str, Any] = {
    "summary": "Score user-product pairs (or product-product similarity), or rank products for"
    " users (top_k), histories or similar products",
    "description": "MFBlock scores: softmax-trained models (the default) return the"
    " probability of the product among the whole catalogue for the user; mse-trained models"
    " the predicted event weight (view 1 ... purchase 4); bpr-trained models an unscaled"
    " score whose order is all that counts.",
    "parameters": _HEADERS,
    "requestBody": {
        "required": True,
        "content": {
            "text/csv": {"schema": {"type": "string"}, "example": "123,456\n124,457\n"},
            "application/json": {"schema": _PAIRS},
            "application/jsonlines": {"schema": {"type": "string"}},
            "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {
            "description": "one output per input record, in order; empty/null = no score",
            "headers": {
                "X-Amzn-Invoked-Production-Variant": {
                    "schema": {"type": "string"},
                    "description": "the variant that answered (AllTraffic for a plain"
                    " --model-dir); a batch split between variants by user: theirs, joined"
                    " by commas. Errors carry it too once a variant was chosen",
                },
                "X-Recsql-Null-Rows": {"schema": {"type": "integer"}},
                "X-Recsql-Malformed-Rows": {"schema": {"type": "integer"}},
                "X-Recsql-Unknown-Rows": {"schema": {"type": "integer"}},
                "X-Recsql-Fallback-Rows": {"schema": {"type": "integer"}},
            },
            "content": {
                "text/csv": {
                    "examples": {
                        "scores": {"value": "0.8123\n\n"},
                        "output=label": {"value": "yes,0.8123\n\n"},
                    }
                },
                "application/json": {
                    "examples": {
                        "scores": {"value": {"predictions": [0.8123, None]}},
                        "output=label": {
                            "value": {"predictions": [{"label": "yes", "probability": 0.8123}]}
                        },
                    }
                },
                "application/jsonlines": {"example": "0.8123\nnull\n"},
            },
        },
        **_ERRORS,
    },
}
_JSON_OK = {"description": "OK", "content": {"application/json": {}}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "recsql inference server", "version": "1"},
    "paths": {
        "/ping": {
            "get": {
                "summary": "200 (empty) once the model is loaded; 503 with reason if not",
                "responses": {"200": {"description": "healthy"}, "503": _TEXT_ERROR},
            }
        },
        "/invocations": {"post": _INVOKE},
        "/endpoints/{name}/invocations": {
            "post": {
                **_INVOKE,
                "summary": "SageMaker runtime InvokeEndpoint, locally",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
                    *_HEADERS,
                ],
            }
        },
        "/events": {
            "post": {
                "summary": 'take fresh events: {"events": [...]}, as /invocations takes them',
                "requestBody": {"required": True, "content": {"application/json": {}}},
                "responses": {
                    "200": _JSON_OK,
                    "400": _TEXT_ERROR,
                    "415": _TEXT_ERROR,
                    "503": {**_TEXT_ERROR, "description": "the event store is unavailable"},
                },
            }
        },
        "/execution-parameters": {
            "get": {"summary": "batch transform settings", "responses": {"200": _JSON_OK}}
        },
        "/models": {
            "get": {
                "summary": "list models (paged: page_size, next_page_token)",
                "responses": {"200": _JSON_OK},
            },
            "post": {
                "summary": "load {model_name, url} from below the model root",
                "responses": {
                    "200": _JSON_OK,
                    "409": _TEXT_ERROR,
                    "404": _TEXT_ERROR,
                    "507": _TEXT_ERROR,
                },
            },
        },
        "/models/{name}": {
            "get": {
                "summary": "describe a model",
                "responses": {"200": _JSON_OK, "404": _TEXT_ERROR},
            },
            "delete": {
                "summary": "unload a model",
                "responses": {"200": _JSON_OK, "404": _TEXT_ERROR},
            },
        },
        "/models/{name}/invoke": {"post": {**_INVOKE, "summary": "invoke one model"}},
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics, all workers",
                "responses": {"200": {"description": "text format 0.0.4"}},
            }
        },
        "/openapi.json": {"get": {"summary": "this document", "responses": {"200": _JSON_OK}}},
    },
}
