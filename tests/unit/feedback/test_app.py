"""The annotation API through FastAPI's test client: tokens, the served order, votes stored once,
conflicts, limits, and progress."""

import uuid

from rlhf_system.feedback.app import shown_order

ALICE = {"Authorization": "Bearer tok-alice"}


def next_task(client, name="alice", token="tok-alice"):
    r = client.get(f"/api/{name}/next", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_tokens_open_only_their_own_routes(client):
    assert client.get("/api/alice/next").status_code == 401
    assert client.get("/api/alice/next", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.get("/api/alice/next", headers={"Authorization": "Bearer tok-bob"}).status_code == 403
    assert client.get("/api/carol/next", headers=ALICE).status_code == 404
    assert client.get("/api/admin/progress", headers=ALICE).status_code == 403
    r = client.get("/api/admin/progress", headers={"Authorization": "Bearer tok-admin"})
    assert r.status_code == 200 and r.json()["annotators"] == {"alice": {"done": 0}, "bob": {"done": 0}}


def test_next_hides_models_and_shows_the_seeded_order(client, store):
    data = next_task(client)
    task = store.task(data["task"]["id"])
    assert data["shown"] == shown_order("alice", task)
    assert data["task"]["responses"] == [task.responses[i].text for i in data["shown"]]
    assert "sft" not in str(data) and "base" not in str(data)
    assert data["progress"] == {"done": 0, "total": 5}
    assert next_task(client) == data  # a reload shows the same task in the same order


def test_vote_is_stored_once_and_maps_positions_to_responses(client, store):
    data = next_task(client)
    body = {"vote_id": uuid.uuid4().hex, "task_id": data["task"]["id"], "shown": data["shown"], "choice": "B",
            "strength": "clearly", "criteria": {"helpful": "B", "harmless": "tie"}}
    first = client.post("/api/alice/vote", json=body, headers=ALICE)
    again = client.post("/api/alice/vote", json=body, headers=ALICE)  # a retry of the same request
    assert first.json()["stored"] is True and again.json()["stored"] is False
    [vote] = store.votes()
    assert vote.winner == data["shown"][1] and vote.criteria == {"helpful": data["shown"][1], "harmless": "tie"}
    other = dict(body, vote_id=uuid.uuid4().hex, choice="A")
    assert client.post("/api/alice/vote", json=other, headers=ALICE).status_code == 409  # one vote per task
    assert next_task(client)["task"]["id"] != data["task"]["id"]


def test_ranking_vote_and_bad_votes_are_refused(client, store):
    while (data := next_task(client))["task"]["kind"] != "ranking":
        client.post("/api/alice/vote", json={"vote_id": uuid.uuid4().hex, "task_id": data["task"]["id"],
                                             "shown": data["shown"], "choice": "tie"}, headers=ALICE)
    base = {"vote_id": uuid.uuid4().hex, "task_id": data["task"]["id"], "shown": data["shown"]}
    assert client.post("/api/alice/vote", json={**base, "choice": "A", "strength": "clearly"},
                       headers=ALICE).status_code == 422
    assert client.post("/api/alice/vote", json={**base, "ranking": [0, 0, 1]}, headers=ALICE).status_code == 422
    assert client.post("/api/alice/vote", json={**base, "shown": [0, 1, 2][::-1] if data["shown"] != [2, 1, 0]
                                                else [0, 1, 2], "ranking": [0, 1, 2]}, headers=ALICE).status_code == 422
    assert client.post("/api/alice/vote", json={**base, "ranking": [2, 0, 1]}, headers=ALICE).json()["stored"]
    vote = [v for v in store.votes() if v.kind == "ranking"][0]
    ranks = vote.ranks
    assert ranks[data["shown"][2]] == 1 and ranks[data["shown"][0]] == 2 and ranks[data["shown"][1]] == 3


def test_pairwise_strength_rules_and_unknown_task(client):
    data = next_task(client)
    base = {"vote_id": uuid.uuid4().hex, "task_id": data["task"]["id"], "shown": data["shown"]}
    assert client.post("/api/alice/vote", json={**base, "choice": "A"}, headers=ALICE).status_code == 422
    assert client.post("/api/alice/vote", json={**base, "choice": "tie", "strength": "clearly"},
                       headers=ALICE).status_code == 422
    assert client.post("/api/alice/vote", json={**base, "task_id": "nope", "choice": "tie"},
                       headers=ALICE).status_code == 404
    assert client.post("/api/alice/vote", json={**base, "choice": "tie", "extra": 1}, headers=ALICE).status_code == 422


def test_oversized_body_is_refused(client):
    data = next_task(client)
    body = {"vote_id": "x", "task_id": data["task"]["id"], "shown": data["shown"], "choice": "tie",
            "rationale": "y" * 5000}
    assert client.post("/api/alice/vote", json=body, headers=ALICE).status_code == 413


def test_overlap_and_leases_decide_who_sees_a_task(tmp_path, access):
    """overlap 1: a task handed to alice (leased, not yet voted) is not handed to bob; overlap 2: once alice
    has voted, bob gets the same task for agreement."""
    from fastapi.testclient import TestClient

    from rlhf_system.feedback.app import make_app
    from rlhf_system.feedback.store import Store
    from tests.unit.feedback.conftest import pair_task

    bob = {"Authorization": "Bearer tok-bob"}
    for overlap, bob_first, bob_then in ((1, "t001", "t002"), (2, "t000", "t001")):
        store = Store(tmp_path / f"o{overlap}.db")
        store.add_tasks([pair_task(i) for i in range(3)])
        c = TestClient(make_app(store, access, overlap=overlap))
        mine = next_task(c)
        assert mine["task"]["id"] == "t000"
        theirs = next_task(c, "bob", "tok-bob")
        assert theirs["task"]["id"] == bob_first  # overlap 1: alice holds t000, so bob gets the next one
        c.post("/api/alice/vote", json={"vote_id": "v1", "task_id": "t000", "shown": mine["shown"], "choice": "tie"},
               headers=ALICE)
        assert next_task(c, "bob", "tok-bob") == theirs  # bob keeps the task he holds
        c.post("/api/bob/vote", json={"vote_id": "v2", "task_id": bob_first, "shown": theirs["shown"],
                                      "choice": "tie"}, headers=bob)
        assert next_task(c, "bob", "tok-bob")["task"]["id"] == bob_then
