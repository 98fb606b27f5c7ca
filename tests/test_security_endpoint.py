"""A local endpoint (`make serve` with launcher=local, the demo) on a machine shared with another user: the attacker
(ftl-bob, really running as that user: tests/test_security_files.py) floods it with connections that never finish
their headers or their body, and looks for its Ray daemons on the machine's other addresses. The owner's /health
and authenticated requests must keep answering. One endpoint serves the module."""
import http.client
import json
import socket
import time

import pytest

from tests.test_security_files import attacker, attacker_prefix
from tests.test_security_ray import authentication, cluster_processes, is_loopback, listeners
from tests.test_serve import serve_recipe

pytestmark = [pytest.mark.security, pytest.mark.slow, pytest.mark.timeout(300)]

# Opens `count` connections to host:port (127.x only), half of them stopping in the middle of their headers, half in
# the middle of a body, and holds them until its stdin closes or `seconds` pass; then says how many of them the
# server had closed. It raises its own open-files limit to the hard limit, as anyone may.
FLOOD = r"""
import resource, select, socket, sys, threading, time
host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
assert host.startswith("127."), host
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held, failed = [], 0
for i in range(count):
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((host, port))
        if i % 2:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        else:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{\"prompt\": \"")
        held.append((i % 2, s))
    except OSError:
        failed += 1
        s.close()
print(f"holding {len(held)} failed {failed}", flush=True)
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
done.wait(seconds)
closed, answers = {0: 0, 1: 0}, {}
for kind, s in held:
    s.setblocking(False)
    got = b""
    try:
        while True:
            data = s.recv(1 << 16)
            if not data:
                closed[kind] += 1
                break
            got += data
    except BlockingIOError:
        pass
    except OSError:
        closed[kind] += 1
    status = got.split(b" ", 2)[1].decode() if got.startswith(b"HTTP/") else "none"
    answers[status] = answers.get(status, 0) + 1
print(f"closed bodies {closed[0]} headers {closed[1]} answers {answers}", flush=True)
"""


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    from ftlib.serve.local import start_local

    attacker_prefix()  # skip before starting anything
    root = tmp_path_factory.mktemp("endpoint")
    ep = start_local(serve_recipe(root), timeout_s=180, log_file=str(root / "endpoint.log"))
    yield ep
    ep.stop()


def timed(url: str, path: str, token: str = None, body=None):
    """(status, seconds) of one request on a new connection; a request that gets no answer within 10 s is 'timeout'."""
    host, port = url.split("//")[1].split(":")
    started = time.monotonic()
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        connection.request("POST" if body else "GET", path, json.dumps(body) if body else None, headers)
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as e:
        status = f"no answer: {type(e).__name__}"
    finally:
        connection.close()
    return status, round(time.monotonic() - started, 2)


def test_half_open_connections_leave_health_and_authenticated_requests_answering(endpoint):
    """1,100 connections that never finish their request (the issue's flood, beyond the 1,024 open files a process
    gets by default): /health and an authenticated completion still answer within 2 s, and the unfinished bodies
    (no token) are ended by the server rather than held."""
    host, port = endpoint.url.split("//")[1].split(":")
    flood = attacker(FLOOD, host, port, 1100, 60, background=True)
    try:
        holding = flood.stdout.readline().split()
        assert holding[:1] == ["holding"] and int(holding[1]) >= 1000, holding + [flood.stdout.read()]
        answers = []
        for _ in range(3):
            answers.append(timed(endpoint.url, "/health"))
            answers.append(timed(endpoint.url, "/v1/completions", endpoint.token,
                                 {"model": "mine", "prompt": "Once upon a time", "max_tokens": 4}))
            time.sleep(1)
    finally:
        flood.stdin.close()
        ended = flood.stdout.read()
        flood.wait(timeout=60)
    print(f"flood: {' '.join(holding)}; {ended.strip()}; owner's answers (status, s): {answers}")
    slow = [(status, seconds) for status, seconds in answers if status != 200 or seconds > 2]
    assert not slow, f"under the flood ({' '.join(holding)}): {answers}"
    # The unfinished bodies carried no token: each got its 401 and its connection closed, at once.
    assert f"closed bodies {int(holding[1]) // 2} " in ended and "'401': 550" in ended, ended


def test_a_body_that_stops_arriving_gets_408_and_its_connection_closed(endpoint):
    """With the token (the owner's own client, stuck): the replica does not wait for the rest of a body forever."""
    from ftlib.serve.app import BODY_IDLE_S

    host, port = endpoint.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=BODY_IDLE_S + 20) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {endpoint.token}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"prompt\": \"".encode())
        started, answer = time.monotonic(), b""
        while chunk := s.recv(1 << 16):
            answer += chunk
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert BODY_IDLE_S - 1 < waited < BODY_IDLE_S + 10, waited  # then closed (recv got the end of the stream)
    assert b"request body stopped arriving" in answer, answer



def test_a_local_endpoints_ray_listens_on_no_other_address_of_the_machine(endpoint):
    """`make serve` with launcher=local (and the demo): Ray's daemons listen on loopback, not on the addresses the
    machine has on its networks; except what Ray 2.60 binds to every interface with no setting to change it (the
    GCS, the raylet, the dashboard agent's gRPC and every worker's gRPC server), which requires the token."""
    found, deadline = set(), time.monotonic() + 30
    while time.monotonic() < deadline:  # Ray's agents start in the background
        found |= listeners(cluster_processes(endpoint.job_id, endpoint.process.pid))
        if any("RuntimeEnvAgent" in name for _, name, _, _ in found):
            break
        time.sleep(1)
    assert any("RuntimeEnvAgent" in name for _, name, _, _ in found), sorted(found)
    outside = sorted(f"{name} on {ip}:{port}" for _, name, ip, port in found
                     if not is_loopback(ip) and ip not in ("0.0.0.0", "::"))
    assert outside == [], f"listening on the machine's other addresses: {outside}"
    everywhere = {(name, port) for _, name, ip, port in found if ip in ("0.0.0.0", "::")}
    verdicts = {f"{name}:{port}": authentication("127.0.0.1", port) for name, port in sorted(everywhere)}
    print("every interface:", verdicts)
    assert set(verdicts.values()) == {"authenticated"}, verdicts
