"""A throw-away PostgreSQL cluster for tests and benchmarks: `initdb` in a temporary folder, a
server listening on a unix socket in that folder only (no TCP port to collide with), trust
authentication, stopped and deleted at the end.

    with Cluster() as pg:                # or pytest.skip(why) when `Cluster.unavailable()` says why
        url = pg.url("feedback")         # a new database: postgresql://postgres@/feedback?host=...

PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` system user
(Debian's `postgresql` package makes it; `make test` installs the package where it is missing).
The binaries are looked up in Debian's /usr/lib/postgresql/<version>/bin, then on PATH.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

PORT = 5432            # only names the socket file (.s.PGSQL.5432) in the cluster's private folder


def _bin_dir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Cluster:
    """A private PostgreSQL server; `url(db)` creates database `db` and returns its URL."""

    @staticmethod
    def unavailable() -> str | None:
        """Why no cluster can be started here (None: it can)."""
        if _bin_dir() is None:
            return ("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH): "
                    "`apt-get install postgresql`, which `make test` does as root")
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return ("running as root, and PostgreSQL refuses root: there is no `postgres` system user to run "
                        "it as (Debian's postgresql package creates one)")
            if shutil.which("runuser") is None:
                return "running as root without `runuser` to start PostgreSQL as the postgres user"
        return None

    def __init__(self):
        why = self.unavailable()
        if why:
            raise RuntimeError(why)
        self.bin = _bin_dir()
        # Under /tmp, not pytest's private tmp_path: the postgres user must be able to enter it.
        self.root = Path(tempfile.mkdtemp(prefix="chatforge-pg-"))
        self.data, self.socket = self.root / "data", self.root
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:
            os.chmod(self.root, 0o700)
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8", "--no-sync")
        self.up()
        self._started = True

    def up(self) -> None:
        """Start the server (again)."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "-o",
                  f"-k {self.socket} -c listen_addresses='' -p {PORT} -c max_connections=200", "start")

    def down(self) -> None:
        """Stop the server as an outage would (its connections are cut); `up()` starts it again."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if r.returncode:
            log = self.root / "server.log"
            raise RuntimeError(f"{tool} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}"
                               + (f"\n{log.read_text()[-2000:]}" if log.exists() else ""))

    def url(self, database: str = "chatforge") -> str:
        """A new, empty database `database` in this cluster, as a URL for `chatforge serve --db`."""
        import psycopg

        with psycopg.connect(self._conninfo("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        return self._conninfo(database)

    def _conninfo(self, database: str) -> str:
        return f"postgresql://{self.user}@/{database}?host={self.socket}&port={PORT}"

    def stop(self) -> None:
        if getattr(self, "_started", False):
            self._started = False
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            finally:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
