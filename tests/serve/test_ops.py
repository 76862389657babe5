"""Operations: metrics, logs, OpenAPI, boto3 against a local server, workers, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time

import boto3
import pytest
import requests
from botocore.exceptions import ClientError

from serve import build_dataplane, create_app, from_env
from serve.openapi import OPENAPI
from tests.serve.conftest import PRODUCT_IDS, USER_IDS, running
from tests.serve.test_scripts import SEED_STYLE, script_dir


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_add_up_across_workers(server) -> None:
    before = server.get("/metrics").text
    body = f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n{USER_IDS[1]},1\n"
    for _ in range(30):  # new connections, so both workers take some
        assert requests.post(
            server.url + "/invocations", body, headers={"Content-Type": "text/csv"}
        ).ok
    requests.post(server.url + "/invocations", "x", headers={"Content-Type": "text/plain"})
    time.sleep(1.5)  # each worker writes its figures once a second
    after = server.get("/metrics").text
    plain = {"model": "model", "variant": "AllTraffic"}  # a plain --model-dir's one variant
    labels = {**plain, "status": "200"}
    assert (
        metric(after, "recsql_requests_total", **labels)
        - metric(before, "recsql_requests_total", **labels)
        == 30
    )
    rows = metric(after, "recsql_rows_total", **plain)
    assert rows - metric(before, "recsql_rows_total", **plain) == 60
    nulls = metric(after, "recsql_null_rows_total", **plain)
    assert nulls - metric(before, "recsql_null_rows_total", **plain) == 30
    assert metric(after, "recsql_errors_total", **plain, status="415") >= 1
    count = metric(after, "recsql_request_duration_seconds_count", **plain)
    assert count == metric(after, "recsql_request_duration_seconds_bucket", **plain, le="+Inf")
    assert "# TYPE recsql_request_duration_seconds histogram" in after


def test_one_log_line_per_request_with_inference_id(server) -> None:
    headers = {"X-Amzn-SageMaker-Inference-Id": "req-7f3a"}
    server.post("/invocations", f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n", **headers)
    time.sleep(0.2)
    lines = [line for line in server.log().splitlines() if "inference_id=req-7f3a" in line]
    assert len(lines) == 1
    assert re.search(r"model=model status=200 rows=1 null=0 ms=[0-9.]+ ", lines[0])


def test_openapi_documents_every_route(server) -> None:
    doc = server.get("/openapi.json").json()
    assert doc == json.loads(json.dumps(OPENAPI))
    app = create_app(build_dataplane(from_env({}, multi_model=True)))
    routes = {re.sub(r"<(\w+)>", r"{\1}", rule.rule) for rule in app.url_map.iter_rules()}
    assert routes == set(doc["paths"])


def test_boto3_sagemaker_runtime_against_local_server(server) -> None:
    client = boto3.client(
        "sagemaker-runtime",
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
    )
    body = f"{USER_IDS[3]},{PRODUCT_IDS[3]}\n{USER_IDS[3]},1\n"
    answer = client.invoke_endpoint(
        EndpointName="recsql-endpoint", ContentType="text/csv", Accept="text/csv", Body=body
    )
    direct = server.post("/invocations", body)
    assert answer["Body"].read() == direct.content
    assert answer["ContentType"] == "text/csv"
    assert "null_rows=1" in answer["CustomAttributes"]
    with pytest.raises(ClientError) as error:
        client.invoke_endpoint(EndpointName="recsql-endpoint", ContentType="text/plain", Body="x")
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 415


def test_dead_worker_is_replaced(server) -> None:
    import os
    import signal

    workers = server.workers()
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = server.workers()
        if len(now) == 2 and workers[0] not in now:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"worker not replaced: {server.workers()}")
    server.session.close()
    server.session = requests.Session()
    for _ in range(10):
        r = requests.post(
            server.url + "/invocations",
            f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n",
            headers={"Content-Type": "text/csv"},
            timeout=10,
        )
        assert r.status_code == 200 and r.text.strip()


def test_keep_alive_clients_spread_over_workers(model_dir, tmp_path) -> None:
    """8 clients connecting at once: neither of 2 workers serves more than 65% of requests
    (unbalanced, the first worker awake took every connection of such a burst)."""
    import http.client

    body = f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n"

    def client(conn: http.client.HTTPConnection) -> None:
        for _ in range(40):
            conn.request("POST", "/invocations", body, {"Content-Type": "text/csv"})
            assert conn.getresponse().read()
        conn.close()

    with running(["--model-dir", str(model_dir), "--workers", "2"], tmp_path) as srv:
        time.sleep(1.0)  # both workers up
        connections = [http.client.HTTPConnection("127.0.0.1", srv.port) for _ in range(8)]
        for conn in connections:  # one burst, as a load generator opens them
            conn.connect()
        threads = [threading.Thread(target=client, args=(c,)) for c in connections]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pids = re.findall(r"\[(\d+)\] recsql.serve: invocations model=\S+ status=200 ", srv.log())
    assert len(pids) == 320
    busiest = max(pids.count(p) for p in set(pids))
    assert busiest / len(pids) <= 0.65, {p: pids.count(p) for p in set(pids)}


def test_connection_shares_let_only_the_least_loaded_accept() -> None:
    from serve.server import ConnectionShares

    shares = ConnectionShares(3)
    assert shares.free_slot({0, 2}) == 1
    shares.counts[:] = [0, 0, ConnectionShares.GONE]  # slot 2: a dead worker
    assert shares.may_accept(0, 1) is False  # 1 open while slot 1 has none
    assert shares.may_accept(1, 1) is True
    assert shares.may_accept(0, 1) is True  # now level
    assert shares.may_accept(1, 0) is True


def test_sigterm_drains_in_flight_requests(model_dir, tmp_path) -> None:
    served = script_dir(model_dir, tmp_path, SEED_STYLE)
    with running(["--model-dir", str(served), "--workers", "1"], tmp_path) as srv:
        idle = requests.Session()  # an idle keep-alive connection must not hold up the exit
        assert idle.get(srv.url + "/ping").status_code == 200
        time.sleep(1.0)  # let the worker finish booting
        result: dict[str, object] = {}

        def slow_request() -> None:
            doc = {"customer_id": [int(USER_IDS[0])], "product_id": [int(PRODUCT_IDS[0])]}
            doc["sleep"] = 1.5
            result["response"] = requests.post(
                srv.url + "/invocations", json=doc, headers={"Accept": "application/json"}
            )

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.5)
        start = time.monotonic()
        code = srv.stop()
        thread.join(10)
        assert code == 0
        response = result["response"]
        assert response.status_code == 200 and len(response.json()) == 1
        assert time.monotonic() - start < 10  # far below the 25 s graceful timeout


def test_model_that_fails_to_load_fails_ping(model_dir, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "weights.safetensors").write_bytes(b"not weights")
    with running(["--model-dir", str(broken), "--workers", "1"], tmp_path) as srv:
        r = srv.get("/ping")
        assert r.status_code == 503
        assert "failed to load" in r.text and "weights" in r.text
        assert srv.post("/invocations", "1,2\n").status_code == 503
        assert "model failed to load" in srv.log()


def test_server_started_before_its_model_serves_it_once_it_appears(model_dir, tmp_path) -> None:
    later = tmp_path / "later"  # not there yet, as in compose when the trainer is still running
    with running(["--model-dir", str(later), "--workers", "1"], tmp_path) as srv:
        first = srv.get("/ping")
        assert first.status_code == 503 and "later" in first.text
        staging = tmp_path / "staging"
        staging.mkdir()
        for f in model_dir.iterdir():
            (staging / f.name).write_bytes(f.read_bytes())
        staging.rename(later)  # the model appears whole, as an extracted model.tar.gz would
        deadline = time.monotonic() + 10
        while srv.get("/ping").status_code != 200:
            assert time.monotonic() < deadline, "the model was never loaded"
            time.sleep(0.2)
        body = f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n"
        assert srv.post("/invocations", body).status_code == 200


def test_each_worker_gets_its_share_of_blas_threads() -> None:
    import os

    from threadpoolctl import threadpool_info, threadpool_limits

    from serve.server import _share_cores

    cores = os.cpu_count() or 1
    with threadpool_limits(None):  # restores the limits afterwards
        _share_cores(cores * 2)(None, None)
        assert {p["num_threads"] for p in threadpool_info()} == {1}
        if cores > 1:
            _share_cores(1)(None, None)
            assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} == {
                cores
            }


def _read_response(sock, buffer: bytes = b"") -> tuple[bytes, bytes]:
    """One whole HTTP response from `sock` (status line first); returns it and the rest."""
    while b"\r\n\r\n" not in buffer:
        buffer += sock.recv(1 << 16)
    head, _, rest = buffer.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        rest += sock.recv(1 << 16)
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


def test_a_busy_connection_does_not_hold_the_worker(model_dir, tmp_path) -> None:
    """2,000 pipelined requests on one connection, then one on another: the second
    connection is answered in turn, not after all 2,000 (one worker serves both)."""
    import socket

    pairs = f"{USER_IDS[0]},{PRODUCT_IDS[0]}\n"
    raw = (
        f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: text/csv\r\n"
        f"Content-Length: {len(pairs)}\r\n\r\n{pairs}"
    ).encode()
    with running(["--model-dir", str(model_dir), "--workers", "1"], tmp_path) as srv:
        busy, other = (socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2))
        for sock in (busy, other):  # both connections accepted and served once
            sock.settimeout(30)
            sock.sendall(raw)
            assert _read_response(sock)[0].startswith(b"HTTP/1.1 200")
        answered = bytearray()

        def drain() -> None:  # read the busy connection's replies as they come
            with contextlib.suppress(OSError):
                while chunk := busy.recv(1 << 20):
                    answered.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        busy.sendall(raw * 2000)
        other.sendall(raw)
        assert _read_response(other)[0].startswith(b"HTTP/1.1 200")
        before_other = answered.count(b"HTTP/1.1 200")
        busy.shutdown(socket.SHUT_RDWR)
        reader.join()
        busy.close()
        other.close()
    assert before_other < 1000, before_other
