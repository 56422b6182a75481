"""Benchmark: feedback writes per second at 32 concurrent clients, PostgreSQL against SQLite, in
one run; with --libraries, also psycopg 3 against SQLAlchemy Core (the choice feedback_db.py made).

    .venv/bin/python benchmarks/bench_feedback_db.py [--clients 32] [--per-client 100] [--repeats 5] [--libraries]

A throw-away PostgreSQL 15 server (tests/_postgres.py: Debian's postgresql package, a unix
socket, fsync and synchronous_commit on, as shipped) and a SQLite file in the same temporary
folder's file system. Each of --clients threads calls `FeedbackStore` as the server's thread
pool does, --per-client times each:

- votes: `add_feedback` (one row, one commit): what a thumbs click costs;
- replies: `record_reply` of a new conversation (a conversation, a user turn, the reply with its
  snapshot: three rows, one commit): what every answered chat costs.

Every write is committed durably before the call returns (SQLite `synchronous=FULL`, PostgreSQL
`synchronous_commit=on`). The two backends take turns, --repeats times each, on the same store
(a warm-up round first); the figures are the medians. On a shared 2-core machine compare the
ratios, not the absolute numbers.

--libraries: the same vote insert (`INSERT ... RETURNING id` and a commit) from --clients threads
through psycopg's pool and through SQLAlchemy Core's engine (`postgresql+psycopg`, pool of the
same size), and what each needs installed (the files of its distributions, from their RECORD).
SQLAlchemy is measured only where it is installed (`pip install sqlalchemy`); chatforge does not
depend on it. The last line is one JSON object: {"bench": "feedback_db", ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))            # the throw-away PostgreSQL cluster of the tests
from _postgres import Cluster

from chatforge.data import feedback_db
from chatforge.data.feedback import FeedbackStore

PROMPT = [{"role": "system", "content": "Answer from the context."},
          {"role": "user", "content": "Context:\n[1] (source: account.md > Password) Open the sign-in page and "
                                      "choose Forgot password.\n\nQuestion: How do I reset my password?"}]
REPLY = "Open the sign-in page and choose Forgot password; a reset link arrives within a minute."


def run_threads(clients: int, per_client: int, work) -> float:
    """Seconds for `clients` threads to call `work(client, i)` `per_client` times each."""
    start = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client(c: int) -> None:
        start.wait()
        try:
            for i in range(per_client):
                work(c, i)
        except BaseException as e:    # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def bench_round(store: FeedbackStore, clients: int, per_client: int, tag: str) -> dict:
    """One round of votes then replies on `store`: writes per second of each."""
    n = clients * per_client
    before = store.db.read("SELECT count(*) AS n FROM feedback")[0]["n"]
    votes = run_threads(clients, per_client, lambda c, i: store.add_feedback("seed", "up", comment=f"{tag}-{c}-{i}"))
    replies = run_threads(clients, per_client, lambda c, i: store.record_reply(
        f"m-{tag}-{c}-{i}", f"c-{tag}-{c}-{i}", "bench", PROMPT[1:], REPLY, PROMPT, "prompt",
        [{"source": "account.md > Password", "text": "Open the sign-in page."}]))
    stored = store.db.read("SELECT count(*) AS n FROM feedback")[0]["n"] - before
    assert stored == n, f"{stored} votes stored, {n} acknowledged"
    return {"votes_per_s": n / votes, "replies_per_s": n / replies}


def bench_stores(targets: dict[str, str], clients: int, per_client: int, repeats: int) -> dict:
    """Medians over `repeats` rounds per backend, the backends taking turns (a warm-up first)."""
    stores = {name: FeedbackStore(t) for name, t in targets.items()}
    rounds: dict[str, list[dict]] = {name: [] for name in stores}
    try:
        for store in stores.values():
            store.record_reply("seed", "seed", "bench", PROMPT[1:], REPLY, PROMPT, "prompt", [])
            bench_round(store, clients, max(1, per_client // 4), "warm-up")
        for r in range(repeats):
            for name, store in stores.items():
                rounds[name].append(bench_round(store, clients, per_client, f"r{r}"))
    finally:
        for store in stores.values():
            store.close()
    return {name: {k: round(statistics.median(x[k] for x in rs), 1) for k in rs[0]} for name, rs in rounds.items()}


def installed_mib(*dists: str) -> float:
    """MiB of the files the distributions installed (their RECORD)."""
    total = 0
    for name in dists:
        for f in metadata.distribution(name).files or []:
            path = f.locate()
            if path.is_file():
                total += path.stat().st_size
    return round(total / 2**20, 1)


def bench_libraries(url: str, clients: int, per_client: int, repeats: int) -> dict:
    """The same insert through psycopg's pool and through SQLAlchemy Core, taking turns; medians."""
    import psycopg
    from psycopg_pool import ConnectionPool

    ddl = ("CREATE TABLE votes (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, message_id TEXT NOT NULL, "
           "rating TEXT NOT NULL, comment TEXT)")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(ddl)
    pool = ConnectionPool(url, min_size=feedback_db.POOL_SIZE, max_size=feedback_db.POOL_SIZE, open=True)
    pool.wait()

    def with_psycopg(c: int, i: int, tag: str) -> None:
        with pool.connection() as conn, conn.transaction():
            conn.execute("INSERT INTO votes (message_id, rating, comment) VALUES (%s, %s, %s) RETURNING id",
                         ("seed", "up", f"{tag}-{c}-{i}")).fetchall()

    writers = {"psycopg": with_psycopg}
    out = {"psycopg": {"installed_mib": installed_mib("psycopg", "psycopg-binary", "psycopg-pool")}}
    try:
        import sqlalchemy as sa
    except ImportError:
        sa = None
        out["sqlalchemy"] = "not installed (pip install sqlalchemy to compare)"
    if sa is not None:
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1),
                                  pool_size=feedback_db.POOL_SIZE, max_overflow=0)
        votes = sa.Table("votes", sa.MetaData(), autoload_with=engine)
        insert = votes.insert().returning(votes.c.id)

        def with_sqlalchemy(c: int, i: int, tag: str) -> None:
            with engine.begin() as conn:
                conn.execute(insert, {"message_id": "seed", "rating": "up", "comment": f"{tag}-{c}-{i}"}).fetchall()

        writers["sqlalchemy"] = with_sqlalchemy
        # SQLAlchemy is not a driver: on PostgreSQL it runs psycopg underneath.
        out["sqlalchemy"] = {"installed_mib": round(installed_mib("sqlalchemy")
                                                    + installed_mib("psycopg", "psycopg-binary"), 1)}
    rates: dict[str, list[float]] = {name: [] for name in writers}
    for r in range(repeats + 1):                    # round 0 warms both up
        for name, write in writers.items():
            seconds = run_threads(clients, per_client, lambda c, i, write=write, tag=f"{name}{r}": write(c, i, tag))
            if r:
                rates[name].append(clients * per_client / seconds)
    pool.close()
    if sa is not None:
        engine.dispose()
    for name, rs in rates.items():
        out[name]["writes_per_s"] = round(statistics.median(rs), 1)
    if sa is not None:
        out["sqlalchemy_over_psycopg_writes"] = round(out["sqlalchemy"]["writes_per_s"]
                                                      / out["psycopg"]["writes_per_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=100, help="writes of each kind per client")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per backend (the median is reported)")
    parser.add_argument("--libraries", action="store_true", help="also psycopg 3 against SQLAlchemy Core")
    args = parser.parse_args()
    why = Cluster.unavailable()
    if why:
        sys.exit(f"bench_feedback_db: {why}")
    result = {"bench": "feedback_db", "clients": args.clients, "per_client": args.per_client, "repeats": args.repeats}
    with Cluster() as pg, tempfile.TemporaryDirectory(prefix="chatforge-sqlite-") as tmp:
        measured = bench_stores({"sqlite": str(Path(tmp) / "feedback.sqlite"), "postgresql": pg.url("bench")},
                                args.clients, args.per_client, args.repeats)
        sqlite, postgres = measured["sqlite"], measured["postgresql"]
        result.update(sqlite=sqlite, postgresql=postgres,
                      postgresql_over_sqlite={k: round(postgres[k] / sqlite[k], 2) for k in sqlite})
        print(f"{args.clients} clients x {args.per_client} writes of each kind, durable commits, "
              f"median of {args.repeats} rounds")
        print(f"{'':12} {'votes/s':>9} {'replies/s':>10}")
        for name, r in (("SQLite", sqlite), ("PostgreSQL", postgres)):
            print(f"{name:12} {r['votes_per_s']:>9.1f} {r['replies_per_s']:>10.1f}")
        ratio = result["postgresql_over_sqlite"]
        print(f"{'PG / SQLite':12} {ratio['votes_per_s']:>8.2f}x {ratio['replies_per_s']:>9.2f}x")
        if args.libraries:
            libs = bench_libraries(pg.url("libraries"), args.clients, args.per_client, args.repeats)
            result["libraries"] = libs
            print(f"\nthe same insert at {args.clients} clients: psycopg {libs['psycopg']['writes_per_s']:.1f}/s, "
                  f"installs {libs['psycopg']['installed_mib']} MiB (psycopg, psycopg-binary, psycopg-pool)")
            if isinstance(libs["sqlalchemy"], dict):
                print(f"SQLAlchemy Core {libs['sqlalchemy']['writes_per_s']:.1f}/s "
                      f"({libs['sqlalchemy_over_psycopg_writes']:.2f}x), installs "
                      f"{libs['sqlalchemy']['installed_mib']} MiB (sqlalchemy + psycopg, psycopg-binary)")
            else:
                print(f"SQLAlchemy Core: {libs['sqlalchemy']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
