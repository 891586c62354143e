"""A real redis-server for the queue's unit tests (one per session, on a free loopback port, AOF
with appendfsync always); each test starts from an empty database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.node.queue.stream import WorkQueue
from service.tools.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture()
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture()
def spool_root(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture()
def work_queue(redis_client: redis.Redis, redis_server: RedisServer, spool_root: Path) -> Iterator[WorkQueue]:
    queue = WorkQueue(redis_server.url, stream="test:instances", group="workers", spool_root=spool_root)
    yield queue
    queue.close()
