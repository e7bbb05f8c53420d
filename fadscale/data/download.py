"""Named data sets: `fadscale shard-data kather16 --out DIR` downloads the published zip itself.

What a user gets: no manual download, no unzipping, no checksum to compare by hand. The zip is fetched
once (with a progress bar) into the user's cache (FADSCALE_CACHE, else ~/.cache/fadscale), its md5 is
checked against the published one, and later runs use the cached copy without touching the network.
The download goes to a temporary name and is renamed only once complete and verified (pooch does
this), so an interrupted or corrupted transfer never leaves a file that looks complete; a cached file
that no longer matches its md5 is downloaded again. Every failure (offline, HTTP error, broken
transfer, checksum mismatch) is one line naming the URL and what went wrong, and the way round it:
download the file yourself and shard the local copy.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from tqdm import tqdm

from fadscale.errors import FadscaleError

# name -> (url, md5, file name in the cache)
DATASETS: dict[str, tuple[str, str, str]] = {
    "kather16": ("https://zenodo.org/records/53169/files/Kather_texture_2016_image_tiles_5000.zip?download=1",
                 "0ddbebfc56344752028fda72602aaade", "Kather_texture_2016_image_tiles_5000.zip"),
}


class _Bar(tqdm):
    """pooch uses a bar it is given only if the bar is truthy, which a tqdm is not before its total is known."""

    def __bool__(self) -> bool:
        return True


def is_named_dataset(src: str) -> bool:
    """True when `src` names a data set fadscale can download ('kather16')."""
    return str(src) in DATASETS


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $FADSCALE_CACHE, else the user's cache folder (~/.cache/fadscale on Linux)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("FADSCALE_CACHE"):
        return Path(os.environ["FADSCALE_CACHE"]).expanduser()
    import pooch

    return Path(pooch.os_cache("fadscale"))


def fetch(name: str, *, url: str | None = None, md5: str | None = None, cache_dir: str | os.PathLike | None = None,
          progress: bool = True) -> Path:
    """The local path of data set `name`'s file, downloaded and md5-checked unless already cached.

    `url` and `md5` point at a mirror (default: the published ones). A file whose md5 is not the
    published one is cached under its own name, so it never replaces a verified copy.
    """
    if name not in DATASETS:
        raise FadscaleError(f"{name}: not a known data set (known: {', '.join(sorted(DATASETS))})")
    default_url, default_md5, filename = DATASETS[name]
    url = url or default_url
    md5 = (md5 or default_md5).lower().removeprefix("md5:")
    if not re.fullmatch(r"[0-9a-f]{32}", md5):
        raise FadscaleError(f"--md5 must be 32 hex digits, got {md5!r}")
    if md5 != default_md5:
        filename = f"{Path(filename).stem}-md5-{md5}{Path(filename).suffix}"
    root = cache_root(cache_dir)
    import pooch

    def download(url_, output_file, pooch_):  # pooch's HTTP downloader, with a bar closed even on failure
        bar = _Bar(desc=name, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, disable=not progress)
        try:
            pooch.HTTPDownloader(progressbar=bar if progress else False, chunk_size=2**20)(url_, output_file, pooch_)
        except BaseException:
            bar.leave = False  # erase it: the error line follows
            raise
        finally:
            bar.close()

    try:
        return Path(pooch.retrieve(url, known_hash=f"md5:{md5}", fname=filename, path=root,
                                   downloader=download if url.startswith(("http://", "https://")) else None,
                                   progressbar=progress))
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        raise FadscaleError(f"{name}: could not download {url}: {_reason(exc, md5, root)}; "
                            f"download it yourself and run `fadscale shard-data PATH`") from exc


def _reason(exc: Exception, md5: str, root: Path) -> str:
    """What went wrong, in a few words."""
    import requests

    if isinstance(exc, ValueError) and (got := re.search(r"but got ([0-9a-fA-F]+)", str(exc))):
        return f"md5 mismatch: expected {md5}, got {got.group(1)} (the download was deleted)"
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"the server answered HTTP {exc.response.status_code} {exc.response.reason}"
    if isinstance(exc, requests.Timeout):
        return "no answer from the server (timed out)"
    if isinstance(exc, requests.ConnectionError) and not isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"cannot connect ({_root_cause(exc)})"
    if isinstance(exc, requests.RequestException):
        return f"the transfer broke off ({_root_cause(exc)})"
    if isinstance(exc, OSError):
        return f"cannot write the cache folder {root} ({_root_cause(exc)}); choose another with --cache-dir"
    return " ".join(str(exc).split()) or type(exc).__name__


def _root_cause(exc: BaseException) -> str:
    """The innermost useful message of a chain of wrapped errors: 'Connection refused',
    'IncompleteRead(1024 bytes read, 1024 more expected)'."""
    seen, todo, last = set(), [exc], exc
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        last = error
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        todo.extend(e for e in (error.__context__, error.__cause__, getattr(error, "reason", None), *error.args)
                    if isinstance(e, BaseException))
    return " ".join(str(last).split())[:200] or type(last).__name__
