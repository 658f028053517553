"""The command API against a real Redis: every route's success and failure paths."""

from __future__ import annotations

import asyncio

import pytest

from command_api.routes import ROUTES
from events.codec import decode
from events.schema import (
    ConversationArchived,
    ConversationCreated,
    MessageDeleted,
    MessageEdited,
    MessageSent,
    MessagesRead,
    ParticipantAdded,
    ParticipantRemoved,
)
from tests.apiclient import ApiClient
from tests.cluster_fixtures import CLUSTER_PARAMS
from tests.conftest import CONTRACT_REDIS, CONTRACT_REDIS_AND_CLUSTERS

PROBLEM = "application/problem+json"
on_clusters_too = pytest.mark.parametrize("contract_redis_url", CONTRACT_REDIS_AND_CLUSTERS, indirect=True)
on_one_cluster_too = pytest.mark.parametrize(
    "contract_redis_url",
    [*CONTRACT_REDIS, *(p for p in CLUSTER_PARAMS if p.values == ("cluster7",))],
    indirect=True,
)
"""For a matrix of many cases: both single Redises, and one cluster (its routing is what a cluster adds;
the 6.2 cluster runs the rest of the contract)."""
"""What Redis decides runs on a Redis Cluster too; the HTTP edge's checks (media types, bodies) do not."""


async def log_of(api: ApiClient, conversation_id: str) -> list:  # type: ignore[type-arg]
    """Every event of one conversation, decoded, in log order."""
    log = api.services.appender.log
    partition = log.layout.partition_for(conversation_id)
    entries = await log.read_after(partition, "0-0", 100_000)
    return [e for e in (decode(x.data) for x in entries) if e.conversation_id == conversation_id]


def assert_problem(answer, status: int, slug: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == PROBLEM
    body = answer.json()
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status and body["title"]
    return body  # type: ignore[no-any-return]


@on_clusters_too
async def test_create_conversation_answers_position_and_appends_one_event(api: ApiClient) -> None:
    answer = await api.post(
        "alice", "/v1/conversations", {"title": "Lunch", "participants": ["bob", "carol"]}
    )
    assert answer.status_code == 202
    body = answer.json()
    assert body["seq"] == 1
    position = body["position"]
    assert position["epoch"] == api.services.appender.epoch
    assert body["position_token"] == f"{position['epoch']}.{position['partition']}.{position['stream_id']}"
    events = await log_of(api, body["conversation_id"])
    assert len(events) == 1
    event = events[0]
    assert event.event_id == body["event_ids"][0]
    assert event.seq == 1 and event.actor == "alice"
    assert event.payload == ConversationCreated(title="Lunch", participants=("alice", "bob", "carol"))
    assert event.occurred_at.utcoffset() is not None


def stranger_requests(cid: str, mid: str) -> list[tuple[str, str, dict | None]]:  # type: ignore[type-arg]
    """One request per conversation route, addressed to `cid` (every route of ROUTES but create)."""
    base = f"/v1/conversations/{cid}"
    return [
        ("POST", f"{base}/participants", {"user_id": "mallory"}),
        ("DELETE", f"{base}/participants/alice", None),
        ("DELETE", f"{base}/participants/mallory", None),
        ("POST", f"{base}/messages", {"body": "x"}),
        ("POST", f"{base}/messages", {"body": "x", "message_id": mid, "reply_to": mid}),
        ("PATCH", f"{base}/messages/{mid}", {"body": "x"}),
        ("DELETE", f"{base}/messages/{mid}", None),
        ("POST", f"{base}/read", {"up_to_seq": 1}),
        ("POST", f"{base}/read", {"up_to_seq": 99}),
        ("PUT", f"{base}/archive", None),
        ("DELETE", f"{base}/archive", None),
    ]


async def answers_to(api: ApiClient, user: str, cid: str, mid: str, query: str, key: str) -> list[tuple]:  # type: ignore[type-arg]
    out = []
    for n, (method, path, body) in enumerate(stranger_requests(cid, mid)):
        headers = api.headers(user, {"Idempotency-Key": f"{key}-{cid}-{n}"} if key else None)
        answer = await api.http.request(method, path + query, json=body, headers=headers)
        out.append((method, path.replace(cid, "C"), answer.status_code, answer.content, dict(answer.headers)))
    return out


@pytest.mark.parametrize("query", ["", "?expected_seq=0", "?expected_seq=5", "?expected_seq=%C2%B2"])
@pytest.mark.parametrize("key", ["", "k"])
@on_one_cluster_too
async def test_a_stranger_cannot_tell_a_conversation_from_a_missing_one(
    api: ApiClient, query: str, key: str
) -> None:
    """Every route, with or without expected_seq (the current one too) and Idempotency-Key, answers a
    non-participant (never in it, or removed) byte for byte as it answers for a missing conversation
    (seq 5 is the conversation's current one)."""
    cid = await api.create_conversation("alice", "bob", "carol")
    mid = (await api.send("alice", cid)).json()["message_id"]
    assert (await api.post("alice", f"/v1/conversations/{cid}/read", {"up_to_seq": 2})).status_code == 202
    assert (await api.put("alice", f"/v1/conversations/{cid}/archive")).status_code == 202
    assert (await api.delete("alice", f"/v1/conversations/{cid}/participants/carol")).status_code == 202
    missing = await answers_to(api, "mallory", "no-such-conversation", mid, query, key)
    if "%" not in query:
        assert {a[2] for a in missing} == {404}
        assert {a[3] for a in missing} == {
            b'{"type":"/problems/conversation-not-found","title":"No such conversation among yours","status":404}'
        }
    assert await answers_to(api, "mallory", cid, mid, query, key) == missing
    assert await answers_to(api, "carol", cid, mid, query, key + "c") == await answers_to(
        api, "carol", "no-such-conversation", mid, query, key + "c"
    )
    assert len(await log_of(api, cid)) == 5


@on_clusters_too
async def test_chosen_conversation_ids_live_in_their_creators_namespace(api: ApiClient) -> None:
    """A taken id only ever collides with one's own conversation: nobody learns another's ids exist."""
    body = {"title": "x", "conversation_id": "team-42"}
    first = await api.post("alice", "/v1/conversations", body)
    assert first.status_code == 202 and first.json()["conversation_id"] == "alice:team-42"
    theirs = await api.post("bob", "/v1/conversations", body)
    assert theirs.status_code == 202 and theirs.json()["conversation_id"] == "bob:team-42"
    assert_problem(await api.post("alice", "/v1/conversations", body), 409, "conversation-exists")
    sent = await api.send("alice", "alice:team-42")
    assert sent.status_code == 202 and sent.json()["conversation_id"] == "alice:team-42"
    assert (await api.send("alice", "alice%3Ateam-42")).json()["seq"] == 3
    assert_problem(await api.send("alice", "bob:team-42"), 404, "conversation-not-found")
    assert_problem(await api.send("alice", "team-42"), 404, "conversation-not-found")
    for taken in ("bob:team-42", "alice:team-42", ":x", "a:b:c"):
        chosen = {"title": "x", "conversation_id": taken}
        assert_problem(await api.post("alice", "/v1/conversations", chosen), 422, "invalid-id")
    for bad in ("a:b:c", ":x", "x:", f"{'a' * 65}:x", "a%00b", "a%C2%B2"):
        assert_problem(await api.send("alice", bad), 422, "invalid-id")
    assert [e.seq for e in await log_of(api, "alice:team-42")] == [1, 2, 3]


@on_clusters_too
async def test_message_lifecycle(api: ApiClient) -> None:
    cid = await api.create_conversation("alice", "bob")
    sent = await api.send("alice", cid, "  cafe\u0301 ")
    assert sent.status_code == 202
    mid = sent.json()["message_id"]
    reply = await api.post("bob", f"/v1/conversations/{cid}/messages", {"body": "re", "reply_to": mid})
    assert reply.status_code == 202
    edited = await api.patch("alice", f"/v1/conversations/{cid}/messages/{mid}", {"body": "edited"})
    assert edited.status_code == 202
    deleted = await api.delete("alice", f"/v1/conversations/{cid}/messages/{mid}")
    assert deleted.status_code == 202
    events = await log_of(api, cid)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[1].payload == MessageSent(message_id=mid, body="  caf\u00e9 ")
    assert events[2].payload == MessageSent(message_id=reply.json()["message_id"], body="re", reply_to=mid)
    assert events[3].payload == MessageEdited(message_id=mid, body="edited")
    assert events[4].payload == MessageDeleted(message_id=mid)


@on_clusters_too
async def test_message_refusals(api: ApiClient) -> None:
    cid = await api.create_conversation("alice", "bob")
    mid = (await api.send("alice", cid)).json()["message_id"]
    path = f"/v1/conversations/{cid}/messages"
    assert_problem(await api.patch("bob", f"{path}/{mid}", {"body": "x"}), 403, "not-the-author")
    assert_problem(await api.delete("bob", f"{path}/{mid}"), 403, "not-the-author")
    assert_problem(await api.patch("alice", f"{path}/nope", {"body": "x"}), 404, "message-not-found")
    taken = await api.post("alice", path, {"body": "x", "message_id": mid})
    assert_problem(taken, 409, "message-id-taken")
    dangling = await api.post("alice", path, {"body": "x", "reply_to": "nope"})
    assert_problem(dangling, 422, "reply-target-not-found")
    assert (await api.delete("alice", f"{path}/{mid}")).status_code == 202
    assert_problem(await api.delete("alice", f"{path}/{mid}"), 410, "message-deleted")
    assert_problem(await api.patch("alice", f"{path}/{mid}", {"body": "x"}), 410, "message-deleted")
    assert_problem(await api.send("mallory", cid), 404, "conversation-not-found")
    assert_problem(await api.send("alice", "no-such-conversation"), 404, "conversation-not-found")
    assert len(await log_of(api, cid)) == 3  # created, sent, deleted: refusals appended nothing


@pytest.mark.parametrize(
    ("body", "status", "slug"),
    [
        ({"body": ""}, 422, "empty-text"),
        ({"body": " \n\t "}, 422, "empty-text"),
        ({"body": "x" * 4001}, 422, "text-too-long"),
        ({"body": "bell\x07"}, 422, "control-characters"),
        ({"body": "c1\x85"}, 422, "control-characters"),
        ({"body": "x", "unknown": 1}, 422, "invalid-body"),
        ({"body": 5}, 422, "invalid-body"),
        ({}, 422, "invalid-body"),
        ({"body": "x", "message_id": "has space"}, 422, "invalid-id"),
        ({"body": "x", "reply_to": "a" * 65}, 422, "invalid-id"),
    ],
)
async def test_send_validation(api: ApiClient, body: dict, status: int, slug: str) -> None:  # type: ignore[type-arg]
    cid = await api.create_conversation("alice")
    assert_problem(await api.post("alice", f"/v1/conversations/{cid}/messages", body), status, slug)
    assert len(await log_of(api, cid)) == 1


async def test_body_limits_and_transport_errors(api: ApiClient) -> None:
    cid = await api.create_conversation("alice")
    path = f"/v1/conversations/{cid}/messages"
    ok = await api.send("alice", cid, "x" * 4000)
    assert ok.status_code == 202
    assert ok.json()["seq"] == 2
    headers = api.headers("alice")
    malformed = await api.http.post(
        path, content=b"{nope", headers={**headers, "content-type": "application/json"}
    )
    assert_problem(malformed, 400, "malformed-json")
    not_json = await api.http.post(path, content=b"body=x", headers={**headers, "content-type": "text/plain"})
    assert_problem(not_json, 415, "unsupported-media-type")
    huge = await api.http.post(
        path,
        content=b'{"body":"' + b"x" * 70_000 + b'"}',
        headers={**headers, "content-type": "application/json"},
    )
    assert_problem(huge, 413, "request-too-large")
    bad_key = await api.send("alice", cid, headers={"Idempotency-Key": "has space"})
    assert_problem(bad_key, 400, "invalid-idempotency-key")
    bad_seq = await api.http.post(path + "?expected_seq=-1", json={"body": "x"}, headers=headers)
    assert_problem(bad_seq, 400, "invalid-expected-seq")
    assert_problem(await api.http.get("/v1/nowhere", headers=headers), 404, "not-found")
    assert_problem(await api.http.get(path, headers=headers), 405, "method-not-allowed")
    assert len(await log_of(api, cid)) == 2


@pytest.mark.parametrize(
    "raw",
    ["%C2%B2", "%D9%A1", "%EF%BC%91", "1%C2%B2", "+1", "-0", " 1", "1 ", "0x1", "1e3", "1.0", "", "%00",
     "1" * 16, "9" * 5000],
)  # fmt: skip
async def test_expected_seq_is_ascii_digits_or_400(api: ApiClient, raw: str) -> None:
    """Non-ASCII digits pass `str.isdigit`: a superscript two then failed `int` (a 500), and Arabic-Indic
    or fullwidth digits were read as numbers; only ASCII digits are."""
    cid = await api.create_conversation("alice")
    answer = await api.post("alice", f"/v1/conversations/{cid}/messages?expected_seq={raw}", {"body": "x"})
    assert_problem(answer, 400, "invalid-expected-seq")
    assert len(await log_of(api, cid)) == 1


async def test_a_huge_declared_content_length_is_413_not_500(api: ApiClient) -> None:
    cid = await api.create_conversation("alice")
    headers = {**api.headers("alice"), "content-type": "application/json", "content-length": "9" * 5000}
    answer = await api.http.post(
        f"/v1/conversations/{cid}/messages", content=b'{"body":"x"}', headers=headers
    )
    assert_problem(answer, 413, "request-too-large")


@pytest.mark.parametrize(
    "media_type",
    ["application/json", "Application/JSON", "APPLICATION/json; charset=UTF-8", "application/json;charset=utf-8",
     'application/json ; charset="utf-8"', "application/json; foo=bar"],
)  # fmt: skip
async def test_json_media_types_are_case_insensitive_with_parameters(api: ApiClient, media_type: str) -> None:
    cid = await api.create_conversation("alice")
    headers = {**api.headers("alice"), "content-type": media_type}
    answer = await api.http.post(
        f"/v1/conversations/{cid}/messages", content=b'{"body":"x"}', headers=headers
    )
    assert answer.status_code == 202, answer.text


@pytest.mark.parametrize(
    "media_type",
    ["application/jsonp", "application/json-patch+json", "application/merge-patch+json", "application/jsonx",
     "application/vnd.api+json", "text/json", "text/plain", "application/json; charset=latin-1", "json", ""],
)  # fmt: skip
async def test_other_media_types_are_415(api: ApiClient, media_type: str) -> None:
    cid = await api.create_conversation("alice")
    headers = {**api.headers("alice"), "content-type": media_type}
    answer = await api.http.post(
        f"/v1/conversations/{cid}/messages", content=b'{"body":"x"}', headers=headers
    )
    assert_problem(answer, 415, "unsupported-media-type")
    assert len(await log_of(api, cid)) == 1


@on_clusters_too
async def test_participants(api: ApiClient) -> None:
    cid = await api.create_conversation("alice", "bob")
    participants = f"/v1/conversations/{cid}/participants"
    assert (await api.post("bob", participants, {"user_id": "carol"})).status_code == 202
    assert_problem(await api.post("bob", participants, {"user_id": "carol"}), 409, "already-a-participant")
    assert_problem(await api.post("mallory", participants, {"user_id": "eve"}), 404, "conversation-not-found")
    assert_problem(await api.delete("bob", f"{participants}/carol"), 403, "removal-forbidden")
    assert_problem(await api.delete("bob", f"{participants}/alice"), 409, "creator-cannot-leave")
    assert_problem(await api.delete("alice", f"{participants}/alice"), 409, "creator-cannot-leave")
    assert_problem(await api.delete("alice", f"{participants}/zed"), 404, "participant-not-found")
    assert (await api.delete("alice", f"{participants}/carol")).status_code == 202  # creator removes
    assert (await api.delete("bob", f"{participants}/bob")).status_code == 202  # bob leaves
    # a removed participant is refused from the removal on
    assert_problem(await api.send("bob", cid), 404, "conversation-not-found")
    assert_problem(await api.send("carol", cid), 404, "conversation-not-found")
    assert_problem(
        await api.post("carol", f"/v1/conversations/{cid}/read", {"up_to_seq": 1}),
        404,
        "conversation-not-found",
    )
    assert (await api.post("alice", participants, {"user_id": "bob"})).status_code == 202  # re-added
    assert (await api.send("bob", cid)).status_code == 202
    payloads = [e.payload for e in await log_of(api, cid)]
    assert payloads[1:5] == [
        ParticipantAdded(user_id="carol"),
        ParticipantRemoved(user_id="carol"),
        ParticipantRemoved(user_id="bob"),
        ParticipantAdded(user_id="bob"),
    ]


@on_clusters_too
async def test_read_markers_and_archive(api: ApiClient) -> None:
    cid = await api.create_conversation("alice", "bob")
    await api.send("alice", cid)
    read = f"/v1/conversations/{cid}/read"
    beyond = assert_problem(await api.post("bob", read, {"up_to_seq": 3}), 422, "read-beyond-end")
    assert beyond["current_seq"] == 2
    assert (await api.post("bob", read, {"up_to_seq": 2})).status_code == 202
    stale = assert_problem(await api.post("bob", read, {"up_to_seq": 1}), 409, "read-marker-not-advanced")
    assert stale["current_seq"] == 2
    assert_problem(await api.post("bob", read, {"up_to_seq": 0}), 422, "invalid-body")
    archive = f"/v1/conversations/{cid}/archive"
    assert (await api.put("bob", archive)).status_code == 202
    assert_problem(await api.put("bob", archive), 409, "already-archived")
    assert (await api.put("alice", archive)).status_code == 202  # per user
    assert (await api.delete("bob", archive)).status_code == 202
    assert_problem(await api.delete("bob", archive), 409, "not-archived")
    events = await log_of(api, cid)
    assert events[2].payload == MessagesRead(up_to_seq=2) and events[2].actor == "bob"
    assert events[3].payload == ConversationArchived() and events[3].actor == "bob"


@on_clusters_too
async def test_expected_sequence(api: ApiClient) -> None:
    cid = await api.create_conversation("alice")
    path = f"/v1/conversations/{cid}/messages"
    mismatch = await api.post("alice", path + "?expected_seq=5", {"body": "x"})
    assert assert_problem(mismatch, 409, "sequence-mismatch")["current_seq"] == 1
    ok = await api.post("alice", path + "?expected_seq=1", {"body": "x"})
    assert ok.status_code == 202 and ok.json()["seq"] == 2


@on_clusters_too
async def test_idempotent_retry_returns_the_original_answer(api: ApiClient) -> None:
    cid = await api.create_conversation("alice")
    key = {"Idempotency-Key": "send-1"}
    first = await api.send("alice", cid, "once", headers=key)
    again = await api.send("alice", cid, "once", headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    reused = await api.send("alice", cid, "another body", headers=key)
    assert_problem(reused, 422, "idempotency-key-reused")
    # keys are per user: bob's identical key is his own
    create = {"title": "t"}
    a = await api.post("alice", "/v1/conversations", create, {"Idempotency-Key": "c1"})
    b = await api.post("bob", "/v1/conversations", create, {"Idempotency-Key": "c1"})
    a2 = await api.post("alice", "/v1/conversations", create, {"Idempotency-Key": "c1"})
    assert a.json()["conversation_id"] != b.json()["conversation_id"]
    assert a2.json() == a.json()
    assert [e.seq for e in await log_of(api, cid)] == [1, 2]


async def conversations_on_two_partitions(api: ApiClient, user: str) -> tuple[str, str]:
    layout = api.services.appender.layout
    first = await api.create_conversation(user)
    while layout.partition_for(second := await api.create_conversation(user)) == layout.partition_for(first):
        pass
    return first, second


@on_clusters_too
async def test_an_idempotency_key_is_the_users_across_partitions(api: ApiClient) -> None:
    """The same user and key on conversations of two partitions: the second request is 422, not a
    second event (each partition's script sees only its own records)."""
    first, second = await conversations_on_two_partitions(api, "alice")
    key = {"Idempotency-Key": "across"}
    assert (await api.send("alice", first, "once", headers=key)).status_code == 202
    assert_problem(await api.send("alice", second, "once", headers=key), 422, "idempotency-key-reused")
    again = await api.send("alice", first, "once", headers=key)
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    racing = {"Idempotency-Key": "racing"}
    answers = await asyncio.gather(
        *(api.send("alice", c, "race", headers=racing) for c in (first, second) * 5)
    )
    accepted = {a.json()["conversation_id"] for a in answers if a.status_code == 202}
    assert len(accepted) == 1
    assert all(
        a.json()["type"] == "/problems/idempotency-key-reused" for a in answers if a.status_code != 202
    )
    assert [len(await log_of(api, c)) for c in (first, second)] == ([3, 1] if accepted == {first} else [2, 2])
    assert (await api.send("bob", second, "once", headers=key)).status_code == 404  # bob's key is his own


@on_clusters_too
async def test_a_refused_command_binds_its_key_and_may_be_retried(api: ApiClient) -> None:
    first, second = await conversations_on_two_partitions(api, "alice")
    key = {"Idempotency-Key": "refused"}
    assert_problem(await api.send("bob", first, "hi", headers=key), 404, "conversation-not-found")
    assert_problem(await api.send("bob", second, "hi", headers=key), 422, "idempotency-key-reused")
    assert (
        await api.post("alice", f"/v1/conversations/{first}/participants", {"user_id": "bob"})
    ).status_code == 202
    retried = await api.send("bob", first, "hi", headers=key)
    assert retried.status_code == 202 and "idempotent-replayed" not in retried.headers


@on_clusters_too
async def test_idempotency_keys_expire(api_env: dict[str, str]) -> None:
    async with ApiClient.running({**api_env, "PARLEY_IDEMPOTENCY_TTL_S": "1"}) as api:
        cid = await api.create_conversation("alice")
        key = {"Idempotency-Key": "k"}
        first = await api.send("alice", cid, headers=key)
        ttl_ms = await api.services.redis.pttl(
            api.services.appender.layout.idempotency_key(first.json()["position"]["partition"], "alice", "k")
        )
        assert 0 < ttl_ms <= 1000
        await asyncio.sleep(1.2)
        second = await api.send("alice", cid, headers=key)
        assert second.json()["seq"] == 3


@on_clusters_too
async def test_fifty_concurrent_sends_get_sequences_without_gap(api: ApiClient) -> None:
    cid = await api.create_conversation("alice")
    answers = await asyncio.gather(*(api.send("alice", cid, f"m{i}") for i in range(50)))
    assert all(a.status_code == 202 for a in answers)
    assert sorted(a.json()["seq"] for a in answers) == list(range(2, 52))
    events = await log_of(api, cid)
    assert [e.seq for e in events] == list(range(1, 52))
    assert {e.event_id for e in events[1:]} == {a.json()["event_ids"][0] for a in answers}


@on_clusters_too
async def test_concurrent_edit_and_delete_resolve_to_one_order(api: ApiClient) -> None:
    cid = await api.create_conversation("alice")
    path = f"/v1/conversations/{cid}/messages"
    for round_ in range(20):
        mid = (await api.send("alice", cid, f"r{round_}")).json()["message_id"]
        edit, delete = await asyncio.gather(
            api.patch("alice", f"{path}/{mid}", {"body": "edited"}), api.delete("alice", f"{path}/{mid}")
        )
        assert delete.status_code == 202
        if edit.status_code == 202:
            assert edit.json()["seq"] < delete.json()["seq"]
        else:
            assert_problem(edit, 410, "message-deleted")
    events = await log_of(api, cid)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    deleted: set[str] = set()
    for e in events:
        if isinstance(e.payload, MessageDeleted):
            deleted.add(e.payload.message_id)
        if isinstance(e.payload, MessageEdited):
            assert e.payload.message_id not in deleted  # never an edit after the delete


@on_clusters_too
async def test_rate_limit_answers_429_with_retry_after(api_env: dict[str, str]) -> None:
    env = {**api_env, "PARLEY_RATE_LIMIT_PER_S": "1", "PARLEY_RATE_LIMIT_BURST": "3"}
    async with ApiClient.running(env) as api:
        cid = await api.create_conversation("alice")
        answers = [await api.send("alice", cid) for _ in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 429]
        limited = assert_problem(answers[2], 429, "rate-limited")
        assert int(answers[2].headers["retry-after"]) >= 1
        assert limited["detail"]
        other = await api.create_conversation("bob")  # per user
        assert other


async def test_health_ready_metrics_and_openapi(api: ApiClient) -> None:
    assert (await api.http.get("/healthz")).json() == {"status": "ok"}
    assert (await api.http.get("/readyz")).json() == {"status": "ready"}
    cid = await api.create_conversation("alice")
    await api.send("mallory", cid)
    metrics = (await api.http.get("/metrics")).text
    assert 'parley_commands_total{outcome="accepted",reason="",type="create_conversation"}' in metrics
    assert (
        'parley_commands_total{outcome="refused",reason="conversation-not-found",type="send_message"}'
        in metrics
    )
    assert "parley_append_seconds_bucket" in metrics
    spec = (await api.http.get("/openapi.json")).json()
    routes = {(route.template, route.method.lower()) for route in ROUTES}
    documented = {(p, m) for p, ops in spec["paths"].items() if p.startswith("/v1/") for m in ops}
    assert routes == documented and len(routes) == 9
    schemas = spec["components"]["schemas"]
    for path, ops in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for op in ops.values():
            assert op["security"] == [{"bearer": []}]
            assert op["responses"]["202"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Accepted"
            }
            body = op.get("requestBody")
            if body is not None:
                ref = body["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
                assert schemas[ref]["additionalProperties"] is False
    assert set(schemas["SendMessage"]["required"]) == {"body"}
    assert spec["paths"]["/v1/conversations/{conversation_id}/messages"]["post"]["requestBody"]


async def test_redis_down_gives_503_and_no_partial_state(api_env: dict[str, str], redis_proc) -> None:  # type: ignore[no-untyped-def]
    async with ApiClient.running({**api_env, "REDIS_URL": redis_proc.url}) as api:
        cid = await api.create_conversation("alice")
        redis_proc.stop()
        down = await api.send("alice", cid)
        body = assert_problem(down, 503, "log-unavailable")
        assert "Idempotency-Key" in body["detail"]
        assert down.headers["retry-after"] == "1"
        keyed = await api.send("alice", cid, headers={"Idempotency-Key": "while-down"})
        assert_problem(keyed, 503, "log-unavailable")  # its claim could not be made either
        ready = await api.http.get("/readyz")
        assert_problem(ready, 503, "not-ready")
        redis_proc.start()
        again = await api.send("alice", cid)
        assert again.status_code == 202 and again.json()["seq"] == 2
        assert [e.seq for e in await log_of(api, cid)] == [1, 2]
