"""Ephemeral signals on a Redis Cluster: sharded pub/sub (SPUBLISH/SSUBSCRIBE) on 7.x, classic PUBLISH on
6.2 (which has no sharded pub/sub: every node forwards it to every other), typing across processes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
from redis.asyncio.cluster import RedisCluster

from command_api.append import Appender
from realtime_fanout.presence import PresenceStore
from tests.cluster_fixtures import CLUSTER_PARAMS, LogRedis
from tests.fanout_fixtures import Client, Log
from tests.test_fanout_signals import frames_of, send_typing

on_clusters = pytest.mark.parametrize("log_redis", CLUSTER_PARAMS, indirect=True)


async def _major(client: RedisCluster) -> int:
    info = await client.info("server", target_nodes=RedisCluster.RANDOM)
    return int(str(info["redis_version"]).split(".")[0])


async def _messages(receive: Any, wait_s: float = 0.5) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + wait_s
    for _ in range(200):  # bounded
        left = deadline - time.monotonic()
        if left <= 0:
            break
        message = await receive(ignore_subscribe_messages=True, timeout=left)
        if message is not None and message.get("type") in ("message", "smessage"):
            out.append(msgspec.json.decode(message["data"]))
    return out


@on_clusters
async def test_presence_transitions_go_out_sharded_on_7_and_classic_on_6(
    log_redis: LogRedis, log_namespace: str
) -> None:
    client = log_redis.client()
    assert isinstance(client, RedisCluster)
    sharded = await _major(client) >= 7
    store = PresenceStore(client, log_namespace, ttl_s=30)
    store.sharded = sharded
    shard, classic = client.pubsub(), client.pubsub()
    try:
        await classic.subscribe(store.channel)
        if sharded:
            await shard.ssubscribe(store.channel)
        assert await store.touch([("c1", "alice"), ("c2", "bob")]) == 2
        assert await store.leave("c1", "alice")
        await store.publish(b'{"type":"typing","conversation_id":"c","user_id":"bob","state":"start"}')
        got_classic = await _messages(classic.get_message)
        got_shard = await _messages(shard.get_sharded_message) if sharded else []
        want = [("alice", True), ("bob", True), ("alice", False)]
        carried = got_shard if sharded else got_classic
        assert [(m["user_id"], m["online"]) for m in carried if m["type"] == "presence"] == want
        assert [m["type"] for m in carried][-1] == "typing"
        if sharded:  # not also broadcast the classic way
            assert got_classic == []
    finally:
        await shard.aclose()
        await classic.aclose()
        await client.aclose()


@pytest.mark.parametrize("log_redis", CLUSTER_PARAMS[:1], indirect=True)  # 7.x: the SSUBSCRIBE path
async def test_typing_crosses_fanout_processes_on_a_cluster(appender: Appender, make_fanout: Any) -> None:
    log = Log(appender)
    await log.create("room", "alice", "bob")
    one, two = await make_fanout(), await make_fanout()
    alice = await Client.open(one.url, "alice")
    bob = await Client.open(two.url, "bob")
    await asyncio.sleep(0.5)  # both buses subscribed
    await send_typing(alice, "room", "start")
    await bob.until(lambda c: frames_of(c, "typing"))
    assert frames_of(bob, "typing") == [
        {"type": "typing", "conversation_id": "room", "user_id": "alice", "state": "start"}
    ]
    await bob.until(lambda c: frames_of(c, "presence", user_id="alice", online=True) or any(
        u["user_id"] == "alice" and u["online"] for f in frames_of(c, "presence_snapshot") for u in f["users"]
    ))  # fmt: skip
    for client in (alice, bob):
        await client.close()
