"""An S3-compatible object store (the in-cluster MinIO or similar): download, upload, .tgz folders.

Used by `sovllm models fetch` (the serving init container) and by stage folders given as
`s3://bucket/key.tgz` in `project.locations` / `project.documents` (`materialised`): the archive is
downloaded and unpacked before the stage, and the stage's output packed and uploaded after it
succeeds. Credentials come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`; the endpoint from
`cluster.object_store` (its host must be in `egress.allow` unless it is loopback).
"""

from __future__ import annotations

import atexit
import io
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sovllm.config import Config
from sovllm.errors import ConfigError, InputError


class MissingObject(InputError):
    """The key does not exist in the bucket."""


LOCATIONS = ("chunks", "pairs", "shards", "splits", "adapter", "report", "mlflow")


@dataclass
class Store:
    """Where the archives are: an S3-compatible endpoint (http(s)://host:port) and a bucket."""

    endpoint: str
    bucket: str
    region: str = "us-east-1"

    def client(self):
        try:
            import boto3
        except ImportError:
            raise InputError("the object store client needs boto3", hint="pip install 'sovllm[cluster]'") from None
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region)

    def download(self, key: str, target: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client().download_file(self.bucket, key, str(target))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            kind = MissingObject if code in ("404", "NoSuchKey", "NotFound") else InputError
            raise kind(f"s3://{self.bucket}/{key} at {self.endpoint}: {code or exc}",
                             hint="upload the archive there, or fix the key and the credentials Secret") from None
        except BotoCoreError as exc:
            raise InputError(f"s3://{self.bucket}/{key} at {self.endpoint}: {exc}",
                             hint="check the object store's endpoint and that this pod may reach it") from None

    def upload(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client().put_object(Bucket=self.bucket, Key=key, Body=data)
        except (BotoCoreError, ClientError) as exc:
            raise InputError(f"s3://{self.bucket}/{key} at {self.endpoint}: upload failed ({exc})",
                             hint="check the credentials Secret and the bucket") from None


def unpack(archive: Path, staging: Path) -> Path:
    """The archive's one top-level folder, unpacked under `staging`."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            tar.extractall(staging, filter="data")  # no absolute paths, links out of the folder, devices
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{archive.name}: not a readable .tgz ({exc})", hint="create it with 'tar czf NAME.tgz FOLDER'") from None
    entries = list(staging.iterdir())
    if len(entries) != 1 or not entries[0].is_dir():
        raise InputError(f"{archive.name}: must hold one top-level folder, found {sorted(e.name for e in entries)[:5]}",
                         hint="create it with 'tar czf NAME.tgz -C PARENT FOLDER'")
    return entries[0]



def parse_url(url: str) -> tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`."""
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise ConfigError(f"{url!r}: expected s3://BUCKET/KEY.tgz")
    return bucket, key


def pack(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(str(folder), arcname=folder.name)
    return buffer.getvalue()


def _store(cfg: Config, bucket: str) -> Store:
    section = cfg.cluster.object_store
    return Store(f"{'http' if section.insecure else 'https'}://{section.endpoint}", bucket)


@contextmanager
def materialised(cfg: Config, outputs: tuple[str, ...]):
    """While a stage runs: every `s3://` stage folder (and `project.documents`) downloaded and
    unpacked into a temporary folder, the config pointed there; after the stage succeeded, the
    `outputs` locations packed and uploaded back. A missing output archive is a first run (an empty
    folder); a missing input archive is an error naming the URL."""
    names = {n: getattr(cfg.project.locations, n) for n in LOCATIONS}
    names["documents"] = cfg.project.documents
    remote = {n: url for n, url in names.items() if isinstance(url, str) and url.startswith("s3://")}
    if not remote:
        yield
        return
    # kept until the process ends: the command prints from the stage's folders after the stage
    tmp = tempfile.mkdtemp(prefix="sovllm-s3-")
    atexit.register(shutil.rmtree, tmp, True)
    for name, url in remote.items():
        bucket, key = parse_url(url)
        local = Path(tmp) / name
        archive = Path(tmp) / f".{name}.tgz"
        try:
            _store(cfg, bucket).download(key, archive)
        except MissingObject:
            if name not in outputs:
                raise
            local.mkdir()  # this stage's own output does not exist yet
        else:
            unpack(archive, Path(tmp) / f".{name}.unpacked").rename(local)
            archive.unlink()
        if name == "documents":
            cfg.project.documents = str(local)
        else:
            setattr(cfg.project.locations, name, str(local))
    yield
    for name in outputs:
        if name in remote:
            bucket, key = parse_url(remote[name])
            _store(cfg, bucket).upload(key, pack(Path(tmp) / name))
