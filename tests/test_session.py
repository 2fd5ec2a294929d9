"""Unit and model tests for imkit.session: ServerSession and ClientSession one by one."""

from __future__ import annotations

import doctest
import random
from collections.abc import Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import imkit.session._client
from imkit.errors import AuthError, CapacityError, ConfigError, LocalProtocolError
from imkit.policy import ExponentialBackoff, HeartbeatPolicy
from imkit.protocol import (
    Error,
    ErrorCode,
    Kick,
    Login,
    LoginAck,
    Message,
    Notify,
    Ping,
    Pong,
    Push,
    PushAck,
    PushBatch,
    Receipt,
    Send,
    SendAck,
    SyncPage,
    SyncRequest,
    SyncResponse,
)
from imkit.session import (
    CLIENT_TRANSITIONS,
    SERVER_TRANSITIONS,
    ClientConfig,
    ClientSession,
    ClientState,
    ClientTrigger,
    CloseConnection,
    ConnectionDead,
    Kicked,
    MessageReceived,
    Output,
    PushAcked,
    ReceiptPosted,
    ReceiptReceived,
    SendAcked,
    SendFailed,
    SendRequested,
    ServerConfig,
    ServerError,
    ServerSession,
    ServerState,
    ServerTimer,
    SessionEvent,
    SessionStarted,
    SyncRequested,
    initial_cid,
)
from imkit.session._state import client_next, server_next
from imkit.timingwheel import TimingWheel
from tests.strategies import client_messages, server_messages

T = TypeVar("T")


def authenticate(token: str, device: str) -> str:
    """Tokens are "tok-<uid>"; anything else is refused."""
    if not token.startswith("tok-"):
        raise AuthError("bad token")
    return token[4:]


def only(outs: Sequence[Output], cls: type[T]) -> list[T]:
    """The outputs of one class."""
    return [o for o in outs if isinstance(o, cls)]


def frames(outs: Sequence[Output]) -> list[Message]:
    """The wire messages among the outputs."""
    return [o for o in outs if not isinstance(o, SessionEvent)]


class Server:
    """A ServerSession on its own wheel, with a clock that the test moves."""

    def __init__(self, config: ServerConfig | None = None, **kwargs: Any) -> None:
        self.now = 0
        self.wheel: TimingWheel[ServerTimer] = TimingWheel(tick_ms=1)
        self.session = ServerSession(
            wheel=self.wheel,
            authenticate=authenticate,
            session_id="s1",
            now_ms=0,
            config=config,
            **kwargs,
        )

    def login(self, uid: str = "alice") -> list[Output]:
        return self.recv(Login(token=f"tok-{uid}", device="phone"))

    def recv(self, m: Message, dt: int = 0) -> list[Output]:
        self.now += dt
        out = self.session.receive(m, self.now)
        self.session._check()
        return out

    def advance(self, dt: int) -> list[Output]:
        """Move the clock and fire timers, as a gateway's wheel driver does."""
        self.now += dt
        out: list[Output] = []
        for item in self.wheel.advance(self.now):
            out += item.session.on_timer(item, self.now)
        self.session._check()
        return out


def push(conv: str, seq: int) -> Push:
    return Push(conv=conv, seq=seq, sender="bob", body=f"{conv}:{seq}".encode())


# --- states -----------------------------------------------------------------------


class TestStateTables:
    def test_every_client_trigger_from_every_state(self) -> None:
        """client_next answers the table or raises LocalProtocolError, nothing else."""
        for state in ClientState:
            for trigger in ClientTrigger:
                if (state, trigger) in CLIENT_TRANSITIONS:
                    assert client_next(state, trigger) is CLIENT_TRANSITIONS[state, trigger]
                else:
                    with pytest.raises(LocalProtocolError):
                        client_next(state, trigger)

    def test_closed_states_are_terminal(self) -> None:
        """Nothing leaves CLOSED, on either side."""
        assert all(n is ClientState.CLOSED for (s, _), n in CLIENT_TRANSITIONS.items()
                   if s is ClientState.CLOSED)
        assert all(n is ServerState.CLOSED for (s, _), n in SERVER_TRANSITIONS.items()
                   if s is ServerState.CLOSED)
        with pytest.raises(LocalProtocolError):
            server_next(ServerState.CLOSED, next(iter(SERVER_TRANSITIONS))[1])


# --- server: login and identity ---------------------------------------------------


class TestServerLogin:
    def test_login_binds_identity(self) -> None:
        """A good token yields LoginAck + SessionStarted with the uid from authenticate()."""
        s = Server()
        out = s.login("alice")
        ack = only(out, LoginAck)[0]
        assert (ack.uid, ack.session, ack.resumed) == ("alice", "s1", False)
        assert only(out, SessionStarted) == [
            SessionStarted(uid="alice", device="phone", session="s1", resumed=False)
        ]
        assert s.session.state is ServerState.ACTIVE

    @pytest.mark.parametrize(
        "frame",
        [
            Send(cid=1, conv="c", body=b"x"),
            Ping(),
            PushAck(conv="c", seq=1),
            SyncRequest(req_id=1),
            Receipt(conv="c", seq=1),
        ],
    )
    def test_frames_before_login_kick(self, frame: Message) -> None:
        """Any frame before Login ends the session with Kick(NOT_LOGGED_IN) and a close."""
        s = Server()
        out = s.recv(frame)
        assert only(out, Kick)[0].code == ErrorCode.NOT_LOGGED_IN
        assert only(out, CloseConnection)[0].code == ErrorCode.NOT_LOGGED_IN
        assert not only(out, SendRequested)
        assert s.session.state is ServerState.CLOSED

    def test_bad_token(self) -> None:
        """A token authenticate() refuses is kicked with AUTH_FAILED, without details."""
        s = Server()
        out = s.recv(Login(token="forged", device="phone"))
        kick = only(out, Kick)[0]
        assert kick.code == ErrorCode.AUTH_FAILED
        assert "forged" not in kick.reason
        assert s.session.stats.auth_failures == 1
        assert s.session.state is ServerState.CLOSED

    def test_login_never_sent(self) -> None:
        """A connection that says nothing is kicked at the login deadline."""
        s = Server(ServerConfig(login_timeout_ms=100))
        assert s.advance(99) == []
        out = s.advance(1)
        assert only(out, Kick)[0].code == ErrorCode.NOT_LOGGED_IN
        assert s.session.stats.login_timeouts == 1
        assert len(s.wheel) == 0

    def test_identity_comes_from_the_session(self) -> None:
        """Receipt.reader and SendRequested.uid are the session's uid, whatever the frame says."""
        s = Server()
        s.login("alice")
        posted = only(s.recv(Receipt(conv="c", seq=3, reader="mallory")), ReceiptPosted)
        assert posted == [ReceiptPosted(receipt=Receipt(conv="c", seq=3, reader="alice"))]
        req = only(s.recv(Send(cid=1, conv="c", body=b"x")), SendRequested)[0]
        assert (req.uid, req.device) == ("alice", "phone")

    @pytest.mark.parametrize(
        "frame",
        [
            Login(token="tok-alice", device="phone"),
            Push(conv="c", seq=1, sender="x", body=b""),
            SendAck(cid=1, conv="c"),
            Kick(code=1),
        ],
    )
    def test_frames_the_client_may_not_send(self, frame: Message) -> None:
        """A second Login or a server-only frame is a protocol error: Kick and close."""
        s = Server()
        s.login()
        out = s.recv(frame)
        assert only(out, Kick)[0].code == ErrorCode.PROTOCOL_ERROR
        assert s.session.stats.protocol_errors == 1

    def test_frames_after_close_are_counted(self) -> None:
        """After the session closed, frames are ignored and counted."""
        s = Server()
        s.login()
        s.session.connection_lost(s.now)
        assert s.recv(Send(cid=1, conv="c", body=b"x")) == []
        assert s.session.stats.frames_after_close == 1

    def test_resume_adopts_dedup_state(self) -> None:
        """A resumed session answers a cid acked before the reconnect from memory."""
        old = Server()
        old.login()
        old.recv(Send(cid=7, conv="c", body=b"x"))
        ack = old.session.ack_send(7, 42)[0]
        old.session.connection_lost(old.now)
        new = Server(resume=lambda uid, device, rid: old.session if rid == "s1" else None)
        out = new.recv(Login(token="tok-alice", device="phone", resume="s1"))
        assert only(out, LoginAck)[0].resumed
        assert new.session.session_id == "s1"
        assert new.recv(Send(cid=7, conv="c", body=b"x")) == [ack]

    def test_resume_of_another_user_is_refused(self) -> None:
        """A resume id of another uid is not adopted."""
        old = Server()
        old.login("bob")
        old.session.connection_lost(0)
        new = Server(resume=lambda uid, device, rid: old.session)
        out = new.recv(Login(token="tok-alice", device="phone", resume="s1"))
        assert not only(out, LoginAck)[0].resumed


# --- server: upstream -------------------------------------------------------------


class TestServerUpstream:
    def test_new_cid_requested_once(self) -> None:
        """A new cid becomes SendRequested; a resend while pending produces nothing."""
        s = Server()
        s.login()
        send = Send(cid=5, conv="c", body=b"hi", client_ms=9)
        req = only(s.recv(send), SendRequested)[0]
        assert (req.cid, req.conv, req.body, req.client_ms, req.repeat) == (5, "c", b"hi", 9, False)
        assert s.recv(send) == []
        assert s.session.sends_in_flight == 1

    def test_resend_after_ack_gets_same_ack(self) -> None:
        """A resent cid is answered with the original seq and nothing new is requested."""
        s = Server()
        s.login()
        s.recv(Send(cid=5, conv="c", body=b"hi"))
        ack = s.session.ack_send(5, 17, msg_id=3, wall_ms=4)
        assert ack == [SendAck(cid=5, conv="c", seq=17, msg_id=3, server_ms=4)]
        assert s.recv(Send(cid=5, conv="c", body=b"hi")) == ack
        assert s.session.stats.duplicate_sends == 1

    def test_forgotten_ack_asks_the_store_again(self) -> None:
        """A duplicate cid whose ack left the cache is requested again with repeat=True."""
        s = Server(ServerConfig(ack_cache=1))
        s.login()
        for cid in (1, 2):
            s.recv(Send(cid=cid, conv="c", body=b"x"))
            s.session.ack_send(cid, cid)
        req = only(s.recv(Send(cid=1, conv="c", body=b"x")), SendRequested)[0]
        assert req.repeat

    def test_a_cid_reused_for_another_conversation_is_refused(self) -> None:
        """A cid resent for a different conv gets BAD_REQUEST for that conv, never the first ack."""
        s = Server()
        s.login()
        s.recv(Send(cid=5, conv="c", body=b"hi"))
        # while the first is pending ...
        out = s.recv(Send(cid=5, conv="d", body=b"other"))
        assert out == [SendAck(cid=5, conv="d", error=ErrorCode.BAD_REQUEST)]
        assert s.session.ack_send(5, 17) == [SendAck(cid=5, conv="c", seq=17)]
        # ... and once it is answered (from the ack cache)
        out = s.recv(Send(cid=5, conv="d", body=b"other"))
        assert out == [SendAck(cid=5, conv="d", error=ErrorCode.BAD_REQUEST)]
        assert s.recv(Send(cid=5, conv="c", body=b"hi")) == [SendAck(cid=5, conv="c", seq=17)]
        assert s.session.stats.cid_conflicts == 2

    def test_stale_cid(self) -> None:
        """A cid older than the window gets SendAck(error=BAD_REQUEST) and is not requested."""
        s = Server(ServerConfig(cid_window=4))
        s.login()
        s.recv(Send(cid=100, conv="c", body=b"x"))
        out = s.recv(Send(cid=90, conv="c", body=b"old"))
        assert out == [SendAck(cid=90, conv="c", error=ErrorCode.BAD_REQUEST)]
        assert s.session.stats.stale_sends == 1

    def test_cid_zero_is_refused(self) -> None:
        """cid 0 (valid on the wire, never allocated) is refused like a stale cid."""
        s = Server()
        s.login()
        assert only(s.recv(Send(cid=0, conv="c", body=b"x")), SendAck)[0].error != 0

    def test_permanent_failure_is_remembered(self) -> None:
        """fail_send(NOT_MEMBER) answers the resend too; a transient failure asks again."""
        s = Server()
        s.login()
        s.recv(Send(cid=1, conv="c", body=b"x"))
        fail = s.session.fail_send(1, ErrorCode.NOT_MEMBER)
        assert s.recv(Send(cid=1, conv="c", body=b"x")) == fail
        s.recv(Send(cid=2, conv="c", body=b"x"))
        s.session.fail_send(2, ErrorCode.INTERNAL)
        assert only(s.recv(Send(cid=2, conv="c", body=b"x")), SendRequested)

    def test_answers_for_unknown_cids_are_refused(self) -> None:
        """ack_send / fail_send of a cid nobody asked for is an API misuse."""
        s = Server()
        s.login()
        with pytest.raises(LocalProtocolError):
            s.session.ack_send(9, 1)
        with pytest.raises(ConfigError):
            s.session.fail_send(9, ErrorCode.OK)

    def test_answers_after_close_are_dropped(self) -> None:
        """The application may answer a session that closed meanwhile: nothing is output."""
        s = Server()
        s.login()
        s.recv(Send(cid=1, conv="c", body=b"x"))
        s.recv(SyncRequest(req_id=1))
        s.session.kick(ErrorCode.SHUTDOWN)
        assert s.session.ack_send(1, 1) == []
        assert s.session.sync_response(1, []) == []

    def test_sync_requests(self) -> None:
        """SyncRequested carries the request with limit clamped; answers go out once."""
        s = Server(ServerConfig(max_sync_limit=50))
        s.login()
        req = only(s.recv(SyncRequest(req_id=4, after=(("c", 3),), limit=10_000)), SyncRequested)
        assert req == [
            SyncRequested(uid="alice", device="phone", req_id=4, after=(("c", 3),), limit=50)
        ]
        page = SyncPage(conv="c", messages=(push("c", 4),))
        assert s.session.sync_response(4, [page]) == [SyncResponse(req_id=4, pages=(page,))]
        with pytest.raises(LocalProtocolError):
            s.session.sync_response(4, [])


# --- server: quotas ---------------------------------------------------------------


class TestServerQuotas:
    def test_sends_in_flight(self) -> None:
        """Over max_sends_in_flight a send is refused with QUOTA_EXCEEDED and retry_after_ms."""
        s = Server(ServerConfig(max_sends_in_flight=2, quota_retry_ms=700))
        s.login()
        s.recv(Send(cid=1, conv="c", body=b"x"))
        s.recv(Send(cid=2, conv="c", body=b"x"))
        out = s.recv(Send(cid=3, conv="c", body=b"x"))
        assert out == [Error(code=ErrorCode.QUOTA_EXCEEDED, reason="too many sends in flight",
                             retry_after_ms=700)]
        s.session.ack_send(1, 1)
        # the refused cid was not recorded: the client's retry is a NEW send
        assert only(s.recv(Send(cid=3, conv="c", body=b"x"), dt=700), SendRequested)

    def test_syncs_in_flight(self) -> None:
        """Over max_syncs_in_flight a sync is refused with QUOTA_EXCEEDED."""
        s = Server(ServerConfig(max_syncs_in_flight=1))
        s.login()
        s.recv(SyncRequest(req_id=1))
        out = s.recv(SyncRequest(req_id=2))
        assert only(out, Error)[0].code == ErrorCode.QUOTA_EXCEEDED

    def test_rate_limit_then_kick(self) -> None:
        """A flood is refused with one RATE_LIMITED error per back-off, then kicked."""
        s = Server(ServerConfig(max_frames_per_s=10, frame_burst=5, max_violations=20))
        s.login()
        outs = [s.recv(Ping(nonce=i)) for i in range(5 + 20)]
        assert all(only(o, Pong) for o in outs[:5])
        errors = [e for o in outs[5:] for e in only(o, Error)]
        assert len(errors) == 1
        assert errors[0].code == ErrorCode.RATE_LIMITED and errors[0].retry_after_ms == 100
        out = s.recv(Ping())
        assert only(out, Kick)[0].code == ErrorCode.RATE_LIMITED
        assert s.session.stats.abuse_kicks == 1

    def test_burst_that_backs_off_is_not_kicked(self) -> None:
        """A client that slows down when told is served again and never kicked."""
        s = Server(ServerConfig(max_frames_per_s=10, frame_burst=5, max_violations=3))
        s.login()
        for _ in range(3):
            for _ in range(6):
                s.recv(Ping())
            s.now += 20_000  # quiet for longer than the violation window
        assert s.session.state is ServerState.ACTIVE
        assert only(s.recv(Ping()), Pong)


# --- server: downstream -----------------------------------------------------------


RETRY = ExponentialBackoff(base_ms=100, cap_ms=400, max_attempts=2)


class TestServerDownstream:
    def test_push_then_cumulative_ack(self) -> None:
        """Pushes are tracked until a cumulative ack covers them."""
        s = Server()
        s.login()
        assert s.session.push([push("c", 1), push("c", 2)], 0) == [
            PushBatch(pushes=(push("c", 1), push("c", 2)))
        ]
        assert s.session.push(push("c", 3), 0) == [push("c", 3)]
        s.recv(PushAck(conv="c", seq=2))
        assert s.session.tracked_pushes == 1
        s.recv(PushAck(conv="c", seq=3, cumulative=False))
        assert s.session.tracked_pushes == 0
        assert len(s.wheel) == 1  # only the heartbeat deadline is left

    def test_genuine_ack_emits_push_acked(self) -> None:
        """An ack that releases tracked pushes yields PushAcked(conv, seq, cumulative)."""
        s = Server()
        s.login()
        s.session.push([push("c", 1), push("c", 2), push("c", 3), push("c", 5)], 0)
        assert s.recv(PushAck(conv="c", seq=2)) == [PushAcked(conv="c", seq=2)]
        assert s.recv(PushAck(conv="c", seq=5, cumulative=False)) == [
            PushAcked(conv="c", seq=5, cumulative=False)
        ]
        # cumulative through 4: releases 3 (4 was never pushed, 5 is already acked)
        assert s.recv(PushAck(conv="c", seq=4)) == [PushAcked(conv="c", seq=4)]
        assert s.session.tracked_pushes == 0
        assert s.session.stats.acks_ignored == 0

    def test_ack_never_sent_or_far_ahead_is_ignored(self) -> None:
        """Acks for unknown convs, unsent seqs or seqs beyond the highest push change nothing."""
        s = Server()
        s.login()
        s.session.push([push("c", 5), push("c", 6)], 0)
        for ack in (
            PushAck(conv="other", seq=5),
            PushAck(conv="c", seq=7),  # far ahead: would ack 5 and 6 if believed
            PushAck(conv="c", seq=10**9),  # far ahead: a forged device cursor
            PushAck(conv="c", seq=4),  # below everything tracked
            PushAck(conv="c", seq=9, cumulative=False),
        ):
            assert s.recv(ack) == []  # no PushAcked: nothing was accepted
        assert s.session.tracked_pushes == 2
        assert s.session.stats.acks_ignored == 5

    def test_repeated_or_abandoned_acks_emit_nothing(self) -> None:
        """An ack of pushes already acked, or given up to sync, emits no PushAcked."""
        s = Server(ServerConfig(push_retry=RETRY))
        s.login()
        s.session.push([push("c", 1), push("c", 2)], 0)
        assert s.recv(PushAck(conv="c", seq=1)) == [PushAcked(conv="c", seq=1)]
        assert s.recv(PushAck(conv="c", seq=1)) == []  # a duplicate of the same ack
        for dt in (100, 200, 400):  # seq 2: retried twice, then given up with a Notify
            s.advance(dt)
        assert s.session.tracked_pushes == 0
        assert s.recv(PushAck(conv="c", seq=2)) == []
        assert s.session.stats.acks_ignored == 2

    def test_retries_then_left_to_sync(self) -> None:
        """Unacked pushes are resent on the retry schedule, then dropped with a Notify."""
        s = Server(ServerConfig(push_retry=RETRY))
        s.login()
        s.session.push([push("c", 1), push("c", 2)], 0)
        s.recv(PushAck(conv="c", seq=1, cumulative=False))
        assert s.advance(99) == []
        assert s.advance(1) == [push("c", 2)]  # first retry at 100
        assert s.advance(200) == [push("c", 2)]  # second at 100 + 200
        out = s.advance(400)  # retries exhausted
        assert out == [Notify(entries=(("c", 2),))]
        assert s.session.tracked_pushes == 0
        assert s.session.stats.pushes_abandoned == 1
        assert s.session.stats.pushes_retried == 2

    def test_a_client_that_acks_nothing_is_cut_at_give_up(self) -> None:
        """No ack during a push's whole retry schedule: kicked SLOW_CONSUMER, not notified."""
        s = Server(ServerConfig(push_retry=RETRY))
        s.login()
        s.session.push(push("c", 1), 0)
        assert s.session.config.push_give_up_ms == 700  # 100 + 200 + 400
        s.advance(100)
        s.advance(200)
        out = s.advance(400)
        kicks = only(out, Kick)
        assert [k.code for k in kicks] == [ErrorCode.SLOW_CONSUMER]
        assert not only(out, Notify)
        assert s.session.state is ServerState.CLOSED
        assert s.session.stats.unresponsive_kicks == 1

    def test_an_ack_after_the_first_send_keeps_the_client(self) -> None:
        """A client that acked something since the push went out is notified, not cut."""
        s = Server(ServerConfig(push_retry=RETRY))
        s.login()
        s.session.push(push("c", 1), 0)
        s.advance(50)
        s.session.push(push("d", 1), s.now)
        s.recv(PushAck(conv="d", seq=1))  # reads, but lost the ack of c:1
        s.advance(50)
        s.advance(200)
        out = s.advance(400)
        assert out == [Notify(entries=(("c", 1),))]
        assert s.session.stats.unresponsive_kicks == 0

    def test_kick_unresponsive_can_be_turned_off(self) -> None:
        """With kick_unresponsive=False an unresponsive client only gets the Notify."""
        s = Server(ServerConfig(push_retry=RETRY, kick_unresponsive=False))
        s.login()
        s.session.push(push("c", 1), 0)
        for dt in (100, 200, 400):
            out = s.advance(dt)
        assert out == [Notify(entries=(("c", 1),))]

    def test_tracked_push_not_resent(self) -> None:
        """A push already tracked is not sent again by push()."""
        s = Server()
        s.login()
        s.session.push(push("c", 1), 0)
        assert s.session.push(push("c", 1), 0) == []
        assert s.session.stats.pushes_duplicate == 1

    def test_slow_consumer(self) -> None:
        """More unacked pushes than max_tracked_pushes kicks the client (it resyncs later)."""
        s = Server(ServerConfig(max_tracked_pushes=3))
        s.login()
        s.session.push([push("c", 1), push("c", 2), push("c", 3)], 0)
        out = s.session.push(push("c", 4), 0)
        assert only(out, Kick)[0].code == ErrorCode.SLOW_CONSUMER
        assert not only(out, Push)
        s.session._check()

    def test_push_lifecycle_errors(self) -> None:
        """push() before login is a misuse; after close it sends nothing."""
        s = Server()
        with pytest.raises(LocalProtocolError):
            s.session.push(push("c", 1), 0)
        s.login()
        s.session.connection_lost(0)
        assert s.session.push(push("c", 1), 0) == []
        assert len(s.wheel) == 0


class TestServerHeartbeat:
    def test_silence_is_death(self) -> None:
        """No frame for the heartbeat deadline: Kick(HEARTBEAT_TIMEOUT) and close."""
        hb = HeartbeatPolicy(interval_ms=100, missed=3)
        s = Server(ServerConfig(heartbeat=hb))
        assert only(s.login(), LoginAck)[0].heartbeat_ms == 100
        assert s.advance(299) == []
        out = s.advance(1)
        assert only(out, Kick)[0].code == ErrorCode.HEARTBEAT_TIMEOUT
        assert s.session.stats.heartbeat_timeouts == 1

    def test_any_frame_keeps_it_alive(self) -> None:
        """Pings (or any frame) push the deadline forward; the timer re-arms lazily."""
        hb = HeartbeatPolicy(interval_ms=100, missed=3)
        s = Server(ServerConfig(heartbeat=hb))
        s.login()
        for _ in range(10):
            assert s.recv(Ping(nonce=1), dt=250) == [Pong(nonce=1, server_ms=s.now)]
            assert s.advance(0) == []
        assert only(s.advance(300), Kick)


class TestServerTimers:
    def test_foreign_timer_item(self) -> None:
        """on_timer refuses an item of another session."""
        a, b = Server(), Server()
        item = a.wheel.advance(10**9)[0]
        with pytest.raises(LocalProtocolError):
            b.session.on_timer(item, 10**9)


class TestPushTimeout:
    """The first push timeout follows each link's measured ack time (RFC 6298, Karn)."""

    def test_the_estimate_follows_rfc_6298(self) -> None:
        """SRTT/RTTVAR gains 1/8 and 1/4, RTO = SRTT + 4 RTTVAR, floor at the first delay."""
        s = Server(ServerConfig(push_retry=RETRY))  # first delay 100 ms
        s.login()
        seen = []
        for seq, ack_after in enumerate((80, 80, 20), start=1):
            s.session.push(push("c", seq), s.now)
            s.recv(PushAck(conv="c", seq=seq), dt=ack_after)
            seen.append(s.session.push_timeout_ms)
        # 80: srtt 80, var 40 -> 240; 80: var 40 + (0 - 40) // 4 = 30, srtt 80 -> 200;
        # 20: var 30 + (60 - 30) // 4 = 37, srtt 80 + (20 - 80) // 8 = 72 -> 72 + 148 = 220
        assert seen == [240, 200, 220]

    def test_a_slow_but_live_link_gets_no_spurious_resends(self) -> None:
        """Acks at 2.9 s, then one at 4.5 s: with a fixed 3 s timeout that push goes twice."""
        s = Server()  # the default schedule: first retry after 3 s
        s.login()
        for seq in range(1, 6):
            s.session.push(push("c", seq), s.now)
            assert s.advance(2_900) == []
            s.recv(PushAck(conv="c", seq=seq))
        s.session.push(push("c", 6), s.now)
        # 2.9 s five times: SRTT 2,900 ms, RTTVAR 458 ms -> a 4,732 ms timeout
        assert s.advance(4_500) == []  # no resend: this link's timeout grew past 4.5 s
        s.recv(PushAck(conv="c", seq=6))
        assert s.session.stats.pushes_retried == 0
        assert s.session.push_timeout_ms > 4_500

    def test_a_retransmitted_flight_gives_no_sample(self) -> None:
        """Karn's rule: an ack after a resend is ignored; the timeout itself backed off."""
        s = Server(ServerConfig(push_retry=RETRY))
        s.login()
        s.session.push(push("c", 1), s.now)
        assert only(s.advance(100), Push)  # resent at the first timeout ...
        assert s.session.push_timeout_ms == 200  # ... which doubles it (RFC 6298 5.5)
        s.recv(PushAck(conv="c", seq=1), dt=10)
        assert s.session.push_timeout_ms == 200  # a 110 ms "sample" would lower it

    def test_the_timeout_is_capped(self) -> None:
        """No estimate grows past max_push_rto_ms."""
        s = Server(ServerConfig(max_push_rto_ms=5_000))
        s.login()
        s.session.push(push("c", 1), s.now)
        s.recv(PushAck(conv="c", seq=1), dt=2_999)
        assert s.session.push_timeout_ms == 5_000


class ServerTrackingMachine(RuleBasedStateMachine):
    """ServerSession push tracking against a model of tracked pushes and their timers."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Server(
            # the tracking model: abandonment always leads to a Notify here
            ServerConfig(push_retry=RETRY, max_tracked_pushes=10_000, kick_unresponsive=False,
                         heartbeat=HeartbeatPolicy(interval_ms=10**8))
        )
        self.s.login()
        self.tracked: dict[tuple[str, int], int] = {}  # (conv, seq) -> flight id
        # flight id -> [attempts, due_ms, sent_ms, its first timeout]
        self.flights: dict[int, list[int]] = {}
        self.highest: dict[str, int] = {}
        self.next_flight = 0
        # the push timeout oracle: RFC 6298 in plain arithmetic (first delay 100 ms)
        self.srtt = self.rttvar = 0
        self.rto = 100

    def sample(self, fid: int) -> None:
        """The model's RFC 6298 update when flight ``fid`` (sent once) is acked whole."""
        attempts, _, sent, _ = self.flights[fid]
        if attempts:
            return  # Karn: a retransmitted flight gives no sample
        r = self.s.now - sent
        if self.srtt == 0:
            self.srtt, self.rttvar = max(1, r), r // 2
        else:
            self.rttvar += (abs(self.srtt - r) - self.rttvar) // 4
            self.srtt = max(1, self.srtt + (r - self.srtt) // 8)
        self.rto = min(max(self.srtt + 4 * self.rttvar, 100), 30_000)

    @rule(conv=st.sampled_from("ab"), seqs=st.lists(st.integers(1, 6), min_size=1, max_size=3))
    def push(self, conv: str, seqs: list[int]) -> None:
        out = self.s.session.push([push(conv, q) for q in seqs], self.s.now)
        fresh: list[int] = []
        for q in seqs:
            if (conv, q) not in self.tracked and q not in fresh:
                fresh.append(q)
        sent = [p.seq for p in only(out, Push)]
        sent += [p.seq for f in only(out, PushBatch) for p in f.pushes]
        assert sent == fresh
        assert len(out) == (1 if fresh else 0)
        if fresh:
            fid = self.next_flight = self.next_flight + 1
            self.flights[fid] = [0, self.s.now + self.rto, self.s.now, self.rto]
            for q in fresh:
                self.tracked[(conv, q)] = fid
                self.highest[conv] = max(self.highest.get(conv, 0), q)

    @rule(conv=st.sampled_from("ab"), seq=st.integers(0, 7), cumulative=st.booleans())
    def ack(self, conv: str, seq: int, cumulative: bool) -> None:
        out = self.s.recv(PushAck(conv=conv, seq=seq, cumulative=cumulative))
        before = len(self.tracked)
        mine = [q for (c, q) in self.tracked if c == conv]
        if mine:
            acked: list[int] = []  # flight ids, in the order their pushes were released
            if cumulative:
                if seq <= self.highest[conv]:
                    acked.extend(self.tracked.pop((conv, q)) for q in mine if q <= seq)
            elif (conv, seq) in self.tracked:
                acked.append(self.tracked.pop((conv, seq)))
            for fid in dict.fromkeys(acked):
                if fid not in self.tracked.values():
                    self.sample(fid)  # its last push was acked
            if not any(c == conv for c, _ in self.tracked):
                del self.highest[conv]
        # PushAcked exactly when the ack released something the session tracked
        released = len(self.tracked) < before
        expected = [PushAcked(conv=conv, seq=seq, cumulative=cumulative)] if released else []
        assert out == expected

    @rule(dt=st.sampled_from([1, 50, 99, 100, 250, 1000]))
    def advance(self, dt: int) -> None:
        out = self.s.advance(dt)
        now = self.s.now
        resent: set[tuple[str, int]] = set()
        notified: dict[str, int] = {}
        for fid, (attempts, due, sent, rto) in sorted(self.flights.items()):
            live = [k for k, f in self.tracked.items() if f == fid]
            if due > now or not live:
                continue
            if attempts >= 2:
                for k in live:
                    del self.tracked[k]
                    notified[k[0]] = max(notified.get(k[0], 0), k[1])
            else:
                delay = min(400, 100 * 2 ** (attempts + 1)) * rto // 100
                self.flights[fid] = [attempts + 1, now + delay, sent, rto]
                self.rto = min(self.rto * 2, 30_000)  # RFC 6298 5.5: back off
                resent.update(live)
        for conv in list(self.highest):
            if not any(c == conv for c, _ in self.tracked):
                del self.highest[conv]
        got_resent = {(p.conv, p.seq) for p in only(out, Push)}
        got_resent |= {(p.conv, p.seq) for b in only(out, PushBatch) for p in b.pushes}
        got_notified: dict[str, int] = {}
        for f in only(out, Notify):
            for c, q in f.entries:
                got_notified[c] = max(got_notified.get(c, 0), q)
        assert got_resent == resent
        assert got_notified == notified

    @invariant()
    def same_tracking(self) -> None:
        assert self.s.session.tracked_pushes == len(self.tracked)
        assert self.s.session.push_timeout_ms == self.rto


TestServerTrackingMachine = ServerTrackingMachine.TestCase
TestServerTrackingMachine.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None
)


class TestServerFuzz:
    @settings(max_examples=150, deadline=None)
    @given(st.lists(client_messages, max_size=30), st.lists(st.integers(0, 5_000), max_size=30))
    def test_any_client_frames(self, msgs: list[Message], gaps: list[int]) -> None:
        """Any valid client frames after login yield only outputs, invariants hold, bounded."""
        s = Server(ServerConfig(max_sends_in_flight=4, max_syncs_in_flight=2, ack_cache=3))
        s.login()
        for i, m in enumerate(msgs):
            outs = s.recv(m, dt=gaps[i] if i < len(gaps) else 0)
            for e in only(outs, SendRequested):
                s.session.ack_send(e.cid, 1)
            for r in only(outs, SyncRequested):
                s.session.sync_response(r.req_id, [])
            s.advance(0)
        assert s.session.sends_in_flight <= 4


# --- client -----------------------------------------------------------------------


class Client:
    """A ClientSession with a clock that the test moves."""

    def __init__(self, **kwargs: Any) -> None:
        self.now = 0
        # the session's own keywords; every other one is a ClientConfig field
        own = {k: kwargs.pop(k) for k in ("first_cid", "rng", "cursor_loader") if k in kwargs}
        own.setdefault("first_cid", 100)
        own.setdefault("rng", random.Random(0))
        self.c = ClientSession(
            token="tok-alice", device="phone", now_ms=0, config=ClientConfig(**kwargs), **own
        )

    def connect(self, heartbeat_ms: int = 30_000) -> list[Output]:
        out = self.c.connection_made(self.now)
        out += self.recv(LoginAck(uid="alice", session="s9", heartbeat_ms=heartbeat_ms))
        self.c._check()
        return out

    def recv(self, m: Message, dt: int = 0) -> list[Output]:
        self.now += dt
        out = self.c.receive(m, self.now)
        self.c._check()
        return out

    def send(self, conv: str = "c", body: bytes = b"x") -> tuple[int, list[Output]]:
        r = self.c.send(conv, body, self.now)
        self.c._check()
        return r

    def advance(self, dt: int) -> list[Output]:
        self.now += dt
        out = self.c.tick(self.now)
        self.c._check()
        return out


def delivered(outs: Sequence[Output]) -> list[int]:
    return [e.push.seq for e in only(outs, MessageReceived)]


class TestClientSend:
    def test_initial_cid_doctest(self) -> None:
        """The examples of initial_cid hold and results are distinct per slot and ms."""
        r = doctest.testmod(imkit.session._client)
        assert r.failed == 0 and r.attempted > 0
        assert len({initial_cid(ms, d) for ms in range(50) for d in range(16)}) == 800
        with pytest.raises(ConfigError):
            initial_cid(-1)
        with pytest.raises(ConfigError):
            initial_cid(0, device_slot=16)

    def test_offline_sends_queue_then_go_after_login(self) -> None:
        """Sends made offline wait; connection_made sends Login, them, and an inbox sync."""
        c = Client()
        assert c.send()[1] == [] and c.send()[1] == []
        out = c.c.connection_made(0)
        assert isinstance(out[0], Login)
        assert [m.cid for m in only(out, Send)] == [100, 101]
        assert only(out, SyncRequest) == [SyncRequest(req_id=1, after=(), limit=100)]

    def test_ack_settles_once(self) -> None:
        """SendAck -> SendAcked; a second ack or one for an unknown cid is counted."""
        c = Client()
        c.connect()
        cid, out = c.send("c", b"hi")
        assert only(out, Send) == [Send(cid=cid, conv="c", body=b"hi", client_ms=0)]
        ack = SendAck(cid=cid, conv="c", seq=5, msg_id=9, server_ms=3)
        assert c.recv(ack) == [SendAcked(cid=cid, conv="c", seq=5, msg_id=9, server_ms=3)]
        assert c.recv(ack) == []
        assert c.c.stats.unknown_acks == 1

    def test_refused_send_fails(self) -> None:
        """A permanent error in SendAck ends the send with SendFailed(code)."""
        c = Client()
        c.connect()
        cid, _ = c.send()
        out = c.recv(SendAck(cid=cid, conv="c", error=ErrorCode.NOT_MEMBER))
        assert out == [SendFailed(cid=cid, conv="c", code=ErrorCode.NOT_MEMBER, attempts=1)]

    def test_retries_exhausted(self) -> None:
        """Without an answer the same cid is resent on the back-off, then SendFailed(code=0)."""
        c = Client(send_retry=ExponentialBackoff(base_ms=100, cap_ms=1000, max_attempts=2),
                   heartbeat=HeartbeatPolicy(interval_ms=10**6, jitter=0.0))
        c.connect(heartbeat_ms=10**6)
        cid, _ = c.send()
        assert c.advance(99) == []
        assert only(c.advance(1), Send) == [Send(cid=cid, conv="c", body=b"x", client_ms=0)]
        assert only(c.advance(200), Send)[0].cid == cid
        out = c.advance(400)
        assert only(out, SendFailed) == [SendFailed(cid=cid, conv="c", code=0, attempts=3)]
        assert c.c.in_flight == 0

    def test_reconnect_resends_same_cids(self) -> None:
        """After a reconnect every unacked send goes out again with its cid, retries kept."""
        c = Client()
        c.connect()
        cids = [c.send()[0] for _ in range(3)]
        c.recv(SendAck(cid=cids[1], conv="c", seq=1))
        c.c.connection_lost(c.now)
        out = c.c.connection_made(c.now)
        assert isinstance(out[0], Login) and out[0].resume == "s9"
        assert [m.cid for m in only(out, Send)] == [cids[0], cids[2]]

    def test_window_and_span(self) -> None:
        """At most max_in_flight sends fly, their cid span is bounded, the rest queue."""
        c = Client(max_in_flight=2, max_cid_span=3, max_queued=10)
        c.connect()
        outs = [c.send()[1] for _ in range(5)]
        assert [len(only(o, Send)) for o in outs] == [1, 1, 0, 0, 0]
        out = c.recv(SendAck(cid=101, conv="c", seq=2))  # 100 still flying: span 100..102
        assert [m.cid for m in only(out, Send)] == [102]
        out = c.recv(SendAck(cid=100, conv="c", seq=1))
        assert [m.cid for m in only(out, Send)] == [103]

    def test_queue_limit(self) -> None:
        """max_queued unsent messages, then CapacityError; nothing is lost."""
        c = Client(max_queued=2)
        c.send()
        c.send()
        with pytest.raises(CapacityError):
            c.send()
        assert len(c.c.unacknowledged()) == 2

    def test_rate_limited_holds_sends(self) -> None:
        """Error(RATE_LIMITED, retry_after) holds new sends and retries until it passes."""
        c = Client(max_in_flight=2)
        c.connect()
        c.send()
        out = c.recv(Error(code=ErrorCode.RATE_LIMITED, retry_after_ms=500))
        assert only(out, ServerError)[0].retry_after_ms == 500
        assert c.send()[1] == []
        assert [m.cid for m in only(c.advance(500), Send)] == [101]

    def test_close(self) -> None:
        """close() is terminal: CloseConnection, then send() raises; sends stay readable."""
        c = Client()
        c.connect()
        c.send()
        assert c.c.close(c.now) == [CloseConnection(code=0, reason="closed")]
        assert [m.cid for m in c.c.unacknowledged()] == [100]
        with pytest.raises(LocalProtocolError):
            c.send()
        c.c._check()

    def test_connection_made_twice(self) -> None:
        """connection_made while connected is an API misuse."""
        c = Client()
        c.connect()
        with pytest.raises(LocalProtocolError):
            c.c.connection_made(0)


class TestSendTimeout:
    """The client's first send timeout follows the server's answer time (RFC 6298, Karn)."""

    def test_a_slow_server_gets_no_duplicate_sends(self) -> None:
        """Answers at 1.9 s, then one at 2.5 s: with the fixed 2 s timeout it was sent twice."""
        c = Client()
        c.connect()
        for _ in range(5):
            cid, _ = c.send()
            assert c.advance(1_900) == []
            c.recv(SendAck(cid=cid, conv="c", seq=cid))
        # 1.9 s five times: SRTT 1,900 ms, RTTVAR 300 ms -> a 3,100 ms timeout
        assert c.c.send_timeout_ms == rto_chain(1_900, 5) == 3_100
        cid, _ = c.send()
        assert only(c.advance(2_500), Send) == []  # not resent
        c.recv(SendAck(cid=cid, conv="c", seq=cid))
        assert c.c.stats.resends == 0

    def test_a_resent_send_gives_no_sample(self) -> None:
        """Karn's rule: an answer after a resend is ignored; the timeout itself backed off."""
        c = Client()
        c.connect()
        cid, _ = c.send()
        assert only(c.advance(2_000), Send)  # resent at the 2 s timeout, which doubles
        c.recv(SendAck(cid=cid, conv="c", seq=1), dt=100)
        assert c.c.send_timeout_ms == 4_000  # a 2.1 s "sample" would have lowered it

    def test_the_timeout_is_capped(self) -> None:
        """No estimate grows past max_send_rto_ms."""
        c = Client(max_send_rto_ms=3_000)
        c.connect()
        cid, _ = c.send()
        c.recv(SendAck(cid=cid, conv="c", seq=1), dt=1_999)
        assert c.c.send_timeout_ms == 3_000


def rto_chain(sample: int, n: int) -> int:
    """The RTO after ``n`` equal samples, by the RFC 6298 formulas written out."""
    srtt, var = sample, sample // 2
    for _ in range(n - 1):
        var = var + (abs(srtt - sample) - var) // 4
        srtt = srtt + (sample - srtt) // 8
    return srtt + 4 * var


class TestClientReceive:
    def test_in_order_pushes(self) -> None:
        """Each push is delivered and acked cumulatively."""
        c = Client()
        c.connect()
        out = c.recv(push("c", 1))
        assert delivered(out) == [1] and only(out, PushAck) == [PushAck(conv="c", seq=1)]
        out = c.recv(PushBatch(pushes=(push("c", 2), push("c", 3), push("d", 1))))
        assert delivered(out) == [2, 3, 1]
        assert only(out, PushAck) == [PushAck(conv="c", seq=3), PushAck(conv="d", seq=1)]

    def test_duplicate_push_reacked_not_delivered(self) -> None:
        """A push seen before is acked again (the server retried) but not delivered."""
        c = Client()
        c.connect()
        c.recv(push("c", 1))
        out = c.recv(push("c", 1))
        assert delivered(out) == [] and only(out, PushAck) == [PushAck(conv="c", seq=1)]
        assert c.c.stats.duplicate_pushes == 1

    def test_gap_held_then_synced(self) -> None:
        """A push after a gap is held and acked singly; after gap_delay a sync fills the gap."""
        c = Client(gap_delay_ms=300)
        c.connect()
        c.recv(SyncResponse(req_id=1))  # the inbox sync of connection_made: nothing
        c.recv(push("c", 1))
        out = c.recv(push("c", 4))
        assert delivered(out) == []
        assert only(out, PushAck) == [PushAck(conv="c", seq=4, cumulative=False)]
        assert c.advance(299) == []
        out = c.advance(1)
        assert only(out, SyncRequest) == [SyncRequest(req_id=2, after=(("c", 1),), limit=100)]
        # seq 2 never existed (allocator gap); the page says so by starting at 3
        page = SyncPage(conv="c", messages=(push("c", 3), push("c", 4)))
        out = c.recv(SyncResponse(req_id=2, pages=(page,)))
        assert delivered(out) == [3, 4]
        assert c.c.contiguous("c") == 4

    def test_gap_filled_before_delay_cancels_sync(self) -> None:
        """A late push that closes the gap cancels the pending gap sync."""
        c = Client()
        c.connect()
        c.recv(SyncResponse(req_id=1))
        c.recv(push("c", 2))
        out = c.recv(push("c", 1))
        assert delivered(out) == [1, 2]
        assert only(out, PushAck) == [PushAck(conv="c", seq=1)]
        assert only(c.advance(10_000), SyncRequest) == []

    def test_sync_pages_with_more(self) -> None:
        """A page with more=True leads to a follow-up sync after the new cursor."""
        c = Client()
        c.connect()
        page = SyncPage(conv="c", messages=(push("c", 1), push("c", 2)), more=True)
        out = c.recv(SyncResponse(req_id=1, pages=(page,)))
        assert delivered(out) == [1, 2]
        assert only(out, SyncRequest) == [SyncRequest(req_id=2, after=(("c", 2),), limit=100)]

    def test_sync_api(self) -> None:
        """sync(convs) lists our cursors; one request at a time; nothing while offline."""
        c = Client()
        assert c.c.sync(0) == []
        c.connect()
        c.recv(SyncResponse(req_id=1))
        c.recv(push("c", 1))
        assert c.c.sync(c.now, ["c", "d"]) == [
            SyncRequest(req_id=2, after=(("c", 1), ("d", 0)), limit=100)
        ]
        assert c.c.sync(c.now) == []  # queued behind the outstanding request
        out = c.recv(SyncResponse(req_id=2))
        assert only(out, SyncRequest) == [SyncRequest(req_id=3, after=(), limit=100)]

    def test_sync_timeout_asks_again(self) -> None:
        """An unanswered sync is asked again after sync_timeout_ms."""
        c = Client(sync_timeout_ms=1000, heartbeat=HeartbeatPolicy(interval_ms=10**6))
        c.connect(heartbeat_ms=10**6)
        out = c.advance(1000)
        assert only(out, SyncRequest) == [SyncRequest(req_id=2, after=(), limit=100)]
        assert c.c.stats.sync_timeouts == 1
        c.recv(SyncResponse(req_id=1))  # the late answer is still used, counted as stale
        assert c.c.stats.stale_sync_responses == 1

    def test_notify_triggers_sync(self) -> None:
        """Notify for a seq beyond the cursor asks for a sync; one already held does not."""
        c = Client()
        c.connect()
        c.recv(SyncResponse(req_id=1))
        c.recv(push("c", 1))
        assert only(c.recv(Notify(entries=(("c", 1),))), SyncRequest) == []
        out = c.recv(Notify(entries=(("c", 5), ("room", 9))))
        assert only(out, SyncRequest) == [
            SyncRequest(req_id=2, after=(("c", 1), ("room", 0)), limit=100)
        ]

    def test_receipts_and_errors_become_events(self) -> None:
        """Receipts and Error frames are reported to the application."""
        c = Client()
        c.connect()
        r = Receipt(conv="c", seq=3, reader="bob")
        assert c.recv(r) == [ReceiptReceived(receipt=r)]
        assert only(c.recv(Error(code=ErrorCode.INTERNAL)), ServerError)
        assert c.c.mark_read("c", 3, c.now) == [Receipt(conv="c", seq=3)]

    def test_server_only_frames_only(self) -> None:
        """A frame a server may not send closes the connection with PROTOCOL_ERROR."""
        c = Client()
        c.connect()
        out = c.recv(Send(cid=1, conv="c", body=b""))
        assert out == [CloseConnection(code=ErrorCode.PROTOCOL_ERROR, reason="unexpected frame")]
        assert c.c.state is ClientState.DISCONNECTED

    def test_frames_while_disconnected_ignored(self) -> None:
        """Frames arriving after the connection was lost are counted, not processed."""
        c = Client()
        assert c.recv(push("c", 1)) == []
        assert c.c.stats.frames_ignored == 1

    def test_conversation_limit_and_cursor_loader(self) -> None:
        """Past max_conversations an idle window is evicted; the loader restores its cursor."""
        cursors = {"a": 0, "b": 0}
        c = Client(max_conversations=1, cursor_loader=lambda conv: cursors.get(conv, 0))
        c.connect()
        c.recv(SyncResponse(req_id=1))
        c.recv(push("a", 1))
        cursors["a"] = 1  # the application stored it
        c.recv(push("b", 1))
        assert c.c.conversations() == ["b"] and c.c.stats.windows_evicted == 1
        assert delivered(c.recv(push("a", 1))) == []  # duplicate, thanks to the loader
        assert c.c.contiguous("a") == 1

    def test_busy_windows_defer_a_sync(self) -> None:
        """News for a conversation with no free window is synced once a window frees up."""
        c = Client(max_conversations=1, gap_delay_ms=10_000)
        c.connect()
        c.recv(SyncResponse(req_id=1))
        c.recv(push("a", 2))  # held behind a gap: window "a" cannot be evicted
        assert only(c.recv(Notify(entries=(("b", 4),))), SyncRequest) == []
        assert c.c.conversations() == ["a"]
        out = c.recv(push("a", 1))  # the gap closes; "a" is idle now
        assert delivered(out) == [1, 2]
        out = c.c.sync(c.now, [])  # any later trigger sends the deferred sync
        assert only(out, SyncRequest) == [SyncRequest(req_id=2, after=(("b", 0),), limit=100)]
        assert c.c.conversations() == ["b"]

    def test_gap_closing_message_always_fits(self) -> None:
        """With max_held early messages held, the message closing the gap is still taken."""
        c = Client(max_held=2)
        c.connect()
        c.recv(SyncResponse(req_id=1))
        c.recv(PushBatch(pushes=(push("c", 2), push("c", 3))))
        out = c.recv(push("c", 4))  # a third early message: dropped, not acked
        assert not only(out, PushAck) and c.c.stats.pushes_dropped == 1
        out = c.recv(push("c", 1))
        assert delivered(out) == [1, 2, 3]
        assert only(out, PushAck) == [PushAck(conv="c", seq=1)]

    def test_set_cursor(self) -> None:
        """set_cursor starts a conversation after what the application holds."""
        c = Client()
        c.c.set_cursor("c", 10)
        c.connect()
        assert delivered(c.recv(push("c", 10))) == []
        assert delivered(c.recv(push("c", 11))) == [11]


class TestClientLiveness:
    def test_ping_when_idle_and_death(self) -> None:
        """Idle links are pinged every interval; no answer for 3 intervals means dead."""
        c = Client(heartbeat=HeartbeatPolicy(interval_ms=100, missed=3, jitter=0.0))
        c.connect(heartbeat_ms=100)
        c.recv(SyncResponse(req_id=1))
        assert only(c.advance(100), Ping)
        assert c.advance(50) == []
        assert only(c.advance(50), Ping)
        out = c.advance(100)
        assert only(out, ConnectionDead) == [ConnectionDead(silent_ms=300)]
        assert only(out, CloseConnection)[0].code == ErrorCode.HEARTBEAT_TIMEOUT
        assert c.c.state is ClientState.DISCONNECTED

    def test_traffic_means_no_ping(self) -> None:
        """A link busy both ways never pings."""
        c = Client(heartbeat=HeartbeatPolicy(interval_ms=100, missed=3, jitter=0.0))
        c.connect(heartbeat_ms=100)
        c.recv(SyncResponse(req_id=1))
        for i in range(1, 20):
            out = c.recv(push("c", i), dt=60)  # the ack goes out: both directions busy
            out += c.advance(0)
            assert not only(out, Ping)

    def test_login_timeout(self) -> None:
        """No LoginAck within login_timeout_ms: the connection is dead."""
        c = Client(login_timeout_ms=500)
        c.c.connection_made(0)
        assert only(c.advance(500), ConnectionDead)

    def test_kick_and_reconnect_hint(self) -> None:
        """Kick -> Kicked + close; the next reconnect delay honours retry_after_ms."""
        c = Client()
        c.connect()
        out = c.recv(Kick(code=ErrorCode.SHUTDOWN, retry_after_ms=7_000))
        assert only(out, Kicked) == [Kicked(code=ErrorCode.SHUTDOWN, reason="",
                                            retry_after_ms=7_000, reconnect=True)]
        assert c.c.reconnect_delay_ms() >= 7_000
        assert c.c.reconnect_delay_ms() < 7_000  # the hint is used once
        assert c.c.state is ClientState.DISCONNECTED

    def test_final_kick(self) -> None:
        """AUTH_FAILED and REPLACED say reconnecting will not help."""
        c = Client()
        c.connect()
        assert not only(c.recv(Kick(code=ErrorCode.REPLACED)), Kicked)[0].reconnect

    def test_reconnect_backoff_spreads(self) -> None:
        """Reconnect delays use the LoginAck bounds with full jitter and reset on login."""
        c = Client()
        c.c.connection_made(0)
        c.recv(LoginAck(uid="a", session="s", reconnect_min_ms=100, reconnect_max_ms=1000))
        c.c.connection_lost(0)
        delays = [c.c.reconnect_delay_ms() for _ in range(8)]
        assert all(0 <= d < 1000 for d in delays) and len(set(delays)) > 1
        assert delays[0] < 100


class ClientDeliveryMachine(RuleBasedStateMachine):
    """ClientSession downstream against a store: delivered == the stored seqs, in order, once."""

    def __init__(self) -> None:
        super().__init__()
        self.c = Client(max_held=8, gap_delay_ms=50, sync_limit=3,
                        heartbeat=HeartbeatPolicy(interval_ms=10**8))
        self.c.connect(heartbeat_ms=10**8)
        self.c.recv(SyncResponse(req_id=1))
        self.stored: list[int] = []  # existing seqs of conv "c" (with allocator gaps)
        self.delivered: list[int] = []
        self.requests: list[SyncRequest] = []

    def take(self, outs: list[Output]) -> None:
        self.delivered += delivered(outs)
        self.requests += only(outs, SyncRequest)

    @rule(skip=st.integers(0, 2))
    def store(self, skip: int) -> None:
        self.stored.append((self.stored[-1] if self.stored else 0) + 1 + skip)

    @precondition(lambda self: self.stored)
    @rule(data=st.data())
    def push(self, data: st.DataObject) -> None:
        seqs = data.draw(st.lists(st.sampled_from(self.stored), min_size=1, max_size=3))
        self.take(self.c.recv(PushBatch(pushes=tuple(push("c", q) for q in seqs))))

    @precondition(lambda self: self.stored)
    @rule(seq=st.integers(1, 40))
    def notify(self, seq: int) -> None:
        self.take(self.c.recv(Notify(entries=(("c", seq),))))

    @precondition(lambda self: self.requests)
    @rule()
    def answer_sync(self) -> None:
        req = self.requests.pop(0)
        after = dict(req.after) if req.after else {"c": 0}
        pages = []
        for conv, cursor in after.items():
            seqs = [q for q in self.stored if q > cursor] if conv == "c" else []
            pages.append(SyncPage(conv=conv, messages=tuple(push(conv, q) for q in seqs[:3]),
                                  more=len(seqs) > 3))
        self.take(self.c.recv(SyncResponse(req_id=req.req_id, pages=tuple(pages))))

    @rule(dt=st.sampled_from([10, 50, 10_000]))
    def advance(self, dt: int) -> None:
        self.take(self.c.advance(dt))

    @invariant()
    def exactly_once_in_order(self) -> None:
        assert self.delivered == self.stored[: len(self.delivered)]
        held = self.c.c.contiguous("c") or 0
        assert self.delivered == [q for q in self.stored if q <= held]


TestClientDeliveryMachine = ClientDeliveryMachine.TestCase
TestClientDeliveryMachine.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)


class TestWindowEviction:
    def test_an_evicted_conversation_resumes_after_its_cursor(self) -> None:
        """A conversation whose window was evicted never delivers an old message again."""
        c = Client(max_conversations=2)
        c.connect()
        c.recv(LoginAck(uid="alice", session="s"))
        delivered: list[tuple[str, int]] = []
        for conv in ("a", "b", "c", "a"):  # "c" evicts "a"; "a" comes back with seq 1 again
            out = c.recv(push(conv, 1)) + c.recv(push(conv, 2))
            delivered += [(e.push.conv, e.push.seq) for e in only(out, MessageReceived)]
            c.c._check()
        assert delivered == [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("c", 1), ("c", 2)]
        assert c.c.stats.windows_evicted >= 1

    def test_cursors_are_bounded(self) -> None:
        """Past max_cursors the oldest evicted cursor is forgotten and counted."""
        c = Client(max_conversations=1, max_cursors=2)
        c.connect()
        c.recv(LoginAck(uid="alice", session="s"))
        for conv in ("a", "b", "c", "d"):
            c.recv(push(conv, 1))
            c.c._check()
        assert c.c.stats.cursors_forgotten == 1


class TestRetryHints:
    def test_a_huge_retry_after_is_clamped(self) -> None:
        """A server hint of 2**63 - 1 ms neither crashes the client nor parks it for ever."""
        from imkit.session._common import MAX_RETRY_HINT_MS

        c = Client()
        c.connect()
        huge = 2**63 - 1
        c.recv(Error(code=ErrorCode.RATE_LIMITED, retry_after_ms=huge))
        deadline = c.c.next_deadline_ms()
        assert deadline is not None and deadline <= c.now + MAX_RETRY_HINT_MS
        c.recv(Kick(code=ErrorCode.SERVER_BUSY, retry_after_ms=huge))
        assert c.c.reconnect_delay_ms() == MAX_RETRY_HINT_MS
        c.c._check()


class TestClientFuzz:
    @settings(max_examples=150, deadline=None)
    @given(st.lists(server_messages, max_size=30), st.lists(st.integers(0, 50_000), max_size=30))
    def test_any_server_frames(self, msgs: list[Message], gaps: list[int]) -> None:
        """Any valid server frames yield only outputs; invariants hold; nothing delivered twice."""
        c = Client(max_conversations=4, max_held=4)
        c.connect()
        seen: set[tuple[str, int]] = set()
        for i, m in enumerate(msgs):
            if not c.c.connected:
                c.c.connection_made(c.now)
            outs = c.recv(m, dt=gaps[i] if i < len(gaps) else 0)
            outs += c.advance(0)
            for e in only(outs, MessageReceived):
                key = (e.push.conv, e.push.seq)
                assert key not in seen
                seen.add(key)


# --- protocol versions, pacing, paired defaults (issue 9, issue 8 #3) -------------------


class TestPairedDefaults:
    def test_client_defaults_stay_inside_the_servers(self) -> None:
        """ClientConfig()'s in-flight, cid span and pace stay inside ServerConfig()'s quotas."""
        from imkit.session import pace_limits

        server, client = ServerConfig(), ClientConfig()
        assert client.max_in_flight <= server.max_sends_in_flight
        assert client.max_in_flight <= server.ack_cache
        assert 2 * client.max_cid_span <= server.cid_window
        rate, burst = pace_limits(
            server.max_frames_per_s,
            server.frame_burst,
            rate_percent=client.pace_rate_percent,
            burst_percent=client.pace_burst_percent,
        )
        assert rate < server.max_frames_per_s
        assert burst < server.frame_burst
        # the client's back-off before a LoginAck is the one servers announce by default
        assert (client.reconnect.base_ms, client.reconnect.cap_ms) == (
            server.reconnect_min_ms, server.reconnect_max_ms,
        )
        c = ClientSession(token="t", device="d", now_ms=0, first_cid=1)
        assert c.config == client


class TestVersionNegotiation:
    def test_a_login_without_an_offer_is_version_1(self) -> None:
        """An old client's Login gets version 1 and a LoginAck without version 2 fields."""
        s = Server()
        ack = only(s.login(), LoginAck)[0]
        assert s.session.version == 1
        assert (ack.version, ack.max_frames_per_s, ack.frame_burst, ack.max_sends_in_flight) == (
            1, 0, 0, 0,
        )

    def test_the_highest_common_version_is_chosen(self) -> None:
        """Offer [1, 9]: the server's highest (2), with its limits in LoginAck."""
        s = Server(ServerConfig(max_frames_per_s=50, frame_burst=70, max_sends_in_flight=8))
        ack = only(s.recv(Login(token="tok-a", device="p", min_version=1, max_version=9)),
                   LoginAck)[0]
        assert s.session.version == ack.version == 2
        assert (ack.max_frames_per_s, ack.frame_burst, ack.max_sends_in_flight) == (50, 70, 8)

    def test_a_server_pinned_to_version_1(self) -> None:
        """ServerConfig(max_version=1) answers a version 2 offer with version 1."""
        s = Server(ServerConfig(max_version=1))
        ack = only(s.recv(Login(token="tok-a", device="p", max_version=2)), LoginAck)[0]
        assert s.session.version == ack.version == 1 and ack.frame_burst == 0
        with pytest.raises(ConfigError):
            ServerConfig(max_version=3)

    @pytest.mark.parametrize(("lo", "hi"), [(3, 5), (2, 1)])
    def test_no_common_version_is_refused(self, lo: int, hi: int) -> None:
        """An offer with nothing in common (or upside down) is kicked with PROTOCOL_ERROR."""
        s = Server()
        out = s.recv(Login(token="tok-a", device="p", min_version=lo, max_version=hi))
        assert only(out, Kick)[0].code == ErrorCode.PROTOCOL_ERROR
        assert s.session.stats.version_refusals == 1

    def test_transient_refusals_carry_a_hint_only_from_version_2(self) -> None:
        """fail_send(retry_after_ms=...) reaches a v2 client; a v1 client gets v1's SendAck."""
        for offer, hint in ((1, 0), (2, 700)):
            s = Server()
            s.recv(Login(token="tok-a", device="p", max_version=offer))
            s.recv(Send(cid=1, conv="c", body=b"x"))
            out = s.session.fail_send(1, ErrorCode.SERVER_BUSY, retry_after_ms=700)
            assert out == [SendAck(cid=1, conv="c", error=ErrorCode.SERVER_BUSY,
                                   retry_after_ms=hint)]

    def test_the_client_offers_its_range_and_falls_back_after_a_refusal(self) -> None:
        """Login offers [1, 2]; PROTOCOL_ERROR before LoginAck -> version 1's Login for a while."""
        c = Client(version_fallback_ms=1000)
        login = c.c.connection_made(0)[0]
        assert isinstance(login, Login) and (login.min_version, login.max_version) == (1, 2)
        c.recv(Error(code=ErrorCode.PROTOCOL_ERROR, reason="protocol error"))
        c.c.connection_lost(c.now)
        assert c.c.stats.version_fallbacks == 1
        login = c.c.connection_made(c.now)[0]
        assert isinstance(login, Login) and login.max_version == 1
        assert encode_v1_login_bytes(login)
        c.c.connection_lost(c.now)
        c.now += 1000
        login = c.c.connection_made(c.now)[0]
        assert isinstance(login, Login) and login.max_version == 2

    def test_the_client_adopts_the_negotiated_version_and_limits(self) -> None:
        """LoginAck(version=2, limits) sets the version, the pace and the in-flight cap."""
        c = Client()
        c.c.connection_made(0)
        c.recv(LoginAck(uid="alice", session="s", version=2, max_frames_per_s=100,
                        frame_burst=60, max_sends_in_flight=5))
        assert c.c.version == 2
        assert c.c._outbox.flight_cap == 5
        assert c.c._outbox.pacer is not None
        assert (c.c._outbox.pacer.rate_per_s, c.c._outbox.pacer.burst) == (80, 30)


def encode_v1_login_bytes(login: Login) -> bool:
    """A Login offering only version 1 is byte for byte version 1's Login."""
    import tests.compat.v1.protocol as v1
    from imkit.protocol import encode

    old = v1.Login(token=login.token, device=login.device, resume=login.resume)
    return encode(login) == v1.encode(old)


class TestPacing:
    def _connect(self, c: Client, rate: int, burst: int, in_flight: int = 64) -> None:
        c.c.connection_made(c.now)
        c.recv(LoginAck(uid="alice", session="s", version=2, max_frames_per_s=rate,
                        frame_burst=burst, max_sends_in_flight=in_flight,
                        heartbeat_ms=10**6))

    def test_a_burst_of_sends_never_exceeds_the_servers_bucket(self) -> None:
        """300 sends queued offline, a server bucket of 20/s burst 10: no frame is refused."""
        from imkit.policy import TokenBucket

        c = Client(heartbeat=HeartbeatPolicy(interval_ms=10**6, jitter=0.0))
        self._connect(c, rate=20, burst=10)  # online once: the client knows the limits
        c.c.connection_lost(c.now)
        for _ in range(300):
            c.send()
        server = TokenBucket(rate_per_s=20, burst=10, now_ms=0)
        acked = 0
        out = c.c.connection_made(0)
        out += c.recv(LoginAck(uid="alice", session="s", version=2, max_frames_per_s=20,
                               frame_burst=10, heartbeat_ms=10**6))
        for _ in range(10_000):
            for f in frames(out):
                if isinstance(f, Login):
                    continue
                assert server.take(c.now), f"frame {f} over the server's rate at {c.now}"
            answers = [SendAck(cid=m.cid, conv="c", seq=m.cid) for m in only(out, Send)]
            out = []
            for a in answers:
                out += c.recv(a)
            acked += len(answers)
            if acked >= 300:
                break
            if not answers:
                due = c.c.next_deadline_ms()
                assert due is not None
                out += c.advance(max(0, due - c.now))
        assert acked == 300 and c.c.in_flight == 0 and c.c.queued == 0

    def test_acks_coalesce_when_the_budget_runs_low(self) -> None:
        """One push per frame with little budget: fewer ack frames, ending cumulative at 40."""
        c = Client(heartbeat=HeartbeatPolicy(interval_ms=10**6, jitter=0.0))
        self._connect(c, rate=10, burst=8)
        acks: list[PushAck] = []
        for seq in range(1, 41):
            acks += only(c.recv(push("c", seq)), PushAck)
        for _ in range(100):
            due = c.c.next_deadline_ms()
            if due is None or due > c.now + 10_000:
                break
            acks += only(c.advance(max(0, due - c.now)), PushAck)
        assert len(acks) < 40 / 2
        assert acks[-1] == PushAck(conv="c", seq=40)

    def test_a_busy_sendack_is_retried_after_the_servers_hint(self) -> None:
        """SendAck(SERVER_BUSY, retry_after_ms=5000): resent at 5 s, not at the 2 s back-off."""
        c = Client(heartbeat=HeartbeatPolicy(interval_ms=10**6, jitter=0.0))
        c.connect(heartbeat_ms=10**6)
        cid, _ = c.send()
        out = c.recv(SendAck(cid=cid, conv="c", error=ErrorCode.SERVER_BUSY, retry_after_ms=5000))
        assert out == []
        assert only(c.advance(4999), Send) == []
        assert [m.cid for m in only(c.advance(1), Send)] == [cid]

    def test_server_busy_holds_sends(self) -> None:
        """Error(SERVER_BUSY, retry_after_ms) holds new sends like RATE_LIMITED does."""
        c = Client(heartbeat=HeartbeatPolicy(interval_ms=10**6, jitter=0.0))
        c.connect(heartbeat_ms=10**6)
        c.recv(Error(code=ErrorCode.SERVER_BUSY, retry_after_ms=300))
        assert only(c.send()[1], Send) == []
        assert len(only(c.advance(300), Send)) == 1

    def test_an_ack_for_another_conversation_is_not_ours(self) -> None:
        """A SendAck whose conv differs from the send's is counted and ignored."""
        c = Client()
        c.connect()
        cid, _ = c.send("c")
        assert c.recv(SendAck(cid=cid, conv="d", seq=9)) == []
        assert c.c.stats.unknown_acks == 1 and c.c.in_flight == 1


# --- configs as attrs values, exports, clocks (issue 9 "One config style") -------------


class TestConfigs:
    def test_config_doctests(self) -> None:
        """The examples in ClientConfig's and pace_limits' docstrings hold."""
        from imkit.session import _config, _limits

        for mod in (_config, _limits):
            r = doctest.testmod(mod)
            assert r.failed == 0 and r.attempted > 0

    def test_client_config_is_a_value(self) -> None:
        """ClientConfig compares by fields, has a field repr and cannot be changed."""
        import attrs

        assert ClientConfig(max_in_flight=8) == ClientConfig(max_in_flight=8)
        assert ClientConfig(max_in_flight=8) != ClientConfig()
        assert "max_in_flight=8" in repr(ClientConfig(max_in_flight=8))
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            ClientConfig().max_queued = 1  # type: ignore[misc]

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"max_in_flight": "8"}, "max_in_flight"),
            ({"max_queued": 0}, "max_queued"),
            ({"max_queued": True}, "max_queued"),
            ({"gap_delay_ms": -1}, "gap_delay_ms"),
            ({"gap_delay_ms": 1.5}, "gap_delay_ms"),
            ({"max_in_flight": 8, "max_cid_span": 4}, "max_cid_span"),
            ({"pace_rate_percent": 101}, "pace_rate_percent"),
            ({"pace_burst_percent": 0}, "pace_burst_percent"),
            ({"max_version": 3}, "max_version"),
            ({"heartbeat": 30_000}, "heartbeat"),
            ({"send_retry": None}, "send_retry"),
            ({"reconnect": ExponentialBackoff(base_ms=1, cap_ms=2)}, "reconnect"),
            ({"ack_delay_ms": None}, "ack_delay_ms"),
            ({"version_fallback_ms": -5}, "version_fallback_ms"),
        ],
    )
    def test_client_config_names_the_bad_field(self, kwargs: dict[str, Any], field: str) -> None:
        """A wrong type or range in ClientConfig raises ConfigError naming the field."""
        with pytest.raises(ConfigError, match=field):
            ClientConfig(**kwargs)

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"cid_window": "256"}, "cid_window"),
            ({"ack_cache": 0}, "ack_cache"),
            ({"heartbeat": None}, "heartbeat"),
            ({"push_retry": 3_000}, "push_retry"),
            ({"quota_retry_ms": -1}, "quota_retry_ms"),
            ({"reconnect_min_ms": 10, "reconnect_max_ms": 5}, "reconnect_max_ms"),
            ({"min_version": 2, "max_version": 1}, "max_version"),
            ({"kick_unresponsive": "no"}, "kick_unresponsive"),
            ({"max_frames_per_s": 2.5}, "max_frames_per_s"),
        ],
    )
    def test_server_config_names_the_bad_field(self, kwargs: dict[str, Any], field: str) -> None:
        """A wrong type or range in ServerConfig raises ConfigError naming the field."""
        with pytest.raises(ConfigError, match=field):
            ServerConfig(**kwargs)

    def test_server_config_derived_values(self) -> None:
        """ServerConfig still derives the first push retry and the give-up span."""
        cfg = ServerConfig(push_retry=ExponentialBackoff(base_ms=10, cap_ms=40, max_attempts=2))
        assert (cfg.first_push_retry_ms, cfg.push_give_up_ms) == (10, 10 + 20 + 40)
        assert cfg == ServerConfig(
            push_retry=ExponentialBackoff(base_ms=10, cap_ms=40, max_attempts=2)
        )

    def test_the_session_runs_with_its_config(self) -> None:
        """ClientSession(config=...) keeps the config and applies its limits."""
        cfg = ClientConfig(max_in_flight=2, max_cid_span=2, max_queued=3)
        c = ClientSession(token="t", device="d", now_ms=0, first_cid=1, config=cfg)
        assert c.config is cfg
        c.connection_made(0)
        for _ in range(5):
            c.send("c", b"x", 0)
        assert (c.in_flight, c.queued) == (2, 3)
        with pytest.raises(CapacityError):
            c.send("c", b"x", 0)
        c._check()

    def test_session_arguments_name_the_bad_one(self) -> None:
        """A config that is not a ClientConfig, or a bad first_cid, raises ConfigError naming it."""
        with pytest.raises(ConfigError, match="config"):
            ClientSession(token="t", device="d", now_ms=0, first_cid=1,
                          config={"max_in_flight": 2})  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="first_cid"):
            ClientSession(token="t", device="d", now_ms=0, first_cid=0)

    def test_first_cid_does_not_come_from_the_monotonic_clock(self) -> None:
        """now_ms is monotonic, so cids are never seeded from it: first_cid is required."""
        with pytest.raises(TypeError, match="first_cid"):
            ClientSession(token="t", device="d", now_ms=1_700_000_000_000)  # type: ignore[call-arg]

    def test_client_ms_is_the_wall_clock_given(self) -> None:
        """Send.client_ms carries send(wall_ms=), never the monotonic now_ms."""
        c = ClientSession(token="t", device="d", now_ms=5, first_cid=1)
        c.connection_made(5)
        _, out = c.send("c", b"x", 7, wall_ms=1_700_000_000_000)
        _, out2 = c.send("c", b"y", 8)
        assert [m.client_ms for m in only(out + out2, Send)] == [1_700_000_000_000, 0]


class TestExports:
    def test_every_event_is_exported(self) -> None:
        """Every SessionEvent subclass and every name of __all__ is importable from the package."""
        import imkit.session as pkg
        from imkit.session import _events

        def subclasses(cls: type) -> set[type]:
            found: set[type] = set(cls.__subclasses__())
            for sub in list(found):
                found |= subclasses(sub)
            return found

        events = {c.__name__ for c in subclasses(SessionEvent) if c.__module__ == _events.__name__}
        assert events, "no events found"
        assert events | {"SessionEvent", "Output"} <= set(pkg.__all__)
        assert set(_events.__all__) <= set(pkg.__all__)
        for name in pkg.__all__:
            assert getattr(pkg, name) is not None, name
        assert {"ClientConfig", "ServerConfig", "ClientStats", "ServerStats"} <= set(pkg.__all__)

    def test_every_default_of_a_part_is_exported(self) -> None:
        """The DEFAULT_* constants of every session module are in the package's __all__."""
        import imkit.session as pkg
        from imkit.session import _config, _limits, _server

        for mod in (_config, _limits, _server):
            defaults = {n for n in vars(mod) if n.startswith("DEFAULT_")}
            assert defaults <= set(pkg.__all__), (mod.__name__, defaults - set(pkg.__all__))


class TestClientCheck:
    @pytest.mark.parametrize(
        ("corrupt", "part"),
        [
            (lambda c: setattr(c._outbox, "flight_cap", 0), "Outbox"),
            (lambda c: c._outbox.queue.appendleft(Send(cid=1, conv="c", body=b"")), "Outbox"),
            (lambda c: setattr(c._convs, "_live", False), "Conversations"),
            (lambda c: c._convs._cursors.__setitem__("c", 1), "Conversations"),
            (lambda c: setattr(c, "version", 3), "version"),
        ],
    )
    def test_check_sees_each_part(self, corrupt: Any, part: str) -> None:
        """ClientSession._check() still checks the outbox's and the conversations' invariants."""
        c = Client()
        c.connect()
        c.c.send("c", b"x", c.now)
        c.recv(push("c", 1))
        c.c._check()
        corrupt(c.c)
        with pytest.raises(AssertionError, match=part):
            c.c._check()
