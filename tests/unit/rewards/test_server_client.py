"""Reward server and client over real HTTP on 127.0.0.1: auth, validation, batching, retries, main()."""

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhf_system.cli import main as cli_main
from rlhf_system.config import RewardsConfig
from rlhf_system.rewards import server as server_mod
from rlhf_system.rewards.client import RemoteReward, RewardServerError, from_config
from rlhf_system.rewards.registry import RuleRewards
from rlhf_system.tasks import synthetic as S

TOKEN = "test-token-4f2a"
RULES, WEIGHTS = ["synthetic", "synthetic_harmless"], [1.0, 0.5]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never via a proxy


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}", thread


@pytest.fixture
def live():
    with server_mod.RewardServer(server_mod.Scorer(RuleRewards(RULES, WEIGHTS)), TOKEN) as server:
        yield server.url, server


@pytest.fixture(scope="module")
def rows():
    splits = S.generate(seed=0, n_train=50, n_test=10)
    return [inst.to_prompt() for inst in splits["train"]]


def _request(url, body=None, token=TOKEN, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _items(rows, responses):
    return [{"prompt": r["prompt"], "response": x, "meta": r} for r, x in zip(rows, responses)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- server

def test_health_needs_no_auth(live):
    url, _ = live
    assert _request(url + "/health", token=None) == (200, {"ok": True, "rules": RULES, "model": None})


def test_score_matches_local_rules(live, rows):
    url, server = live
    sample = rows[:6]
    responses = [r["answer"] for r in sample[:3]] + ["wrong", S.REFUSAL, ""]
    status, reply = _request(url + "/score", {"items": _items(sample, responses)})
    expected = RuleRewards(RULES, WEIGHTS).score([r["prompt"] for r in sample], responses, sample)
    assert status == 200
    assert reply["scores"] == pytest.approx(expected)
    assert reply["scores"][:3] == [1.5, 1.5, 1.5]  # correct and harmless
    assert server.stats == {"requests": 1, "items": 6}


@pytest.mark.parametrize("token", [None, "wrong-token", ""])
def test_score_rejects_missing_or_wrong_token(live, rows, token):
    url, server = live
    status, reply = _request(url + "/score", {"items": _items(rows[:1], ["x"])}, token=token)
    assert status == 401
    assert "bearer token" in reply["error"] and TOKEN not in reply["error"]
    assert server.stats["requests"] == 0


@pytest.mark.parametrize("raw,message", [
    (b"{not json", "not valid JSON"),
    (b'{"things": []}', '"items" list'),
    (b'{"items": [{"prompt": "p", "response": "r", "meta": {}}, 7]}', "items[1] must be an object"),
    (b'{"items": [{"prompt": "p", "response": "r", "meta": {}}, {"prompt": "p"}]}', "items[1].response"),
    (b'{"items": [{"prompt": "p", "response": "r", "meta": []}]}', "items[0].meta"),
    (b'{"items": [{"prompt": "p", "response": "r", "meta": {}}]}', "'synthetic': meta is missing key 'task'"),
])
def test_score_rejects_bad_bodies(live, raw, message):
    url, server = live
    status, reply = _request(url + "/score", raw=raw)
    assert status == 400
    assert message in reply["error"]
    assert server.stats["requests"] == 0


def test_unknown_path_is_404(live):
    url, _ = live
    assert _request(url + "/nope", token=None)[0] == 404
    assert _request(url + "/nope", {"items": []})[0] == 404


def test_make_app_needs_a_token():
    with pytest.raises(ValueError, match="non-empty bearer token"):
        server_mod.make_app(server_mod.Scorer(RuleRewards(RULES)), "")


def _raw(url: str, head: str, body: bytes = b"") -> tuple[int, dict]:
    """Send `head` (+ `body`) on a raw socket and read the reply: a refusal must come back without the
    server waiting for a body that was announced and never sent."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
                reply.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0] if b"content-length: " in reply else 0):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, json.loads(reply.split(b"\r\n\r\n", 1)[1])


def test_token_is_checked_before_the_body_is_read(live):
    url, server = live
    announced = 60 * 2**20  # announced, never sent: a server reading it first would wait until our timeout
    head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {announced}\r\n"
    status, reply = _raw(url, head + "Authorization: Bearer wrong\r\n")
    assert status == 401 and "bearer token" in reply["error"]
    status, reply = _raw(url, head.replace(str(announced), str(server_mod.MAX_BODY + 1)) + f"Authorization: Bearer {TOKEN}\r\n")
    assert status == 413 and "limit" in reply["error"]
    assert server.stats["requests"] == 0


def test_item_limit(rows):
    with server_mod.RewardServer(server_mod.Scorer(RuleRewards(RULES, WEIGHTS)), TOKEN, max_items=3) as server:
        status, reply = _request(server.url + "/score", {"items": _items(rows[:4], ["x"] * 4)})
        assert status == 413 and "4 items is over the 3-item limit" in reply["error"]


def test_200_concurrent_requests_all_answered_right(live, rows):
    """200 clients at once on one server: no connection reset or refused, every score right (the old
    ThreadingHTTPServer's listen backlog of 5 reset 27 of 150 at 50 clients)."""
    import http.client

    url, server = live
    host, port = url.removeprefix("http://").split(":")
    n = 200
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def one(i: int) -> None:
        row = rows[i % len(rows)]
        response = row["answer"] if i % 2 else "wrong"
        body = json.dumps({"items": _items([row], [response])})
        barrier.wait(timeout=60)
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("POST", "/score", body, {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
            resp = conn.getresponse()
            results[i] = (resp.status, json.loads(resp.read())["scores"][0],
                          RuleRewards(RULES, WEIGHTS).score([row["prompt"]], [response], [row])[0])
            conn.close()
        except Exception as e:  # a reset or refusal is what this test is about
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    errors = [r for r in results if not isinstance(r, tuple)]
    assert not errors, f"{len(errors)} of {n} failed, e.g. {errors[:3]}"
    assert all(status == 200 and got == pytest.approx(want) for status, got, want in results)
    assert server.stats == {"requests": n, "items": n}


# ---------------------------------------------------------------- client

def test_client_batches(live, rows):
    url, server = live
    sample = rows[:5]
    responses = [r["answer"] for r in sample[:3]] + ["wrong", S.REFUSAL]
    client = RemoteReward(url, TOKEN, timeout_s=10, batch_size=2)
    scores = client.score([r["prompt"] for r in sample], responses, sample)
    assert scores == pytest.approx(RuleRewards(RULES, WEIGHTS).score([r["prompt"] for r in sample], responses, sample))
    assert server.stats == {"requests": 3, "items": 5}
    assert client.score([], [], []) == []
    assert server.stats["requests"] == 3  # nothing to score: no request


def test_client_wrong_token_names_env_var_and_is_not_retried(live, rows):
    url, _ = live
    client = RemoteReward(url, "bad-token", timeout_s=10, retries=5, backoff_s=10, token_env="MY_TOKEN_VAR")
    with pytest.raises(RewardServerError, match=r"rejected the bearer token \(HTTP 401\); check \$MY_TOKEN_VAR") as e:
        client.score([rows[0]["prompt"]], ["x"], [rows[0]])  # backoff_s=10: a retry would stall the test
    assert "bad-token" not in str(e.value)


def test_client_400_is_not_retried(live):
    url, _ = live
    client = RemoteReward(url, TOKEN, timeout_s=10, retries=5, backoff_s=10)
    with pytest.raises(RewardServerError, match=r"HTTP 400.*meta is missing key 'task'"):
        client.score(["p"], ["r"], [{}])


def test_client_unreachable_server():
    port = _free_port()  # bound then released: nothing listens there now
    client = RemoteReward(f"http://127.0.0.1:{port}", TOKEN, timeout_s=2, retries=2, backoff_s=0.01)
    with pytest.raises(RewardServerError) as e:
        client.score(["p"], ["r"], [{}])
    msg = str(e.value)
    assert msg.startswith(f"reward server http://127.0.0.1:{port}/score unreachable after 2 retries: ")
    assert "refused" in msg.lower()


class _Scripted(BaseHTTPRequestHandler):
    """Replies from server.script in order (status, payload); counts hits in server.hits."""

    def log_message(self, format, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.hits += 1
        status, payload = self.server.script.pop(0)
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.hits, server.script = 0, []
    url, thread = _serve(server)
    yield url, server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_client_retries_5xx_then_succeeds(scripted):
    url, server = scripted
    server.script = [(503, {"error": "busy"}), (500, {"error": "boom"}), (200, {"scores": [0.5]})]
    assert RemoteReward(url, TOKEN, retries=2, backoff_s=0.01).score(["p"], ["r"], [{}]) == [0.5]
    assert server.hits == 3


def test_client_gives_up_after_retries_with_last_error(scripted):
    url, server = scripted
    server.script = [(500, {"error": "first"}), (502, {"error": "last one"})]
    with pytest.raises(RewardServerError, match=r"/score unreachable after 1 retries: HTTP 502: last one"):
        RemoteReward(url, TOKEN, retries=1, backoff_s=0.01).score(["p"], ["r"], [{}])
    assert server.hits == 2


@pytest.mark.parametrize("payload,message", [
    ({"scores": [1.0]}, "returned 1 scores for 2 items"),
    ({"scores": [1.0, float("nan")]}, "returned score nan for item 1"),
    ({"scores": [1.0, "2"]}, "returned score '2' for item 1"),
    ({"result": []}, "without a JSON 'scores' list"),
])
def test_client_checks_the_reply(scripted, payload, message):
    url, server = scripted
    server.script = [(200, payload)]
    with pytest.raises(RewardServerError, match=message):
        RemoteReward(url, TOKEN, retries=3, backoff_s=10).score(["p", "q"], ["r", "s"], [{}, {}])
    assert server.hits == 1


def test_client_argument_errors():
    with pytest.raises(ValueError, match="must look like http://host:port"):
        RemoteReward("127.0.0.1:8000", TOKEN)
    with pytest.raises(ValueError, match=r"empty bearer token. Fix: export RLHF_REWARD_TOKEN="):
        RemoteReward("http://127.0.0.1:8000", "")


def test_from_config(monkeypatch):
    cfg = RewardsConfig(remote_url="http://127.0.0.1:8123", remote_token_env="MY_REWARD_TOKEN", retries=1,
                        timeout_s=5)
    monkeypatch.delenv("MY_REWARD_TOKEN", raising=False)
    with pytest.raises(ValueError, match=r"\$MY_REWARD_TOKEN"):
        from_config(cfg)
    monkeypatch.setenv("MY_REWARD_TOKEN", "abc")
    client = from_config(cfg)
    assert (client.url, client.token, client.retries, client.timeout_s) == ("http://127.0.0.1:8123/score", "abc", 1, 5)
    with pytest.raises(ValueError, match="remote_url is empty"):
        from_config(RewardsConfig())


# ---------------------------------------------------------------- main

def test_main_refuses_to_start_without_token(monkeypatch, capsys):
    monkeypatch.delenv("NO_SUCH_REWARD_TOKEN", raising=False)
    assert cli_main(["serve-reward", "--rules", "synthetic", "--port", "0", "--token-env", "NO_SUCH_REWARD_TOKEN"]) == 2
    out, err = capsys.readouterr()
    assert "$NO_SUCH_REWARD_TOKEN" in err and out == ""


def test_main_rejects_unknown_rule_bad_weights_and_nothing_to_serve(monkeypatch, capsys):
    monkeypatch.setenv("RLHF_REWARD_TOKEN", TOKEN)
    assert cli_main(["serve-reward", "--rules", "synthetic,nope", "--port", "0"]) == 2
    assert "unknown reward rule 'nope'" in capsys.readouterr().err
    assert cli_main(["serve-reward", "--rules", "synthetic", "--weights", "heavy", "--port", "0"]) == 2
    assert "--weights must be numbers" in capsys.readouterr().err
    assert cli_main(["serve-reward", "--port", "0"]) == 2
    assert "needs --rules, --reward-model, or both" in capsys.readouterr().err


def test_main_serves_and_prints_url(rows):
    """Through `rlhf serve-reward`, the README's command."""
    env = {**os.environ, "RLHF_REWARD_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_system.cli", "serve-reward", "--rules", "synthetic", "--rules",
         "synthetic_harmless", "--weights", "1,0.5", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        url = json.loads(line)["url"]
        assert TOKEN not in line
        status, reply = _request(url + "/score", {"items": _items(rows[:1], [rows[0]["answer"]])})
        assert (status, reply) == (200, {"scores": [1.5]})
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert TOKEN not in err
