"""RouteTable: bind / lookup / group_by_gateway rates beside a plain dict, bytes per
route (tracemalloc), and the three routing schemes side by side.

The baseline is the least a route table can be in Python: a dict
``uid -> {device: Route}``, with no fencing, no grace period and no limits. Run::

    python benchmarks/bench_routetable.py            # full sizes (< 1 min)
    python benchmarks/bench_routetable.py --quick    # smoke test
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import Callable

from _harness import Report, measure, quick
from imkit.hashring import HashRing
from imkit.routetable import (
    BroadcastRouter,
    HashRouter,
    Route,
    Router,
    RouteTable,
    TableRouter,
)

N = 20_000 if quick() else 200_000  # users online
GATEWAYS = [f"gw-{i:02d}" for i in range(20)]
DEVICES = ("phone", "desktop")
SECOND_DEVICE = 0.2  # share of users with a second device online
GROUP = 10_000  # members of a big group


def make_routes(n: int, seed: int = 1) -> list[Route]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        uid = f"user-{i:08d}"
        out.append(Route(uid=uid, device="phone", gateway=rnd.choice(GATEWAYS), conn_id=i, epoch=1))
        if rnd.random() < SECOND_DEVICE:
            gw = rnd.choice(GATEWAYS)
            out.append(Route(uid=uid, device="desktop", gateway=gw, conn_id=n + i, epoch=1))
    return out


_EMPTY: dict[str, Route] = {}


class DictTable:
    """The baseline: uid -> {device: Route}, with no fencing, grace period or limits."""

    def __init__(self) -> None:
        self.by_uid: dict[str, dict[str, Route]] = {}

    def bind(self, route: Route) -> None:
        devices = self.by_uid.get(route.uid)
        if devices is None:
            self.by_uid[route.uid] = {route.device: route}
        else:
            devices[route.device] = route

    def unbind(self, uid: str, device: str) -> None:
        devices = self.by_uid.get(uid)
        if devices is not None:
            devices.pop(device, None)
            if not devices:
                del self.by_uid[uid]

    def lookup(self, uid: str) -> dict[str, Route]:
        return self.by_uid.get(uid, _EMPTY)

    def group_by_gateway(self, uids: list[str]) -> dict[str, list[Route]]:
        out: dict[str, list[Route]] = {}
        get = self.by_uid.get
        for uid in uids:
            for r in get(uid, _EMPTY).values():
                bucket = out.get(r.gateway)
                if bucket is None:
                    out[r.gateway] = [r]
                else:
                    bucket.append(r)
        return out


def bytes_per_route(build: Callable[[list[Route]], object], n: int) -> float:
    """Memory held per route: table plus Route objects plus their uid strings."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    routes = make_routes(n, seed=7)
    count = len(routes)
    held = build(routes)
    del routes
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del held
    return used / count


def build_table(routes: list[Route]) -> RouteTable:
    t = RouteTable(max_routes=len(routes))
    for r in routes:
        t.bind(r, 0)
    return t


def build_dict(routes: list[Route]) -> DictTable:
    d = DictTable()
    for r in routes:
        d.bind(r)
    return d


def main() -> None:
    report = Report("Route table")
    routes = make_routes(N)
    uids = list(dict.fromkeys(r.uid for r in routes))
    rnd = random.Random(2)
    probe = [rnd.choice(uids) for _ in range(100_000 if not quick() else 20_000)]
    members = rnd.sample(uids, GROUP)
    report.note(
        f"{len(uids):,} users online ({len(routes):,} routes, {SECOND_DEVICE:.0%} with a second "
        f"device) on {len(GATEWAYS)} gateways. Baseline: a dict uid -> {{device: Route}} "
        "(the plain-dict way), with no fencing, grace period or limits."
    )

    fresh_t: list[RouteTable] = []
    fresh_d: list[DictTable] = []

    def bind_table() -> None:
        t = fresh_t.pop()
        for r in routes:
            t.bind(r, 0)

    def bind_dict() -> None:
        d = fresh_d.pop()
        for r in routes:
            d.bind(r)

    r_bind = measure(bind_table, ops=len(routes),
                     setup=lambda: fresh_t.append(RouteTable(max_routes=len(routes))))
    r_bind_d = measure(bind_dict, ops=len(routes), setup=lambda: fresh_d.append(DictTable()))

    table = build_table(routes)
    dtable = build_dict(routes)

    def lookup_table() -> None:
        lookup = table.lookup
        for uid in probe:
            lookup(uid)

    def lookup_dict() -> None:
        lookup = dtable.lookup
        for uid in probe:
            lookup(uid)

    r_look = measure(lookup_table, ops=len(probe))
    r_look_d = measure(lookup_dict, ops=len(probe))
    r_group = measure(lambda: table.group_by_gateway(members), ops=len(members))
    r_group_d = measure(lambda: dtable.group_by_gateway(members), ops=len(members))

    # reconnect: unbind then bind a newer epoch (the fenced path, with grace)
    recon = routes[:50_000]
    epoch = [1]

    def reconnect_table() -> None:
        e = epoch[0]
        t = table
        for r in recon:
            t.unbind(r.uid, r.device, r.conn_id if e == 1 else -e, e, 0)
            t.bind(Route(uid=r.uid, device=r.device, gateway=r.gateway, conn_id=-(e + 1),
                         epoch=e + 1), 0)
        epoch[0] = e + 1

    def reconnect_dict() -> None:
        d = dtable
        e = epoch[0]
        for r in recon:
            d.unbind(r.uid, r.device)
            d.bind(Route(uid=r.uid, device=r.device, gateway=r.gateway, conn_id=-(e + 1),
                         epoch=e + 1))

    r_recon = measure(reconnect_table, ops=len(recon))
    r_recon_d = measure(reconnect_dict, ops=len(recon))

    # expiry: park everything, then expire it all at once
    exp_state: dict[str, RouteTable] = {}

    def park_all() -> None:
        t = build_table(routes)
        for r in routes:
            t.unbind(r.uid, r.device, r.conn_id, r.epoch, 0)
        exp_state["t"] = t

    r_expire = measure(lambda: exp_state["t"].expire(10**9), ops=len(routes), setup=park_all,
                       repeat=3)

    report.table(
        ["operation", "RouteTable", "dict baseline", "ratio", "RouteTable ns/op (min/med/max)"],
        [
            ["bind (new)", r_bind.rate_str, r_bind_d.rate_str, f"{r_bind.ratio(r_bind_d):.2f}",
             r_bind.spread()],
            ["lookup(uid)", r_look.rate_str, r_look_d.rate_str, f"{r_look.ratio(r_look_d):.2f}",
             r_look.spread()],
            [f"group_by_gateway ({GROUP:,} members), per member", r_group.rate_str,
             r_group_d.rate_str, f"{r_group.ratio(r_group_d):.2f}", r_group.spread()],
            ["reconnect (unbind + bind newer epoch)", r_recon.rate_str, r_recon_d.rate_str,
             f"{r_recon.ratio(r_recon_d):.2f}", r_recon.spread()],
            ["expire (all parked at once), per route", r_expire.rate_str, "-", "-",
             r_expire.spread()],
        ],
        title="Operations per second (ratio > 1: RouteTable faster)",
    )

    mem_n = 20_000 if quick() else 100_000
    b_table = bytes_per_route(build_table, mem_n)
    b_dict = bytes_per_route(build_dict, mem_n)
    report.table(
        ["structure", "bytes per route", "ratio to baseline"],
        [
            ["RouteTable", f"{b_table:.0f}", f"{b_table / b_dict:.2f}"],
            ["dict baseline", f"{b_dict:.0f}", "1.00"],
        ],
        title=f"Memory (tracemalloc, {mem_n:,} users: Route objects, uid strings and the "
        "structure; gateway and device strings are shared)",
    )

    # the three routing schemes, on one table state
    ring = HashRing(GATEWAYS)
    routers: list[tuple[str, Router]] = [
        ("broadcast", BroadcastRouter(GATEWAYS)),
        ("consistent hash", HashRouter(ring)),
        ("route table", TableRouter(table)),
    ]
    one = probe[: len(probe) // 10]
    rows = []
    for name, router in routers:
        r1 = measure(lambda router=router: [router.gateways_for((u,)) for u in one], ops=len(one))
        rg = measure(lambda router=router: router.gateways_for(members), ops=1,
                     repeat=5 if not quick() else 3)
        pubs_1 = sum(len(router.gateways_for((u,))) for u in one[:2000]) / min(len(one), 2000)
        pubs_g = len(router.gateways_for(members))
        entries_g = sum(len(v) for v in router.gateways_for(members).values())
        rows.append([name, r1.rate_str, f"{pubs_1:.2f}", f"{rg.median * 1e3:.2f}",
                     f"{pubs_g}", f"{entries_g:,}"])
    report.table(
        ["scheme", "1:1 routings/s", "publishes per 1:1 msg", f"group of {GROUP:,}: ms",
         "publishes per group msg", "uids sent to gateways"],
        rows,
        title="Routing schemes (who must receive a push)",
    )
    report.note(
        "Broadcast sends every push to every gateway (20 publishes for a 1:1 message, of which "
        "19 are wasted, and the whole member list to each); consistent hashing and the route "
        "table both publish once per gateway that really holds a recipient. The hash router "
        "assumes every client sits on its ring gateway (1.2 devices per user here are all "
        "placed by the table, so the hash router's answer is only what the ring *would* "
        "say); the table router also skips offline users. Table router rates include the "
        "de-duplication of users with two devices on one gateway."
    )
    report.emit(__file__)


if __name__ == "__main__":
    main()
