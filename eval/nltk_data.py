"""The NLTK data CHAIR needs, found or fetched the way NLTK users do it.

CHAIR's caption parser (eval/chair.py) tokenizes with punkt_tab, POS-tags with the averaged
perceptron tagger and lemmatizes with WordNet. `ensure()` looks for those resources, in order:

1. the folders of `NLTK_DATA` (NLTK reads the variable itself) and NLTK's usual places
   (~/nltk_data, /usr/share/nltk_data, ...);
2. `../shared/nltk_data` beside this checkout, where it exists (the project's CI keeps one there);
3. the project's cache, `$LVLM_CACHE/nltk_data` (default ~/.cache/lvlm/nltk_data).

What is still missing is downloaded into the cache on first use with NLTK's own downloader (one
progress line per package on stderr). The download source is NLTK's index, or the one that NLTK's
own `NLTK_DOWNLOAD_URL` names (file:// included: the tests serve a stub index from a folder). When it cannot be reached
(offline) or `LVLM_NLTK_DOWNLOAD=0`, the error is one line that names the exact command to run,
with this interpreter (the project's venv), and the folder it writes to.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from lvlm_hallu.eval.errors import NLTKDataError

# (resource path for nltk.data.find, downloader package name)
RESOURCES = (
    ("tokenizers/punkt_tab/english/", "punkt_tab"),
    ("taggers/averaged_perceptron_tagger_eng/", "averaged_perceptron_tagger_eng"),
    ("corpora/wordnet", "wordnet"),
)
PACKAGES = tuple(package for _, package in RESOURCES)
INDEX_TIMEOUT_S = 10  # how long the reachability check of the download source waits


def shared_dir() -> Path:
    """../shared/nltk_data beside the checkout that holds this package (may not exist)."""
    return Path(__file__).resolve().parents[2] / "shared" / "nltk_data"


def cache_dir() -> Path:
    """The project's own NLTK data folder: $LVLM_CACHE/nltk_data (default ~/.cache/lvlm/nltk_data)."""
    return Path(os.environ.get("LVLM_CACHE", Path.home() / ".cache" / "lvlm")) / "nltk_data"


def search_path() -> list[str]:
    """nltk.data.path with the shared folder (when present) and the project cache added last."""
    import nltk

    shared, cache = str(shared_dir()), str(cache_dir())
    nltk.data.path[:] = [p for p in nltk.data.path if p not in (shared, cache)]  # ours last, in order
    nltk.data.path.extend([shared, cache] if Path(shared).is_dir() else [cache])
    return list(nltk.data.path)


def missing() -> list[str]:
    """Packages among PACKAGES that no folder of the search path holds."""
    import nltk

    search_path()
    out = []
    for resource, package in RESOURCES:
        try:
            nltk.data.find(resource)
        except LookupError:
            out.append(package)
    return out


def download_command(packages: list[str] | tuple[str, ...] = PACKAGES, target: Path | None = None) -> str:
    """The shell command that installs `packages` where `ensure()` looks, with this interpreter."""
    target = target or cache_dir()
    return " ".join(shlex.quote(x) for x in (sys.executable, "-m", "nltk.downloader", "-d", str(target), *packages))


def _index_url() -> str:
    from nltk.downloader import Downloader

    return os.environ.get("NLTK_DOWNLOAD_URL") or Downloader.DEFAULT_URL


def _reachable(url: str) -> str | None:
    """None when the download index answers, else why not (one phrase)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=INDEX_TIMEOUT_S) as response:
            response.read(1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        return str(getattr(err, "reason", err))
    return None


def download(packages: list[str], target: Path, *, index_url: str | None = None, stream=None) -> None:
    """Download `packages` into `target` with nltk.downloader, one progress line per package.

    Raises NLTKDataError (one line, with the command to run) when the source cannot be reached
    or a package does not arrive."""
    from nltk.downloader import Downloader

    stream = stream or sys.stderr
    url = index_url or _index_url()
    why = _reachable(url)
    if why is not None:
        raise NLTKDataError(f"NLTK data missing for CHAIR ({', '.join(packages)}) and its download source is "
                            f"unreachable ({why}); with network run: {download_command(packages, target)}")
    target.mkdir(parents=True, exist_ok=True)
    downloader = Downloader(server_index_url=url)
    for n, package in enumerate(packages, 1):
        print(f"NLTK data for CHAIR: downloading {package} ({n}/{len(packages)}) into {target}", file=stream,
              flush=True)
        try:
            ok = downloader.download(package, download_dir=str(target), quiet=True, raise_on_error=True)
        except Exception as err:  # the downloader's own errors (ValueError, OSError, HTTP ...): say which package
            ok, why = False, f"{type(err).__name__}: {err}".replace("\n", " ")
        else:
            why = "the downloader reported a failure"
        if not ok:
            raise NLTKDataError(f"NLTK data for CHAIR: downloading {package} failed ({why}); "
                                f"run: {download_command(packages, target)}")


def ensure(*, allow_download: bool | None = None, stream=None) -> None:
    """Make the resources CHAIR needs findable by NLTK: found, else downloaded to the cache.

    `allow_download` defaults to the LVLM_NLTK_DOWNLOAD variable (anything but '0' allows it)."""
    lacking = missing()
    if not lacking:
        return
    if allow_download is None:
        allow_download = os.environ.get("LVLM_NLTK_DOWNLOAD", "1") != "0"
    if not allow_download:
        raise NLTKDataError(f"NLTK data missing for CHAIR ({', '.join(lacking)}); run: "
                            f"{download_command(lacking)} (or point NLTK_DATA at a folder that holds it)")
    download(lacking, cache_dir(), stream=stream)
    still = missing()
    if still:
        raise NLTKDataError(f"NLTK data for CHAIR still missing after the download ({', '.join(still)}); "
                            f"run: {download_command(still)}")


def main() -> None:
    """`python -m lvlm_hallu.eval.nltk_data`: fetch what is missing (used by `make install`)."""
    try:
        ensure(allow_download=True)
    except NLTKDataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"NLTK data for CHAIR: present ({', '.join(PACKAGES)})")


if __name__ == "__main__":
    main()
