"""The roster CRDT: join laws, mutator deltas, remove-wins semantics, encoding (notes L1)."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vigo.roster
from vigo.errors import RosterError, RosterFormatError, RosterRefusedError, VigoError
from vigo.roster import (
    SHARDS,
    ReplicaId,
    Roster,
    ShardState,
    State,
    decode,
    encode,
    joined,
    shard_of,
)
from vigo.roster.codec import FORMAT_VERSION
from vigo.roster.crdt import HybridClock, dot_counter, dot_replica

# Agents that share one shard, so joins see several agents in one state; plus one elsewhere.
SHARD = shard_of("agent-0")
AGENTS = ["agent-0", "agent-764", "agent-869"]
OTHER_AGENT = "agent-1"
assert all(shard_of(a) == SHARD for a in AGENTS) and shard_of(OTHER_AGENT) != SHARD
FPS = ["a" * 64, "b" * 64]

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

replica_ix = st.integers(0, 2)
agent = st.sampled_from(AGENTS)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), replica_ix, agent, st.sampled_from(FPS)),
        st.tuples(st.just("revoke"), replica_ix, agent, st.just("")),
        st.tuples(st.just("forget"), replica_ix, agent, st.just("")),
        st.tuples(st.just("deliver"), replica_ix, st.integers(0, 10**6), st.just("")),
        st.tuples(st.just("sync"), replica_ix, replica_ix, st.just("")),
    ),
    max_size=30,
)


def run_world(plan: list[tuple]) -> tuple[list[Roster], list[ShardState]]:
    """Three replicas after a plan of mutations, random delta deliveries and full syncs: the
    reachable states the join laws must hold for (deltas carry contexts that only make sense
    for states an execution can produce)."""
    rosters = [Roster(ReplicaId.fresh(f"r{i}")) for i in range(3)]
    deltas: list[ShardState] = []
    for kind, r, x, fp in plan:
        roster = rosters[r]
        if kind == "admit":
            deltas.append(roster.admit(x, fp))
        elif kind == "revoke":
            deltas.append(roster.revoke(x))
        elif kind == "forget":
            try:
                deltas.append(roster.forget(x))
            except RosterRefusedError:
                assert roster.status(x).state is State.REVOKED
        elif kind == "deliver" and deltas:
            roster.join(deltas[x % len(deltas)])
        elif kind == "sync":
            for shard in rosters[x].shards:
                roster.join(shard)
    return rosters, deltas


worlds = steps.map(run_world)


def shard(roster: Roster) -> ShardState:
    return roster.shards[SHARD]


# --- L1: join laws ---------------------------------------------------------------------------------


@PROPERTY
@given(worlds)
def test_join_is_idempotent(world):
    rosters, deltas = world
    for state in [shard(r) for r in rosters] + [d for d in deltas if d.shard == SHARD]:
        assert joined(state, state) == state


@PROPERTY
@given(worlds)
def test_join_is_commutative(world):
    a, b, c = (shard(r) for r in world[0])
    assert joined(a, b) == joined(b, a)
    assert joined(a, c) == joined(c, a)


@PROPERTY
@given(worlds)
def test_join_is_associative(world):
    a, b, c = (shard(r) for r in world[0])
    assert joined(joined(a, b), c) == joined(a, joined(b, c))


@PROPERTY
@given(worlds)
def test_join_is_associative_over_deltas(world):
    _, deltas = world
    mine = [d for d in deltas if d.shard == SHARD]
    if len(mine) >= 3:
        a, b, c = mine[-3:]
        assert joined(joined(a, b), c) == joined(a, joined(b, c))
        assert joined(a, b, c) == joined(c, b, a)


@PROPERTY
@given(worlds)
def test_join_inflates(world):
    a, b, _ = (shard(r) for r in world[0])
    j = joined(a, b)
    assert joined(a, j) == j
    assert joined(b, j) == j


@PROPERTY
@given(worlds, replica_ix, replica_ix, st.sampled_from(["admit", "revoke", "forget"]), agent, st.sampled_from(FPS))
def test_mutator_delta_equals_full_state(world, x, y, kind, agent_id, fp):
    """m(X) = X ⊔ mδ(X); the delta is a no-op at its origin; and a peer holding X gets the same
    from the delta as from the whole mutated state."""
    rosters, _ = world
    origin, peer = rosters[x], rosters[y]
    before = shard(origin).copy()
    peer_before = shard(peer).copy()
    try:
        delta = {"admit": lambda: origin.admit(agent_id, fp), "revoke": lambda: origin.revoke(agent_id),
                 "forget": lambda: origin.forget(agent_id)}[kind]()
    except RosterRefusedError:
        assert kind == "forget" and before.tokens(agent_id)
        return
    after = shard(origin)
    assert joined(before, delta) == after
    assert joined(after, delta) == after
    if x != y:
        assert joined(peer_before, before, delta) == joined(peer_before, after)


@PROPERTY
@given(worlds)
def test_delivery_order_does_not_matter(world):
    _, deltas = world
    mine = [d for d in deltas if d.shard == SHARD]
    if not mine:
        return
    forward = joined(ShardState(SHARD), *mine)
    backward = joined(ShardState(SHARD), *reversed(mine))
    twice = joined(ShardState(SHARD), *mine, *mine)
    assert forward == backward == twice


# --- L1: encoding ----------------------------------------------------------------------------------


@PROPERTY
@given(worlds)
def test_encoding_round_trips_and_equal_states_have_equal_bytes(world):
    a, b, c = (shard(r) for r in world[0])
    for state in (a, b, c):
        assert decode(encode(state)) == state
    left, right = joined(a, b, c), joined(c, a, b)
    assert encode(left) == encode(right)


@PROPERTY
@given(worlds)
def test_dump_and_load_give_the_same_roster(world):
    rosters, _ = world
    for roster in rosters:
        again = Roster.load(ReplicaId.fresh("restarted"), roster.dump())
        assert again == roster
        assert again.digest(SHARD) == roster.digest(SHARD)
        for agent_id in AGENTS:
            assert again.status(agent_id) == roster.status(agent_id)


@PROPERTY
@given(st.binary(max_size=300))
def test_decoding_junk_raises_a_roster_format_error(data):
    try:
        state = decode(data)
    except RosterFormatError as exc:
        assert "roster" in str(exc)
    else:
        assert isinstance(state, ShardState)


@PROPERTY
@given(worlds, st.data())
def test_decoding_a_damaged_encoding_raises_a_roster_format_error_or_gives_a_valid_state(world, data):
    encoded = bytearray(encode(shard(world[0][0])))
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] = data.draw(st.integers(0, 255))
    try:
        state = decode(bytes(encoded))
    except RosterFormatError:
        return
    # Whatever decodes must satisfy the join invariant: every token's dot is in the context.
    for value in state.entries.values():
        for token in value if type(value) is tuple else (value,):
            assert state.ctx.has(token.dot)


def _wire(state: ShardState) -> list:
    return msgpack.unpackb(encode(state)[1:], raw=False)


def _bytes(body: list) -> bytes:
    return bytes((FORMAT_VERSION,)) + msgpack.packb(body, use_bin_type=True)


def test_decode_names_what_was_expected_and_what_arrived():
    roster = Roster(ReplicaId.fresh("b1"))
    delta = roster.admit("agent-0", FPS[0])

    with pytest.raises(RosterFormatError, match="expected format version 1, got 9"):
        decode(b"\x09" + encode(delta)[1:])
    with pytest.raises(RosterFormatError, match="not valid msgpack"):
        decode(b"\x01\xc1")
    with pytest.raises(RosterFormatError, match="expected bytes, got str"):
        decode("text")  # type: ignore[arg-type]

    replicas, (shard_no, vector, cloud, entries) = _wire(delta)
    wrong_shard = (shard_no + 1) % SHARDS
    with pytest.raises(RosterFormatError, match="hashes to shard"):
        decode(_bytes([replicas, [wrong_shard, vector, cloud, entries]]))
    with pytest.raises(RosterFormatError, match="missing from the shard's causal context"):
        decode(_bytes([replicas, [shard_no, [], [], entries]]))
    with pytest.raises(RosterFormatError, match="appears twice"):
        decode(_bytes([replicas, [shard_no, vector, cloud, entries + entries]]))
    with pytest.raises(RosterFormatError, match="replica index"):
        decode(_bytes([[], [shard_no, vector, cloud, entries]]))
    with pytest.raises(RosterFormatError, match="16-byte incarnation"):
        decode(_bytes([[["b1", b"short"]], [shard_no, vector, cloud, entries]]))
    with pytest.raises(RosterFormatError, match="expected a token"):
        decode(_bytes([replicas, [shard_no, vector, cloud, [entries[0], [[7, 0, 1]]]]]))
    # Every roster error is a VigoError, so the CLI's error layer turns it into a message.
    assert issubclass(RosterFormatError, VigoError) and issubclass(RosterFormatError, ValueError)


# --- Semantics: remove-wins ----------------------------------------------------------------------------


def three() -> tuple[Roster, Roster, Roster]:
    return tuple(Roster(ReplicaId.fresh(name)) for name in ("b1", "b2", "b3"))  # type: ignore[return-value]


def test_a_revoke_beats_a_concurrent_admit():
    b1, b2, _ = three()
    b1.join(b2.admit("host", FPS[0]))
    # b1 revokes what it saw; b2 concurrently re-admits with a new certificate.
    revoke = b1.revoke("host")
    readmit = b2.admit("host", FPS[1])
    b1.join(readmit)
    b2.join(revoke)
    assert b1.status("host").state is State.REVOKED
    assert b2.status("host").state is State.REVOKED
    assert b1.status("host").fingerprints == (FPS[1],)


def test_an_admit_that_has_seen_the_revoke_wins():
    b1, b2, b3 = three()
    b2.join(b1.admit("host", FPS[0]))
    revoke = b2.revoke("host")
    b1.join(revoke)
    readmit = b1.admit("host", FPS[1])
    for roster in (b2, b3):
        roster.join(readmit)
    # b3 gets the revoke after the admit that overrode it: the order of arrival is irrelevant.
    b3.join(revoke)
    for roster in (b1, b2, b3):
        status = roster.status("host")
        assert status.state is State.ADMITTED and status.fingerprint == FPS[1]


def test_a_lagging_bolts_revoke_defeats_admits_it_never_saw():
    b1, b2, _ = three()
    b2.admit("host", FPS[0])
    stale_revoke = b1.revoke("host", "compromised")  # b1 never saw the admission
    b2.join(stale_revoke)
    status = b2.status("host")
    assert status.state is State.REVOKED
    assert [t.detail for t in status.tokens if t.kind == "revoke"] == ["compromised"]


def test_a_later_timestamp_does_not_win():
    """A bolt with a clock an hour fast still loses against a revoke it did not see."""
    fast = Roster(ReplicaId.fresh("fast"), wall=lambda: 1_700_003_600.0)
    slow = Roster(ReplicaId.fresh("slow"), wall=lambda: 1_700_000_000.0)
    slow.join(fast.admit("host", FPS[0]))
    revoke = slow.revoke("host")
    late_admit = fast.admit("host", FPS[1])  # concurrent with the revoke, much later HLC
    fast.join(revoke)
    slow.join(late_admit)
    assert fast.status("host").state is State.REVOKED
    assert slow.status("host").state is State.REVOKED
    # The far-ahead HLC did not drag the slow bolt's clock an hour forward.
    assert slow.clock.rejected >= 1


def test_concurrent_admits_with_different_fingerprints_conflict_until_one_supersedes():
    b1, b2, _ = three()
    a1, a2 = b1.admit("host", FPS[0]), b2.admit("host", FPS[1])
    b1.join(a2)
    b2.join(a1)
    assert b1.status("host").state is State.CONFLICT
    assert b1.status("host").fingerprints == tuple(FPS)
    b2.join(b1.admit("host", FPS[1]))
    assert b2.status("host").state is State.ADMITTED


def test_concurrent_admits_with_one_fingerprint_are_admitted():
    b1, b2, _ = three()
    b1.join(b2.admit("host", FPS[0]))
    b2.join(b1.admit("host", FPS[0]))
    assert b1.status("host").admitted and b2.status("host").admitted


def test_forget_is_refused_while_revoked_and_leaves_only_context_behind():
    b1, b2, _ = three()
    b1.revoke("host")
    with pytest.raises(RosterRefusedError, match="cannot forget agent 'host': it is revoked"):
        b1.forget("host")
    b2.join(b1.admit("host", FPS[0]))
    delta = b2.forget("host")
    assert not delta.entries and delta.ctx
    b1.join(delta)
    assert b1.status("host").state is State.UNKNOWN
    # The forgotten admission, arriving late (duplicated), does not come back.
    b1.join(b2.shards[shard_of("host")])
    assert b1.status("host").state is State.UNKNOWN and len(b1) == 0


def test_forgetting_an_unknown_agent_gives_an_empty_delta():
    (b1, _, _) = three()
    delta = b1.forget("nobody")
    assert not delta
    assert b1.take_unsaved() == []


def test_out_of_order_deltas_wait_in_the_cloud_and_fold_into_the_vector():
    b1, b2, _ = three()
    first, second = b1.admit("agent-0", FPS[0]), b1.admit("agent-764", FPS[0])
    b2.join(second)
    ctx = b2.shards[SHARD].ctx
    assert ctx.cloud and not ctx.vector
    b2.join(first)
    assert not ctx.cloud and list(ctx.vector.values()) == [2]
    assert b2.shards[SHARD] == b1.shards[SHARD]


def test_counters_are_per_incarnation_and_shard():
    b1 = Roster(ReplicaId.fresh("b1"))
    d1, d2, d3 = b1.admit("agent-0", FPS[0]), b1.admit("agent-1", FPS[0]), b1.admit("agent-764", FPS[0])
    counters = [dot_counter(d.entries[a].dot) for d, a in ((d1, "agent-0"), (d2, "agent-1"), (d3, "agent-764"))]
    assert counters == [1, 1, 2]
    restarted = Roster.load(ReplicaId.fresh("b1"), b1.dump())
    d4 = restarted.admit("agent-869", FPS[0])
    token = d4.entries["agent-869"]
    assert dot_replica(token.dot) == restarted.replica != b1.replica
    assert dot_counter(token.dot) == 1


# --- Sizes, hash, clock, arguments -------------------------------------------------------------------


def test_one_admission_delta_encodes_in_at_most_200_bytes():
    roster = Roster(ReplicaId.fresh("bolt-eu-west-3"))
    fingerprint = hashlib.sha256(b"cert").hexdigest()
    delta = roster.admit("web-0042.eu-west-3.example.com", fingerprint, not_after=1_800_000_000, method="token")
    assert len(encode(delta)) <= 200
    # Re-admitting carries the observed dot too, still small.
    assert len(encode(roster.admit("web-0042.eu-west-3.example.com", fingerprint))) <= 200


@pytest.mark.parametrize("fingerprint", ["0f" * 32, "SHA256:" + "ab" * 32, "AB" * 32, "x"])
def test_fingerprints_of_any_form_round_trip(fingerprint):
    roster = Roster(ReplicaId.fresh("b1"))
    delta = roster.admit("host", fingerprint)
    assert decode(encode(delta)).entries["host"].fingerprint_text == fingerprint
    assert roster.status("host").fingerprint == fingerprint
    # A SHA-256 in vigo's form (64 lowercase hex digits) travels as its 32 bytes.
    assert (b"\x0f" * 32 in encode(delta)) == (fingerprint == "0f" * 32)
    assert (fingerprint.encode() in encode(delta)) == (fingerprint != "0f" * 32)


def test_the_shard_hash_is_fixed():
    """The shard hash is part of the wire format: these values must never change."""
    assert shard_of("host-1") == 31
    assert shard_of("web-01.example.com") == 43
    assert hashlib.blake2b(b"host-1", digest_size=8, key=b"vigo.roster.shard.v1").digest()
    spread = [shard_of(f"host-{i}") for i in range(25_600)]
    assert min(spread.count(s) for s in range(SHARDS)) > 50


def test_the_hlc_moves_forward_and_ignores_remote_values_too_far_ahead():
    wall = [1_700_000_000.0]
    clock = HybridClock(lambda: wall[0], max_offset_s=0.5)
    a, b = clock.now(), clock.now()
    assert b > a
    ahead = ((int(wall[0] * 1000) + 400) << 16)
    assert clock.observe(ahead) and clock.now() > ahead
    too_far = ((int(wall[0] * 1000) + 5_000) << 16)
    assert not clock.observe(too_far) and clock.rejected == 1
    assert clock.now() < too_far


@pytest.mark.parametrize("bad", ["", "x" * 256, None, 42])
def test_bad_agent_ids_are_refused(bad):
    roster = Roster(ReplicaId.fresh("b1"))
    with pytest.raises(RosterFormatError, match=r"agent id of 1\.\.255 bytes"):
        roster.admit(bad, FPS[0])  # type: ignore[arg-type]


def test_bad_admission_fields_are_refused():
    roster = Roster(ReplicaId.fresh("b1"))
    with pytest.raises(RosterFormatError, match="fingerprint"):
        roster.admit("host", "")
    with pytest.raises(RosterFormatError, match="not_after"):
        roster.admit("host", FPS[0], not_after=-1)
    with pytest.raises(RosterError, match="bolt name"):
        ReplicaId.fresh("")


def test_take_unsaved_lists_changed_shards_once():
    roster = Roster(ReplicaId.fresh("b1"))
    roster.admit("agent-0", FPS[0])
    roster.admit("agent-1", FPS[0])
    assert roster.take_unsaved() == sorted({SHARD, shard_of("agent-1")})
    assert roster.take_unsaved() == []
    assert set(roster.dump()) == {SHARD, shard_of("agent-1")}


def test_load_refuses_a_shard_stored_under_the_wrong_key():
    roster = Roster(ReplicaId.fresh("b1"))
    roster.admit("agent-0", FPS[0])
    data = roster.dump()[SHARD]
    with pytest.raises(RosterFormatError, match=f"cannot load shard 7: its bytes hold shard {SHARD}"):
        Roster.load(ReplicaId.fresh("b1"), {7: data})


def test_curated_exports_exist():
    for name in vigo.roster.__all__:
        assert hasattr(vigo.roster, name), name
    assert "Replica" in vigo.roster.__all__ and "Ownership" in vigo.roster.__all__
