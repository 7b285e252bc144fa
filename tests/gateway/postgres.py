"""A throwaway PostgreSQL cluster on a loopback port, for the usage store's tests.

initdb and postgres refuse to run as root; as root the cluster runs as the `postgres` system user
(Debian's package creates it) in a folder it owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time

from sovllm.procs import dies_with_parent
from sovllm.serve.vllm_server import free_port


def binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


class Postgres:
    def __init__(self):
        bindir = binaries()
        self.data = tempfile.mkdtemp(prefix="sovllm-pg-")
        self.as_user: list[str] = []
        if os.getuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.data, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*self.as_user, f"{bindir}/initdb", "-D", self.data, "-A", "trust", "-U", "sovllm", "-N",
                        "--no-instructions"], check=True, capture_output=True)
        self.port = free_port("127.0.0.1")
        self.proc = subprocess.Popen(
            [*self.as_user, f"{bindir}/postgres", "-D", self.data, "-p", str(self.port), "-k", self.data,
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=dies_with_parent())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = subprocess.run([f"{bindir}/pg_isready", "-h", "127.0.0.1", "-p", str(self.port)],
                                   capture_output=True)
            if ready.returncode == 0:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}")
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError("postgres did not accept connections in 60 s")
        self.url = f"postgresql+psycopg://sovllm@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # "smart" shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.data, ignore_errors=True)
