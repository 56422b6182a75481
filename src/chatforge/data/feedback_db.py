"""Where the feedback store's rows live: a SQLite file or a PostgreSQL database.

    db = open_database("runs/demo/feedback.sqlite", create=True, migrations=MIGRATIONS)
    db = open_database("postgresql://chatforge:secret@db.internal/support", create=True, migrations=MIGRATIONS)
    db.write(lambda conn: conn.execute("INSERT ... VALUES (?, ?) RETURNING id", (a, b)).fetchall())
    db.read("SELECT ...", params)        # a list of dicts

`chatforge.data.feedback.FeedbackStore` holds the rows' meaning; this module only runs its
statements. Both backends take the same SQL with `?` placeholders (turned into psycopg's `%s`),
run each `write` in one transaction that is committed (durably: SQLite `synchronous=FULL`,
PostgreSQL `synchronous_commit=on`) before it returns, and bring the schema up to date on open:
`migrations[i]` takes version i to i + 1, each in its own transaction, under a lock, so two
servers starting at once on one database migrate it once. A database from a newer chatforge is
refused. Unique and foreign-key refusals are raised as `IntegrityError`; a database that cannot
be reached or stays locked while reading or writing as `DatabaseUnavailable` (the server answers
503: try again); every other problem as a `ChatforgeError` that says what to fix.

SQLite (the default, the standard library's `sqlite3`): one file in WAL mode, one connection
behind a lock (SQLite runs one write at a time anyway), a busy timeout for other processes on
the same file. The schema version is `PRAGMA user_version`.

PostgreSQL (`--db postgresql://...`, the `postgres` extra: `pip install 'chatforge[postgres]'`):
psycopg 3 with its connection pool (`POOL_SIZE` connections per process, so concurrent writes
commit together instead of queueing behind one connection; each checked with an empty query
when taken from the pool, so that after PostgreSQL restarts only the requests made while it was
down fail). Several chatforge servers may share
one database. The tables go to the connection's default schema (`public`; another with
`?options=-csearch_path%3Dname` in the URL); the version is the one row of `chatforge_schema`.

Why psycopg 3 and not SQLAlchemy Core, measured (`benchmarks/bench_feedback_db.py --libraries`;
the figures are in docs/SERVING.md): the same insert from 32 threads ran at 0.56-0.82x of
psycopg's writes per second (six runs) through SQLAlchemy's engine (its per-statement Python work, under
the GIL); SQLAlchemy is a layer above a driver, not a driver, so on PostgreSQL it still needs
psycopg: 39.2 MiB installed against 12.4 MiB for psycopg with its pool. It would only shorten
the code if it ran SQLite too, and then every SQLite user would need it; as an extra beside the
standard library's sqlite3 it adds a second way to say the same statements. psycopg takes the
store's SQL as it is: the PostgreSQL side below is about 100 lines.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Callable, Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

from chatforge.errors import ChatforgeError

BUSY_TIMEOUT_S = 10.0      # how long a write waits for another process holding the file or a pooled connection
POOL_SIZE = 8              # PostgreSQL connections per process
CONNECT_TIMEOUT_S = 10     # seconds to reach the PostgreSQL server
# psycopg's pool retries a lost connection with growing delays (1, 2, 4 s, ...) for this long,
# then gives up until the next request asks again: short, so that once PostgreSQL is back after
# an outage a request waits seconds for a connection, not the next retry minutes away.
RECONNECT_S = 5.0
URL_SCHEMES = ("postgresql://", "postgres://")
# The advisory lock two processes migrating one PostgreSQL database take in turn ("chatforg").
MIGRATION_LOCK = 0x63686174666F7267
OUR_TABLES = ("conversations", "messages", "feedback", "tickets")

Migration = Callable[[object], None]


class IntegrityError(Exception):
    """A unique or foreign-key constraint refused the write (on either backend)."""


class DatabaseUnavailable(ChatforgeError):
    """A read or write failed for the database's sake, not the caller's (down, unreachable, locked,
    a full disk): trying again later may work."""


def is_url(target) -> bool:
    return isinstance(target, str) and "://" in target


def open_database(target, *, create: bool, migrations: Sequence[Migration]):
    """A `SqliteDatabase` for a file path, a `PostgresDatabase` for a postgresql:// URL."""
    if is_url(target):
        if not target.startswith(URL_SCHEMES):
            raise ChatforgeError(f"--db {redact(target)}: a database is a SQLite file path or a postgresql:// URL "
                                 "(postgresql://USER:PASSWORD@HOST:PORT/DATABASE)")
        return PostgresDatabase(target, create=create, migrations=migrations)
    return SqliteDatabase(Path(target), create=create, migrations=migrations)


def redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _first(rows: list):
    return rows[0] if rows else None


# --------------------------------------------------------------------------- SQLite

class SqliteDatabase:
    dialect = "sqlite"

    def __init__(self, path: Path, *, create: bool, migrations: Sequence[Migration]):
        self.path = path
        self.where = str(path)
        self._lock = threading.Lock()
        if path.is_dir():
            raise ChatforgeError(f"{path} is a folder; give the database file, e.g. {path / 'feedback.db'}")
        if not path.exists():
            if not create:
                raise ChatforgeError(f"feedback database {path} does not exist; `chatforge serve --db {path}` creates it")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ChatforgeError(f"cannot create the folder of {path}: {e.strerror or e}") from None
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False:
            # the one connection is shared by every thread, behind self._lock.
            self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise ChatforgeError(f"cannot open {path}: {e}; check that its folder exists and is writable") from None
        try:
            self._setup(migrations)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise ChatforgeError(self._explain(e)) from None
        except BaseException:
            self._db.close()
            raise

    def _explain(self, e: sqlite3.DatabaseError) -> str:
        msg, path = str(e), self.path
        if "not a database" in msg or "malformed" in msg:
            return (f"{path} is not a SQLite database (or is damaged); give the file `chatforge serve --db` "
                    "writes, or a new file name")
        if "readonly" in msg or "unable to open" in msg or "disk I/O" in msg:
            return (f"cannot write {path} ({msg}): SQLite needs write access to the file and its folder "
                    f"(it keeps {path.name}-wal and {path.name}-shm beside it)")
        if "locked" in msg or "busy" in msg:
            return (f"{path} stayed locked by another process for {BUSY_TIMEOUT_S:.0f} s ({msg}); "
                    "try again, or stop the program that holds it")
        return f"{path}: {msg}"

    def _setup(self, migrations: Sequence[Migration]) -> None:
        db = self._db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ChatforgeError(f"{self.path}: SQLite could not switch to WAL mode (got {mode!r}); "
                                 "put the database on a local disk")
        # FULL, not NORMAL: in WAL mode NORMAL already survives a crash of this process (a SIGKILL),
        # but a power cut may lose the last commits. The server answers "stored" only after the
        # commit, and one fsync per reply or click costs milliseconds next to generating a reply.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        target = len(migrations)
        while True:
            with self._lock:
                db.execute("BEGIN IMMEDIATE")   # re-read the version inside the write lock: another
                try:                            # process may be migrating the same file
                    version = db.execute("PRAGMA user_version").fetchone()[0]
                    if version > target:
                        raise ChatforgeError(
                            f"{self.path} was written by a newer chatforge (schema version {version}; this one "
                            f"knows up to {target}); upgrade chatforge to read it")
                    if version == target:
                        db.execute("COMMIT")
                        return
                    if version == 0:
                        tables = [r[0] for r in db.execute(
                            "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
                        if tables:
                            raise ChatforgeError(f"{self.path} is a SQLite database of another program (tables: "
                                                 f"{', '.join(tables)}); give a new file name")
                    migrations[version](db)
                    db.execute(f"PRAGMA user_version={version + 1}")
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise

    def write(self, work: Callable[[sqlite3.Connection], object]):
        """Run `work(connection)` in one transaction and commit before returning its result."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                result = work(db)
                db.execute("COMMIT")
                return result
            except sqlite3.DatabaseError as e:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(e, sqlite3.IntegrityError):
                    raise IntegrityError(str(e)) from None
                raise DatabaseUnavailable(self._explain(e)) from None
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def read(self, sql: str, params: Iterable = ()) -> list[dict]:
        with self._lock:
            try:
                cur = self._db.execute(sql, tuple(params))
                cur.row_factory = sqlite3.Row
                return [dict(r) for r in cur.fetchall()]
            except sqlite3.OperationalError as e:
                raise DatabaseUnavailable(self._explain(e)) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------- PostgreSQL

class _PgConnection:
    """A psycopg connection that takes the store's SQL as written for sqlite3 (`?` placeholders)."""

    dialect = "postgresql"

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sql: str, params: Sequence = ()):
        # The store's statements hold no `?` or `%` of their own: every value is a parameter.
        return self.conn.execute(sql.replace("?", "%s"), tuple(params) or None)


class PostgresDatabase:
    dialect = "postgresql"

    def __init__(self, url: str, *, create: bool, migrations: Sequence[Migration]):
        self.path = None
        self.where = redact(url)
        try:
            import psycopg  # lazy: the optional `postgres` extra, needed only for --db postgresql://
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise ChatforgeError(f"--db {self.where} needs the PostgreSQL driver: pip install 'chatforge[postgres]'"
                                 ) from None
        self._psycopg = psycopg
        try:
            # One plain connection first: it reports why a connection fails (the pool only retries),
            # and it runs the migrations.
            with psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                self._configure(conn)
                self._migrate(conn, create, migrations)
        except psycopg.Error as e:
            raise ChatforgeError(self._explain(e)) from None
        self._pool = ConnectionPool(url, min_size=1, max_size=POOL_SIZE, timeout=BUSY_TIMEOUT_S, open=False,
                                    kwargs={"connect_timeout": CONNECT_TIMEOUT_S}, configure=self._configure,
                                    check=ConnectionPool.check_connection, reconnect_timeout=RECONNECT_S,
                                    name="chatforge-feedback")
        self._pool.open(wait=True, timeout=BUSY_TIMEOUT_S + CONNECT_TIMEOUT_S)

    @staticmethod
    def _configure(conn) -> None:
        # "stored" is answered after the commit: the commit must wait for the WAL on disk even
        # where the server's default says otherwise.
        conn.autocommit = True
        conn.execute("SET synchronous_commit TO on")
        conn.autocommit = False

    def _explain(self, e: Exception) -> str:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if isinstance(e, self._psycopg.OperationalError):
            return (f"cannot use PostgreSQL at {self.where}: {msg}; check the URL "
                    "(postgresql://USER:PASSWORD@HOST:PORT/DATABASE), that the server runs and that it lets "
                    "this user in")
        if isinstance(e, self._psycopg.errors.InsufficientPrivilege):
            return (f"PostgreSQL at {self.where}: {msg}; the user needs the right to create tables "
                    "(GRANT CREATE ON SCHEMA public TO USER) on the first start, and to read and write them")
        return f"PostgreSQL at {self.where}: {msg}"

    def _migrate(self, conn, create: bool, migrations: Sequence[Migration]) -> None:
        target = len(migrations)
        while True:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                known = conn.execute("SELECT to_regclass('chatforge_schema') IS NOT NULL").fetchone()[0]
                if not known:
                    if not create:
                        raise ChatforgeError(f"{self.where} holds no chatforge feedback yet; "
                                             f"`chatforge serve --db URL` creates its tables")
                    ours = [t for t in OUR_TABLES
                            if conn.execute("SELECT to_regclass(%s) IS NOT NULL", (t,)).fetchone()[0]]
                    if ours:
                        raise ChatforgeError(f"{self.where} already has tables of another program named "
                                             f"{', '.join(ours)}; give chatforge its own database or schema")
                    conn.execute("CREATE TABLE chatforge_schema (version INTEGER NOT NULL)")
                    conn.execute("INSERT INTO chatforge_schema VALUES (0)")
                version = conn.execute("SELECT version FROM chatforge_schema").fetchone()[0]
                if version > target:
                    raise ChatforgeError(f"{self.where} was written by a newer chatforge (schema version {version}; "
                                         f"this one knows up to {target}); upgrade chatforge to read it")
                if version == target:
                    return
                migrations[version](_PgConnection(conn))
                conn.execute("UPDATE chatforge_schema SET version = %s", (version + 1,))

    def write(self, work: Callable[[_PgConnection], object]):
        """Run `work(connection)` in one transaction and commit before returning its result."""
        psycopg = self._psycopg
        from psycopg_pool import PoolTimeout  # lazy: the optional `postgres` extra

        try:
            with self._pool.connection() as conn, conn.transaction():
                return work(_PgConnection(conn))
        except psycopg.errors.IntegrityError as e:
            raise IntegrityError(str(e)) from None
        except PoolTimeout:
            raise DatabaseUnavailable(f"no connection to PostgreSQL at {self.where} within {BUSY_TIMEOUT_S:.0f} s "
                                      "(the server is down or every pooled connection is busy); try again") from None
        except psycopg.Error as e:
            raise DatabaseUnavailable(self._explain(e)) from None

    def read(self, sql: str, params: Iterable = ()) -> list[dict]:
        from psycopg.rows import dict_row  # lazy: the optional `postgres` extra
        from psycopg_pool import PoolTimeout  # lazy: the optional `postgres` extra

        try:
            with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                return cur.execute(sql.replace("?", "%s"), tuple(params) or None).fetchall()
        except PoolTimeout:
            raise DatabaseUnavailable(f"no connection to PostgreSQL at {self.where} within {BUSY_TIMEOUT_S:.0f} s "
                                      "(the server is down or every pooled connection is busy); try again") from None
        except self._psycopg.Error as e:
            raise DatabaseUnavailable(self._explain(e)) from None

    def close(self) -> None:
        self._pool.close()
