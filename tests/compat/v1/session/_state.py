"""The states of both sessions and every transition between them, in one place.

A transition not in a table is a misuse of the API (``connection_made`` twice) and
raises :class:`~imkit.errors.LocalProtocolError`; frames that arrive in a state
where they mean nothing are filtered by the sessions before they reach this table.

Client::

    DISCONNECTED --connection_made--> LOGGING_IN --LoginAck--> READY
    LOGGING_IN / READY --connection_lost | Kick | heartbeat dead--> DISCONNECTED
    any --close()--> CLOSED (terminal)

Server::

    AWAIT_LOGIN --Login accepted--> ACTIVE
    AWAIT_LOGIN / ACTIVE --kick (bad token, frame before login, login timeout,
                           heartbeat timeout, protocol error, abuse, app kick)
                           | connection_lost--> CLOSED (terminal)
"""

from __future__ import annotations

import enum

from imkit.errors import LocalProtocolError

__all__ = [
    "CLIENT_TRANSITIONS",
    "SERVER_TRANSITIONS",
    "ClientState",
    "ClientTrigger",
    "ServerState",
    "ServerTrigger",
    "client_next",
    "server_next",
]


class ClientState(enum.Enum):
    """Where a :class:`~tests.compat.v1.session.ClientSession` is."""

    DISCONNECTED = "disconnected"  # no transport; sends queue up, nothing is timed
    LOGGING_IN = "logging_in"  # transport up, Login sent (and pipelined frames after it)
    READY = "ready"  # LoginAck received
    CLOSED = "closed"  # close() was called; terminal


class ClientTrigger(enum.Enum):
    """What moves a client session."""

    CONNECTION_MADE = "connection_made"
    LOGIN_ACK = "login_ack"
    CONNECTION_LOST = "connection_lost"  # transport closed, Kick received, heartbeat dead
    CLOSE = "close"


class ServerState(enum.Enum):
    """Where a :class:`~tests.compat.v1.session.ServerSession` is."""

    AWAIT_LOGIN = "await_login"  # only Login is accepted; the login deadline runs
    ACTIVE = "active"  # logged in: identity fixed, heartbeat deadline runs
    CLOSED = "closed"  # kicked or transport gone; terminal, no timers left


class ServerTrigger(enum.Enum):
    """What moves a server session."""

    LOGIN_OK = "login_ok"
    KICK = "kick"  # any Kick we send (auth failed, timeout, protocol error, quota abuse)
    CONNECTION_LOST = "connection_lost"


_C = ClientState
_CT = ClientTrigger
#: (state, trigger) -> next state: the whole client state machine.
CLIENT_TRANSITIONS: dict[tuple[ClientState, ClientTrigger], ClientState] = {
    (_C.DISCONNECTED, _CT.CONNECTION_MADE): _C.LOGGING_IN,
    (_C.DISCONNECTED, _CT.CONNECTION_LOST): _C.DISCONNECTED,  # idempotent
    (_C.DISCONNECTED, _CT.CLOSE): _C.CLOSED,
    (_C.LOGGING_IN, _CT.LOGIN_ACK): _C.READY,
    (_C.LOGGING_IN, _CT.CONNECTION_LOST): _C.DISCONNECTED,
    (_C.LOGGING_IN, _CT.CLOSE): _C.CLOSED,
    (_C.READY, _CT.CONNECTION_LOST): _C.DISCONNECTED,
    (_C.READY, _CT.CLOSE): _C.CLOSED,
    (_C.CLOSED, _CT.CONNECTION_LOST): _C.CLOSED,
    (_C.CLOSED, _CT.CLOSE): _C.CLOSED,
}

_S = ServerState
_ST = ServerTrigger
#: (state, trigger) -> next state: the whole server state machine.
SERVER_TRANSITIONS: dict[tuple[ServerState, ServerTrigger], ServerState] = {
    (_S.AWAIT_LOGIN, _ST.LOGIN_OK): _S.ACTIVE,
    (_S.AWAIT_LOGIN, _ST.KICK): _S.CLOSED,
    (_S.AWAIT_LOGIN, _ST.CONNECTION_LOST): _S.CLOSED,
    (_S.ACTIVE, _ST.KICK): _S.CLOSED,
    (_S.ACTIVE, _ST.CONNECTION_LOST): _S.CLOSED,
    (_S.CLOSED, _ST.CONNECTION_LOST): _S.CLOSED,
}


def client_next(state: ClientState, trigger: ClientTrigger) -> ClientState:
    """The state after ``trigger`` in ``state``; LocalProtocolError if not allowed. O(1)."""
    try:
        return CLIENT_TRANSITIONS[state, trigger]
    except KeyError:
        raise LocalProtocolError(
            f"client session cannot {trigger.value} in state {state.value}"
        ) from None


def server_next(state: ServerState, trigger: ServerTrigger) -> ServerState:
    """The state after ``trigger`` in ``state``; LocalProtocolError if not allowed. O(1)."""
    try:
        return SERVER_TRANSITIONS[state, trigger]
    except KeyError:
        raise LocalProtocolError(
            f"server session cannot {trigger.value} in state {state.value}"
        ) from None
