"""connector.cycle.identity: what tells two copies of one message apart (the duplicate key); the
identity check before a DELE runs in a cycle: tests/component/test_cycle_per_message.py."""

from __future__ import annotations

from connector.cycle import duplicate_key
from tests.component.test_cycle_lifecycle import copy_for


def test_duplicate_key_is_the_message_id_and_a_digest_of_the_body_only() -> None:
    key = duplicate_key("<m1@customer.example>", copy_for("info@firma.example", "x"))
    assert key.startswith("mid:<m1@customer.example>:")
    assert len(key.rpartition(":")[2]) == 64  # SHA-256, hex
    assert key == duplicate_key(
        "<m1@customer.example>", copy_for("chef@firma.example", "x", mx="mx22")
    )
    assert key != duplicate_key("<m1@customer.example>", copy_for("info@firma.example", "y"))
    assert key != duplicate_key("<m2@customer.example>", copy_for("info@firma.example", "x"))
    # LF line ends, as route() tolerates them; no empty line: the whole message.
    assert duplicate_key("<a@b>", b"To: x\n\nbody\n") == duplicate_key("<a@b>", b"To: y\n\nbody\n")
    assert duplicate_key("<a@b>", b"To: x\r\n") != duplicate_key("<a@b>", b"To: y\r\n")
    # A hostile Message-ID cannot make the key unbounded.
    long = duplicate_key("<" + "x" * 100_000 + "@b>", b"To: x\r\n\r\nbody\r\n")
    assert len(long) < 200
    assert long != duplicate_key("<" + "x" * 100_001 + "@b>", b"To: x\r\n\r\nbody\r\n")
