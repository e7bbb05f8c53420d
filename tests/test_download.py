"""`fadscale shard-data kather16`: download (over a loopback HTTP server only), cache, md5 check, and the
one-line failures (wrong md5, server gone, truncated transfer), each leaving nothing complete-looking."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from fadscale.data.download import DATASETS, cache_root, fetch, is_named_dataset
from fadscale.errors import FadscaleError

KATHER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kather16"
CLASSES = ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO"]
PER_CLASS = 2
TOP = "Kather_texture_2016_image_tiles_5000"

pytestmark = pytest.mark.skipif(not all((KATHER / c).is_dir() for c in CLASSES),
                                reason=f"real Kather 2016 tiles not found in {KATHER} (see its README)")


@pytest.fixture(scope="module")
def served_zip(tmp_path_factory) -> tuple[bytes, str]:
    """A zip in the published layout (TOP/01_TUMOR/*.tif ...) of a few real tiles, and its md5."""
    from PIL import Image

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder in CLASSES:
            for png in sorted((KATHER / folder).glob("*.png"))[:PER_CLASS]:
                tif = io.BytesIO()
                Image.open(png).save(tif, format="TIFF")
                archive.writestr(f"{TOP}/{folder}/{png.stem}.tif", tif.getvalue())  # the published names
    data = buffer.getvalue()
    return data, hashlib.md5(data).hexdigest()


class Server:
    """A loopback HTTP server for one file; mode 'ok', or 'truncated' (full Content-Length, half the bytes)."""

    def __init__(self, data: bytes, mode: str = "ok"):
        self.data, self.mode, self.requests = data, mode, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.data)))
                self.end_headers()
                body = server.data if server.mode == "ok" else server.data[: len(server.data) // 2]
                self.wfile.write(body)
                self.close_connection = True  # then the connection closes: a transfer cut short

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/x.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(served_zip):
    srv = Server(served_zip[0])
    yield srv
    srv.stop()


def shard_data(url: str, out: Path, cache: Path | None, *extra: str, env: dict | None = None):
    """`fadscale shard-data kather16 --url URL [--cache-dir C] --out O`, as a user runs it."""
    assert url.startswith("http://127.0.0.1:"), url  # never the real network
    args = ["--url", url, *extra] + (["--cache-dir", str(cache)] if cache is not None else [])
    clean = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "FADSCALE_CACHE"}
    return subprocess.run([sys.executable, "-m", "fadscale.cli", "shard-data", "kather16", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=120,
                          env={**clean, "NO_PROXY": "127.0.0.1", **(env or {})})


def error_line(proc) -> str:
    """The failure's one line (after any progress-bar output), checked to be the only error and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr
    line = proc.stderr.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert line.startswith("error: kather16: could not download "), proc.stderr
    assert line.endswith("download it yourself and run `fadscale shard-data PATH`"), line
    return line


def files_in(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.exists() else []


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def keys(out: Path) -> dict[str, list[str]]:
    """Sample keys of every shard of an output folder, by shard file."""
    result = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            result[shard.name] = sorted({name.split(".", 1)[0] for name in tar.getnames()})
    return result


def test_download_then_shard_and_second_run_uses_the_cache(tmp_path, served_zip, server):
    data, md5 = served_zip
    cache = tmp_path / "cache"
    proc = shard_data(server.url, tmp_path / "o1", cache, "--md5", md5)
    assert proc.returncode == 0, proc.stderr
    assert server.requests == 1
    assert proc.stdout.startswith(f"wrote {len(CLASSES) * PER_CLASS} tiles"), proc.stdout
    manifest = json.loads((tmp_path / "o1/manifest.json").read_text())
    assert sum(split["count"] for split in manifest["splits"].values()) == len(CLASSES) * PER_CLASS
    assert [c["folder"] for c in manifest["classes"]] == CLASSES
    cached = list(cache.iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".zip" and md5_of(cached[0]) == md5
    assert manifest["source"]["path"] == str(cached[0])

    # Second run, cache found through FADSCALE_CACHE this time: no request, the same shards byte for byte.
    proc = shard_data(server.url, tmp_path / "o2", None, "--md5", md5, env={"FADSCALE_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert server.requests == 1
    assert keys(tmp_path / "o2") == keys(tmp_path / "o1") and keys(tmp_path / "o1")
    for shard in (tmp_path / "o1").glob("*.tar"):
        assert (tmp_path / "o2" / shard.name).read_bytes() == shard.read_bytes()


def test_a_cached_file_that_no_longer_matches_is_downloaded_again(tmp_path, served_zip, server):
    data, md5 = served_zip
    cache = tmp_path / "cache"
    assert shard_data(server.url, tmp_path / "o1", cache, "--md5", md5).returncode == 0
    [cached] = cache.iterdir()
    cached.write_bytes(data[:-10] + b"0123456789")  # replaced or damaged since
    proc = shard_data(server.url, tmp_path / "o2", cache, "--md5", md5)
    assert proc.returncode == 0, proc.stderr
    assert server.requests == 2 and list(cache.iterdir()) == [cached] and md5_of(cached) == md5


def test_wrong_checksum_is_one_line_and_keeps_nothing(tmp_path, served_zip, server):
    data, md5 = served_zip
    wrong = hashlib.md5(b"something else").hexdigest()
    proc = shard_data(server.url, tmp_path / "out", tmp_path / "cache", "--md5", wrong)
    line = error_line(proc)
    assert server.url in line and f"expected {wrong}, got {md5}" in line
    assert not files_in(tmp_path / "cache")  # neither the final name nor a temporary one
    assert not (tmp_path / "out").exists()


def test_server_gone_is_one_line_and_keeps_nothing(tmp_path, served_zip):
    gone = Server(served_zip[0])
    gone.stop()  # nothing listens on its port any more
    proc = shard_data(gone.url, tmp_path / "out", tmp_path / "cache", "--md5", served_zip[1])
    line = error_line(proc)
    assert f"could not download {gone.url}: cannot connect (Connection refused)" in line
    assert not files_in(tmp_path / "cache") and not (tmp_path / "out").exists()


def test_truncated_transfer_is_one_line_keeps_nothing_and_a_rerun_succeeds(tmp_path, served_zip, server):
    data, md5 = served_zip
    server.mode = "truncated"
    cache = tmp_path / "cache"
    proc = shard_data(server.url, tmp_path / "out", cache, "--md5", md5)
    line = error_line(proc)
    assert server.url in line and "the transfer broke off" in line
    assert f"{len(data) // 2} bytes read, {len(data) - len(data) // 2} more expected" in line
    assert not files_in(cache) and not (tmp_path / "out").exists()

    server.mode = "ok"
    proc = shard_data(server.url, tmp_path / "out", cache, "--md5", md5)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out/manifest.json").is_file() and md5_of(next(cache.iterdir())) == md5


def test_download_options_with_a_local_source_are_refused(tmp_path, served_zip):
    local = tmp_path / "k.zip"
    local.write_bytes(served_zip[0])
    proc = subprocess.run([sys.executable, "-m", "fadscale.cli", "shard-data", str(local), "--out", str(tmp_path / "o"),
                           "--md5", served_zip[1]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: --url, --md5 and --cache-dir apply to a data set to download (kather16), " \
                                  f"not to {local}"
    assert not (tmp_path / "o").exists()


def test_registry_and_cache_location(tmp_path, monkeypatch):
    assert is_named_dataset("kather16") and not is_named_dataset("procedural") and not is_named_dataset("x.zip")
    url, md5, filename = DATASETS["kather16"]
    assert url == "https://zenodo.org/records/53169/files/Kather_texture_2016_image_tiles_5000.zip?download=1"
    assert (md5, filename) == ("0ddbebfc56344752028fda72602aaade", "Kather_texture_2016_image_tiles_5000.zip")
    monkeypatch.setenv("FADSCALE_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" and cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("FADSCALE_CACHE")
    assert cache_root().name == "fadscale"
    with pytest.raises(FadscaleError, match="--md5 must be 32 hex digits, got 'abc'"):
        fetch("kather16", md5="abc", cache_dir=tmp_path)  # refused before any network access
    with pytest.raises(FadscaleError, match="nope: not a known data set"):
        fetch("nope", cache_dir=tmp_path)
