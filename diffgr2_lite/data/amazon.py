"""Amazon Beauty (McAuley et al. 2014, 5-core): the real dataset of the paper's protocol.

Every sequential-recommendation paper this project follows (S3-Rec, P5, TIGER, GR2) uses the same split:
22,363 users, 12,101 items, 198,502 interactions, each user's reviews sorted by time. Two sources give it:

* the processed pair ``gram/user_sequence.txt`` + ``derived/items.jsonl`` (small, public, already joined; see
  ``shared/data/amazon_beauty/SOURCE.md``), preferred because it needs no download;
* the canonical raw files ``reviews_Beauty_5.json.gz`` + ``meta_Beauty.json.gz`` (what the papers started from),
  fetched by :func:`download_amazon_beauty`.

Both load into the same :class:`InteractionData`, with items numbered by first appearance when users are scanned in
order (for the processed pair that is exactly the ``items.jsonl`` order), so downstream code never knows which one
was used; :func:`verify_statistics` checks the published counts.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import html
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from .catalog import Catalog, DataError, InteractionData

EXPECTED = {"users": 22363, "items": 12101, "interactions": 198502}

BASE_URL = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
REVIEWS_FILE = "reviews_Beauty_5.json.gz"
META_FILE = "meta_Beauty.json.gz"
SEQUENCES_FILE = Path("gram") / "user_sequence.txt"
ITEMS_FILE = Path("derived") / "items.jsonl"
ENV_VAR = "DIFFGR2_AMAZON_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT / "data" / "amazon_beauty"   # where `download-amazon` should put the files
DOWNLOAD_HINT = (
    "Get the data with `python -m diffgr2_lite download-amazon` (fetches {raw} into {dest}), "
    "or copy the processed pair {seq} and {items} (see {readme}) under {dest}, "
    "or point ${env} at a folder holding either pair.\n"
    "To run without it, use the synthetic smoke profile: DIFFGR2_PROFILE=smoke, "
    "or profile = \"smoke\" in the notebook's parameters cell."
)
BRAND_PLACEHOLDERS = {"", "unknown", "generic"}
# starts with a literal so the regex engine can skip ahead fast (8x faster than a leading ['"] on the meta lines);
# a spurious hit (a key ending in "asin") only costs one extra parse, never a skipped line
_ASIN_RE = re.compile(r"""asin['"]\s*:\s*['"]([^'"\\]+)['"]""")


# ----------------------------------------------------------------------------------------------------------------
# Reading lines: every failure becomes a DataError naming the file and line
# ----------------------------------------------------------------------------------------------------------------

def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, line) of a text or .gz file; a truncated/corrupt gzip becomes a DataError."""
    opener = gzip.open if path.name.endswith((".gz", ".gz.part")) else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, line
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (PermissionError, IsADirectoryError) as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}, line {lineno + 1}: not UTF-8 text ({e.reason})") from None
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(
            f"{path}, line {lineno + 1}: cannot read past here ({type(e).__name__}: {e}); "
            "the file is truncated or corrupt, fetch it again"
        ) from None


def _unescape(text: str) -> str:
    """HTML entities of the source, including the few double-encoded ones ("&amp;#8482")."""
    for _ in range(3):
        new = html.unescape(text)
        if new == text:
            break
        text = new
    return text.strip()


def _clean_title(value) -> str:
    return _unescape(str(value)) if value is not None else ""


def _clean_brand(value) -> str | None:
    if value is None:
        return None
    brand = _unescape(str(value))
    return None if brand.lower() in BRAND_PLACEHOLDERS else brand


def _clean_path(categories) -> list[str]:
    """First category path (the first one under "Beauty" if several), with the "Beauty" top level dropped."""
    if isinstance(categories, str):                      # "Beauty > Skin Care > Face"
        paths = [[c.strip() for c in categories.split(">")]] if categories.strip() else []
    elif isinstance(categories, list) and categories and all(isinstance(p, list) for p in categories):
        paths = categories
    elif isinstance(categories, list) and all(isinstance(c, str) for c in categories):
        paths = [categories] if categories else []      # a single flat path
    else:
        paths = []
    if not paths:
        return []
    path = next((p for p in paths if p and p[0] == "Beauty"), paths[0])
    path = [_unescape(str(c)) for c in path]
    if path and path[0] == "Beauty":
        path = path[1:]
    return [c for c in path if c]


def _five_core_report(sequences: list[list[int]], n_items: int) -> dict:
    """Check (not enforce) the 5-core property: every user and every item has at least 5 interactions."""
    counts = Counter(i for s in sequences for i in s)
    user_min = min((len(s) for s in sequences), default=0)
    item_min = min((counts.get(i, 0) for i in range(n_items)), default=0)
    repeats = sum(len(s) - len(set(s)) for s in sequences)
    return {"min_user_length": user_min, "min_item_count": item_min, "repeated_items_within_users": repeats,
            "ok": user_min >= 5 and item_min >= 5}


# ----------------------------------------------------------------------------------------------------------------
# Source a: the processed pair
# ----------------------------------------------------------------------------------------------------------------

def _load_processed(seq_path: Path, items_path: Path) -> InteractionData:
    item_ids, titles, brands, cats = [], [], [], []
    index: dict[str, int] = {}
    for lineno, line in _iter_lines(items_path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{items_path}, line {lineno}: not a JSON object ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("asin"), str) or not rec["asin"]:
            raise DataError(f"{items_path}, line {lineno}: expected a JSON object with an 'asin' string")
        asin = rec["asin"]
        if asin in index:
            raise DataError(f"{items_path}, line {lineno}: item {asin} listed twice")
        index[asin] = len(item_ids)
        item_ids.append(asin)
        titles.append(_clean_title(rec.get("title")))
        brands.append(_clean_brand(rec.get("brand")))
        cats.append(_clean_path(rec.get("categories") or rec.get("category_path")))

    user_ids, sequences, missing = [], [], []
    seen_users: set[str] = set()
    for lineno, line in _iter_lines(seq_path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise DataError(f"{seq_path}, line {lineno}: expected 'userID item item ...', got {line.strip()!r}")
        user, items = fields[0], fields[1:]
        if user in seen_users:
            raise DataError(f"{seq_path}, line {lineno}: user {user} appears twice")
        seen_users.add(user)
        seq = []
        for asin in items:
            i = index.get(asin)
            if i is None:
                missing.append(asin)
            else:
                seq.append(i)
        user_ids.append(user)
        sequences.append(seq)
    if missing:
        _raise_missing(sorted(set(missing)), items_path)
    if not sequences:
        raise DataError(f"{seq_path}: no user sequences in the file")
    catalog = Catalog(item_ids=item_ids, titles=titles, brands=brands, categories=cats)
    info = {"source": "processed", "files": {"sequences": str(seq_path), "items": str(items_path)},
            "five_core": _five_core_report(sequences, len(item_ids))}
    return InteractionData(name="amazon_beauty", catalog=catalog, user_ids=user_ids, sequences=sequences, info=info)


def _raise_missing(missing: list[str], meta_path: Path) -> None:
    shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
    raise DataError(f"{len(missing)} item(s) of the sequences are missing from the metadata {meta_path}: {shown}")


# ----------------------------------------------------------------------------------------------------------------
# Source b: the canonical raw files
# ----------------------------------------------------------------------------------------------------------------

def _read_reviews(path: Path) -> tuple[list[str], list[list[str]], int]:
    """Users in order of first appearance, each with ASINs sorted by unixReviewTime (stable), and the review count."""
    per_user: dict[str, list[tuple[float, str]]] = {}
    n = 0
    for lineno, line in _iter_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: not a JSON object ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object")
        try:
            user, asin, t = rec["reviewerID"], rec["asin"], float(rec["unixReviewTime"])
        except KeyError as e:
            raise DataError(f"{path}, line {lineno}: review lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError):
            raise DataError(f"{path}, line {lineno}: unixReviewTime is not a number") from None
        per_user.setdefault(str(user), []).append((t, str(asin)))
        n += 1
    if not n:
        raise DataError(f"{path}: no reviews in the file")
    users = list(per_user)
    seqs = [[a for _, a in sorted(per_user[u], key=lambda r: r[0])] for u in users]   # sorted() is stable
    return users, seqs, n


def _parse_meta_line(line: str, path: Path, lineno: int) -> dict:
    text = line.strip()
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        try:
            rec = ast.literal_eval(text)       # the 2014 release writes Python dict literals; never eval()
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise DataError(f"{path}, line {lineno}: neither JSON nor a Python dict literal "
                            f"({type(e).__name__})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("asin"), str):
        raise DataError(f"{path}, line {lineno}: expected an object with an 'asin' string")
    return rec


def _read_meta(path: Path, needed: set[str]) -> tuple[dict[str, dict], int]:
    """Metadata of the needed items. Lines of other items are only checked to look like one object (the full meta
    file has ~259k items, parsing them all with literal_eval would take minutes for nothing)."""
    found: dict[str, dict] = {}
    n = 0
    for lineno, line in _iter_lines(path):
        text = line.strip()
        if not text:
            continue
        n += 1
        if not (text.startswith("{") and text.endswith("}")):
            raise DataError(f"{path}, line {lineno}: not a JSON object or Python dict literal")
        hits = _ASIN_RE.findall(text)
        if hits and not any(a in needed and a not in found for a in hits):
            continue
        rec = _parse_meta_line(text, path, lineno)
        if rec["asin"] in needed and rec["asin"] not in found:
            found[rec["asin"]] = rec
    return found, n


def _load_raw(reviews_path: Path, meta_path: Path, reviews: tuple | None = None) -> InteractionData:
    users, raw_seqs, n_reviews = reviews if reviews is not None else _read_reviews(reviews_path)
    index: dict[str, int] = {}
    for seq in raw_seqs:
        for asin in seq:
            index.setdefault(asin, len(index))
    meta, n_meta = _read_meta(meta_path, set(index))
    missing = [a for a in index if a not in meta]
    if missing:
        _raise_missing(missing, meta_path)
    item_ids = list(index)
    recs = [meta[a] for a in item_ids]
    catalog = Catalog(
        item_ids=item_ids,
        titles=[_clean_title(r.get("title")) for r in recs],
        brands=[_clean_brand(r.get("brand")) for r in recs],
        categories=[_clean_path(r.get("categories")) for r in recs],
    )
    sequences = [[index[a] for a in seq] for seq in raw_seqs]
    info = {"source": "raw", "files": {"reviews": str(reviews_path), "meta": str(meta_path)},
            "reviews": n_reviews, "meta_lines": n_meta,
            "items_without_title": sum(1 for t in catalog.titles if not t),
            "five_core": _five_core_report(sequences, len(item_ids))}
    return InteractionData(name="amazon_beauty", catalog=catalog, user_ids=users, sequences=sequences, info=info)


# ----------------------------------------------------------------------------------------------------------------
# Public: load and verify
# ----------------------------------------------------------------------------------------------------------------

def candidate_dirs() -> list[Path]:
    """Where ``load_amazon_beauty(None)`` looks, in order: $DIFFGR2_AMAZON_DIR, <repo>/data, <repo>/../shared/data."""
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]).expanduser())
    dirs += [DEFAULT_DATA_DIR, REPO_ROOT.parent / "shared" / "data" / "amazon_beauty"]
    return dirs


def load_amazon_beauty(root: str | Path | None = None) -> InteractionData:
    """Load Amazon Beauty from the first source found: processed pair, else raw pair; ``root=None`` searches
    :func:`candidate_dirs`. A missing dataset is a :class:`DataError` that says how to get it, not a traceback."""
    dirs = [Path(root).expanduser()] if root is not None else candidate_dirs()
    looked, partial = [], []
    for d in dirs:
        pairs = [("processed", d / SEQUENCES_FILE, d / ITEMS_FILE), ("raw", d / REVIEWS_FILE, d / META_FILE)]
        for kind, a, b in pairs:
            looked.append(f"{a} + {b}")
            if a.is_file() and b.is_file():
                data = _load_raw(a, b) if kind == "raw" else _load_processed(a, b)
                data.info["root"] = str(d)
                return data
            if a.is_file() != b.is_file():
                have, lack = (a, b) if a.is_file() else (b, a)
                partial.append(f"found {have} but not {lack}")
    hint = DOWNLOAD_HINT.format(raw=f"{REVIEWS_FILE} and {META_FILE}", dest=DEFAULT_DATA_DIR,
                                seq=SEQUENCES_FILE, items=ITEMS_FILE, env=ENV_VAR,
                                readme=REPO_ROOT / "data" / "README.md")
    msg = "Amazon Beauty data not found. Looked for:\n  " + "\n  ".join(looked)
    if partial:
        msg += "\nIncomplete pairs (both files of a pair are needed):\n  " + "\n  ".join(partial)
    raise DataError(msg + "\n" + hint)


def verify_statistics(data: InteractionData) -> dict:
    """Compare users/items/interactions with the published 5-core counts: {key: (found, expected, ok)}.
    A mismatch means a different preprocessing, and numbers would not be comparable with the papers."""
    stats = data.stats()
    return {k: (stats[k], v, stats[k] == v) for k, v in EXPECTED.items()}


# ----------------------------------------------------------------------------------------------------------------
# Public: download the raw pair
# ----------------------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) of a 'bytes start-end/total' or 'bytes */total' header; None where absent."""
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _fetch(url: str, part: Path, *, timeout: float, progress: bool, _retry: bool = True) -> dict:
    """Download url into part, resuming with a Range request if part has bytes; restart from zero when the server
    ignores the range (200) or answers an unexpected one."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "diffgr2_lite-downloader"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    keep_hint = f"the partial file {part} is kept: rerun to resume"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        _, total = _content_range(e.headers.get("Content-Range") if e.headers else None)
        try:
            e.close()
        except Exception:
            pass
        if e.code == 416 and offset:
            if total == offset:                       # the .part is already complete
                return {"status": 416, "resumed_from": offset, "bytes": offset}
            if _retry:
                part.unlink()
                return _fetch(url, part, timeout=timeout, progress=progress, _retry=False)
        raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"cannot reach {url} ({reason}); check the network or pass urls=. "
                        + (keep_hint if offset else "")) from None
    with resp:
        status = resp.status
        if status == 206 and offset:
            start, _ = _content_range(resp.headers.get("Content-Range"))
            if start != offset:                       # a range we did not ask for: start over
                resp.close()
                if not _retry:
                    raise DataError(f"{url}: server answers inconsistent byte ranges")
                part.unlink()
                return _fetch(url, part, timeout=timeout, progress=progress, _retry=False)
            mode, resumed = "ab", offset
        elif status == 200:
            mode, resumed = "wb", 0                   # full body: restart cleanly (also when Range was ignored)
        else:
            raise DataError(f"download of {url} failed: unexpected HTTP status {status}")
        length = resp.headers.get("Content-Length")
        total = resumed + int(length) if length and length.isdigit() else None
        try:
            with open(part, mode) as f, tqdm(total=total, initial=resumed, unit="B", unit_scale=True,
                                             unit_divisor=1024, desc=part.name[:-5], disable=not progress) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        except (OSError, http.client.HTTPException) as e:
            raise DataError(f"download of {url} interrupted ({type(e).__name__}: {e}); {keep_hint}") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise DataError(f"download of {url} stopped at {size} of {total} bytes; {keep_hint}")
    return {"status": status, "resumed_from": resumed, "bytes": size}


def download_amazon_beauty(dest: str | Path, urls: dict | None = None, force: bool = False, *,
                           expected_reviews: int = EXPECTED["interactions"], timeout: float = 60.0,
                           progress: bool = True) -> dict[str, Path]:
    """Fetch the canonical raw pair (reviews_Beauty_5.json.gz, meta_Beauty.json.gz) into ``dest``, for when the
    processed pair is not at hand. Returns {"reviews": path, "meta": path, "record": path of DOWNLOADED.json}.

    ``urls`` maps a file name to its URL, or ``"base"`` to another base than :data:`BASE_URL` (mirrors, tests).
    Each file is written to ``<name>.part`` (resumed with an HTTP Range request; restarted from zero if the server
    ignores the range), then verified: gzip readable to the end, ``expected_reviews`` review lines, metadata parses
    and covers every reviewed item. Only then is it renamed (``os.replace``) to its final name, so a final file is
    always a verified one; a file that fails is removed and the error says why. An existing final file is not
    fetched again unless ``force``. No checksum of these files is published, so none can be checked: the sha256 of
    what was fetched is recorded in ``<dest>/DOWNLOADED.json`` for later comparison.
    """
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    urls = dict(urls or {})
    base = urls.pop("base", BASE_URL)
    base = base if base.endswith("/") else base + "/"
    names = {"reviews": REVIEWS_FILE, "meta": META_FILE}
    final = {k: dest / n for k, n in names.items()}
    use, fetched = {}, {}
    for key, name in names.items():
        part = dest / f"{name}.part"
        if final[key].is_file() and not force:
            use[key] = final[key]
            continue
        if force and part.exists():
            part.unlink()
        url = urls.get(name, base + name)
        fetched[key] = {"url": url, **_fetch(url, part, timeout=timeout, progress=progress)}
        use[key] = part

    def reject(key: str, err: DataError) -> None:
        if key in fetched:
            use[key].unlink(missing_ok=True)
            what = f"the downloaded {names[key]} was removed (final file {final[key]} not created)"
        else:
            what = f"the existing {final[key]} fails: rerun with --force (force=True in Python) to fetch it again"
        raise DataError(f"verification of {names[key]} failed: {err}\n{what}") from None

    try:
        reviews = _read_reviews(use["reviews"])
        n_reviews = reviews[2]
        if n_reviews != expected_reviews:
            raise DataError(f"{n_reviews} reviews, expected {expected_reviews} (the 5-core Beauty file)")
    except DataError as e:
        reject("reviews", e)
    try:
        data = _load_raw(use["reviews"], use["meta"], reviews)   # parses the meta of every reviewed item, checks coverage
    except DataError as e:
        reject("meta", e)

    record = {"base_url": base, "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "note": "no published checksum exists for these files; sha256 recorded for comparison only",
              "statistics": {k: v[0] for k, v in verify_statistics(data).items()},
              "five_core": data.info["five_core"], "files": {}}
    for key, name in names.items():
        if key in fetched:
            os.replace(use[key], final[key])
        record["files"][name] = {"sha256": _sha256(final[key]), "bytes": final[key].stat().st_size,
                                 "fetched_now": key in fetched, **fetched.get(key, {})}
    rec_path = dest / "DOWNLOADED.json"
    tmp = dest / "DOWNLOADED.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, rec_path)
    return {"reviews": final["reviews"], "meta": final["meta"], "record": rec_path}
