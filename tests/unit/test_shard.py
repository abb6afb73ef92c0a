"""connector.shard: which replica owns which account (docs/design.md §14.2)."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Final

import pytest

from connector.errors import ConfigError
from connector.shard import ALL, Shard, jump_hash, parse_shard, shard_key, shard_of

NAMES = [f"kunde{i:04d}@firma.example" for i in range(3000)]


def test_the_key_is_the_first_8_octets_of_sha256_big_endian() -> None:
    digest = hashlib.sha256(b"info").digest()
    assert shard_key("info") == int.from_bytes(digest[:8], "big")
    assert shard_key("büro") == int.from_bytes(hashlib.sha256("büro".encode()).digest()[:8])


# (key, buckets, bucket) of the reference algorithm, as its other implementations test it
# (Go, Elixir, Python ports of Lamping and Veach's code).
REFERENCE: Final = [
    (0, 1, 0),
    (4, 2, 1),
    (7, 2, 0),
    (42, 57, 43),
    (1, 128, 55),
    (129, 128, 120),
    (256, 1024, 520),
    (0xDEAD10CC, 666, 361),
    (128, 100000000, 38172097),
    (128, 2147483648, 1644467860),
    ((1 << 64) - 1, 128, 92),
]


@pytest.mark.parametrize(("key", "buckets", "bucket"), REFERENCE)
def test_jump_hash_is_the_reference_algorithm(key: int, buckets: int, bucket: int) -> None:
    assert jump_hash(key, buckets) == bucket


def test_the_map_is_pinned() -> None:
    """The same in every replica, version and Python: a change here would part accounts from
    their ledger rows (README, "Sharding")."""
    names = ("info", "sales", "buchhaltung", "kunde-1", "kunde-2")
    assert [shard_of(n, 3) for n in names] == [2, 1, 0, 2, 1]
    assert [shard_of(n, 4) for n in names] == [2, 1, 0, 2, 1]
    assert [shard_of(n, 7) for n in names] == [2, 1, 6, 2, 1]


def test_every_account_has_exactly_one_owner_and_the_load_is_even() -> None:
    for count in (1, 2, 3, 4, 7):
        shards = [Shard(k, count) for k in range(count)]
        owners = [[s for s in shards if s.owns(n)] for n in NAMES]
        assert all(len(o) == 1 for o in owners)
        load = Counter(o[0].index for o in owners)
        assert min(load.values()) > len(NAMES) / count * 0.85


@pytest.mark.parametrize("count", [1, 2, 3, 4, 9])
def test_one_more_replica_moves_accounts_only_to_it(count: int) -> None:
    """Jump hash's property: N -> N+1 moves only the accounts the new shard takes, about
    1/(N+1) of them; the others keep their owner and their ledger rows."""
    moved = [n for n in NAMES if shard_of(n, count) != shard_of(n, count + 1)]
    assert all(shard_of(n, count + 1) == count for n in moved)
    assert abs(len(moved) / len(NAMES) - 1 / (count + 1)) < 0.04


def test_fewer_replicas_move_only_the_accounts_of_the_shards_that_go() -> None:
    for n in NAMES:
        if shard_of(n, 4) < 3:
            assert shard_of(n, 3) == shard_of(n, 4)


@pytest.mark.parametrize(
    ("text", "env", "host", "shard"),
    [
        ("1/3", {}, "", Shard(1, 3)),
        ("0/1", {}, "", ALL),
        ("auto/3", {"POD_NAME": "pop3-connector-2"}, "ignored", Shard(2, 3)),
        ("auto/3", {"POD_NAME": ""}, "pop3-connector-0", Shard(0, 3)),
        ("auto/3", {}, "my-stateful-set-1", Shard(1, 3)),
    ],
)
def test_parse(text: str, env: dict[str, str], host: str, shard: Shard) -> None:
    assert parse_shard(text, environ=env, hostname=lambda: host) == shard


@pytest.mark.parametrize(
    ("text", "env", "problem"),
    [
        ("3/3", {}, "--shard 3/3: shard 3 is not below 3"),
        ("0/0", {}, "--shard 0/0: N must be at least 1"),
        ("1-3", {}, '--shard 1-3: expected "k/N" or "auto/N", like 0/3 or auto/3'),
        (
            "auto/$(POP3_CONNECTOR_SHARDS)",
            {},
            '--shard auto/$(POP3_CONNECTOR_SHARDS): expected "k/N" or "auto/N", like 0/3 or auto/3',
        ),
        (
            "auto/3",
            {"POD_NAME": "pop3-connector-3"},
            '--shard auto/3: pod name "pop3-connector-3" gives shard 3, not below 3 (do '
            "spec.replicas and POP3_CONNECTOR_SHARDS agree?)",
        ),
        (
            "auto/3",
            {"POD_NAME": "maint"},
            '--shard auto/3: pod name "maint" does not end in "-k" (a StatefulSet pod\'s '
            "ordinal); set POD_NAME or give k/N",
        ),
        (
            "auto/3",
            {"POD_NAME": "evil\x1b[2J-1x"},
            '--shard auto/3: pod name "evil\\x1b[2J-1x" does not end in "-k" (a StatefulSet '
            "pod's ordinal); set POD_NAME or give k/N",
        ),
    ],
)
def test_bad_values_are_config_errors_naming_them(
    text: str, env: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_shard(text, environ=env, hostname=lambda: "host")
    assert info.value.problems == [problem]


def test_host_name_is_used_without_a_pod_name() -> None:
    with pytest.raises(ConfigError, match='host name "mailhost" does not end in "-k"'):
        parse_shard("auto/2", environ={}, hostname=lambda: "mailhost")
