"""Amazon Beauty loader and downloader: tiny fixtures in tmp dirs, a local HTTP server, and the real shared files."""
from __future__ import annotations

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from diffgr2_lite.data import amazon
from diffgr2_lite.data.amazon import (
    EXPECTED, META_FILE, REVIEWS_FILE, download_amazon_beauty, load_amazon_beauty, verify_statistics,
)
from diffgr2_lite.data.catalog import DataError


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------

ITEMS = [
    {"asin": "I1", "title": "Rose &amp; Oud Cream", "categories": [["Beauty", "Skin Care", "Face", "Creams"]],
     "category_path": "Beauty > Skin Care > Face > Creams", "brand": "Acme &#39;s"},
    {"asin": "I2", "title": "Shampoo", "categories": [["Beauty", "Hair Care", "Shampoos"], ["Clothing", "Men"]],
     "brand": "Unknown"},
    {"asin": "I3", "title": "Polish", "category_path": "Beauty > Makeup > Nails", "brand": None},
    {"asin": "I4", "title": "Brush", "categories": [["Beauty", "Tools & Accessories"]], "brand": "Generic"},
]


def write_processed(root: Path, items=ITEMS, lines=("U1 I2 I1 I3", "U2 I4 I2")) -> Path:
    (root / "gram").mkdir(parents=True)
    (root / "derived").mkdir(parents=True)
    (root / "gram" / "user_sequence.txt").write_text("\n".join(lines) + "\n")
    (root / "derived" / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return root


REVIEWS = [  # file order: U2 appears first; U1's ties keep file order (I3 before I1 at t=200)
    {"reviewerID": "U2", "asin": "I2", "unixReviewTime": 50},
    {"reviewerID": "U1", "asin": "I3", "unixReviewTime": 200},
    {"reviewerID": "U1", "asin": "I2", "unixReviewTime": 100},
    {"reviewerID": "U1", "asin": "I1", "unixReviewTime": 200},
    {"reviewerID": "U2", "asin": "I1", "unixReviewTime": 10},
]
META_LINES = [  # Python literals as in the 2014 release, plus one strict JSON line and one unreviewed item
    "{'asin': 'I9', 'title': 'never reviewed', 'categories': [['Beauty']]}",
    "{'asin': 'I1', 'related': {'also_bought': ['I2', 'I3']}, 'title': 'Rose &amp; Oud', 'price': 3.5, "
    "'salesRank': {'Beauty': 12}, 'categories': [['Beauty', 'Skin Care', 'Face', 'Creams & Moisturizers']], "
    "'brand': 'Acme'}",
    "{'asin': 'I2', 'title': \"Kid's Shampoo\", 'brand': 'Unknown', "
    "'categories': [['Beauty', 'Hair Care'], ['Health', 'Soap']]}",
    json.dumps({"asin": "I3", "title": "Polish", "brand": "", "categories": [["Beauty", "Makeup", "Nails"]]}),
]


def gz_bytes(lines) -> bytes:
    return gzip.compress("".join(line + "\n" for line in lines).encode())


def reviews_lines(reviews=REVIEWS):
    return [json.dumps(r) for r in reviews]


def write_raw(root: Path, reviews=None, meta=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / REVIEWS_FILE).write_bytes(gz_bytes(reviews_lines() if reviews is None else reviews))
    (root / META_FILE).write_bytes(gz_bytes(META_LINES if meta is None else meta))
    return root


# ---------------------------------------------------------------------------------------------------------------
# Loader: processed pair
# ---------------------------------------------------------------------------------------------------------------

def test_processed_pair(tmp_path):
    data = load_amazon_beauty(write_processed(tmp_path))
    cat = data.catalog
    assert cat.item_ids == ["I1", "I2", "I3", "I4"]                # items.jsonl order
    assert data.user_ids == ["U1", "U2"]
    assert data.sequences == [[1, 0, 2], [3, 1]]
    assert cat.titles[0] == "Rose & Oud Cream"
    assert cat.brands == ["Acme 's", None, None, None]
    assert cat.categories == [["Skin Care", "Face", "Creams"], ["Hair Care", "Shampoos"], ["Makeup", "Nails"],
                              ["Tools & Accessories"]]
    assert data.info["source"] == "processed"
    assert data.info["files"]["items"].endswith("items.jsonl")
    assert data.info["five_core"]["ok"] is False                   # reported, not enforced
    assert data.stats()["interactions"] == 5


def test_processed_preferred_over_raw(tmp_path):
    write_processed(tmp_path)
    write_raw(tmp_path)
    assert load_amazon_beauty(tmp_path).info["source"] == "processed"


# ---------------------------------------------------------------------------------------------------------------
# Loader: raw pair
# ---------------------------------------------------------------------------------------------------------------

def test_raw_pair(tmp_path):
    data = load_amazon_beauty(write_raw(tmp_path))
    cat = data.catalog
    assert data.user_ids == ["U2", "U1"]                           # first appearance in the reviews file
    # U2: I1 (t=10), I2 (t=50); U1: I2 (100), I3 (200), I1 (200, tie keeps file order)
    assert cat.item_ids == ["I1", "I2", "I3"]                      # first appearance scanning users, unreviewed I9 out
    assert data.sequences == [[0, 1], [1, 2, 0]]
    assert cat.titles == ["Rose & Oud", "Kid's Shampoo", "Polish"]
    assert cat.brands == ["Acme", None, None]
    assert cat.categories == [["Skin Care", "Face", "Creams & Moisturizers"], ["Hair Care"], ["Makeup", "Nails"]]
    assert data.info["source"] == "raw" and data.info["reviews"] == 5
    assert data.info["files"]["meta"].endswith(META_FILE)


# ---------------------------------------------------------------------------------------------------------------
# Loader: errors
# ---------------------------------------------------------------------------------------------------------------

def test_bad_json_line(tmp_path):
    write_processed(tmp_path)
    p = tmp_path / "derived" / "items.jsonl"
    p.write_text(p.read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"items\.jsonl, line 5: not a JSON"):
        load_amazon_beauty(tmp_path)


def test_short_sequence_line(tmp_path):
    write_processed(tmp_path, lines=("U1 I1 I2", "U2"))
    with pytest.raises(DataError, match=r"user_sequence\.txt, line 2"):
        load_amazon_beauty(tmp_path)


def test_bad_review_and_meta_lines(tmp_path):
    write_raw(tmp_path / "a", reviews=reviews_lines() + ['{"reviewerID": "U3", "asin": "I1"}'])
    with pytest.raises(DataError, match=r"reviews_Beauty_5\.json\.gz, line 6: .*unixReviewTime"):
        load_amazon_beauty(tmp_path / "a")
    write_raw(tmp_path / "b", meta=META_LINES + ["<html>503 Service Unavailable</html>"])
    with pytest.raises(DataError, match=r"meta_Beauty\.json\.gz, line 5: not a JSON object"):
        load_amazon_beauty(tmp_path / "b")
    meta = list(META_LINES)  # a reviewed item's line that is not a literal: parsed, never evaluated
    meta[1] = meta[1][:-1] + ", 'x': os.system('true')}"
    write_raw(tmp_path / "c", meta=meta)
    with pytest.raises(DataError, match=r"meta_Beauty\.json\.gz, line 2: neither JSON nor a Python dict literal"):
        load_amazon_beauty(tmp_path / "c")


def test_missing_items_file(tmp_path):
    write_processed(tmp_path)
    (tmp_path / "derived" / "items.jsonl").unlink()
    with pytest.raises(DataError) as e:
        load_amazon_beauty(tmp_path)
    assert "but not" in str(e.value) and "items.jsonl" in str(e.value)


def test_sequence_item_missing_from_metadata(tmp_path):
    write_processed(tmp_path, lines=("U1 I1 X7 I2 X8",))
    with pytest.raises(DataError, match=r"2 item\(s\).*missing from the metadata.*X7, X8"):
        load_amazon_beauty(tmp_path)
    write_raw(tmp_path / "raw", meta=[m for m in META_LINES if "'I2'" not in m])
    with pytest.raises(DataError, match=r"missing from the metadata.*I2"):
        load_amazon_beauty(tmp_path / "raw")


def test_truncated_gzip(tmp_path):
    write_raw(tmp_path)
    big = reviews_lines() * 400                                    # long enough to span several gzip blocks
    blob = gz_bytes(big)
    (tmp_path / REVIEWS_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"reviews_Beauty_5\.json\.gz, line \d+: .*truncated or corrupt"):
        load_amazon_beauty(tmp_path)
    (tmp_path / REVIEWS_FILE).write_bytes(b"not a gzip file at all")
    with pytest.raises(DataError, match=r"reviews_Beauty_5\.json\.gz, line 1"):
        load_amazon_beauty(tmp_path)


def test_nothing_found(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFGR2_AMAZON_DIR", str(tmp_path / "env"))
    monkeypatch.setattr(amazon, "DEFAULT_DATA_DIR", tmp_path / "repo" / "data" / "amazon_beauty")
    monkeypatch.setattr(amazon, "REPO_ROOT", tmp_path / "repo")
    with pytest.raises(DataError) as e:
        load_amazon_beauty()
    msg = str(e.value)
    assert "python -m diffgr2_lite download-amazon" in msg
    for place in (tmp_path / "env", tmp_path / "repo" / "data" / "amazon_beauty", tmp_path / "shared"):
        assert str(place) in msg
    assert "user_sequence.txt" in msg and META_FILE in msg
    with pytest.raises(DataError, match="download-amazon"):
        load_amazon_beauty(tmp_path / "nowhere")


def test_missing_data_hint_points_into_the_repo_and_to_the_smoke_profile(tmp_path, monkeypatch):
    with pytest.raises(DataError) as e:
        load_amazon_beauty(tmp_path / "nowhere")
    msg = str(e.value)
    assert str(amazon.REPO_ROOT / "data" / "README.md") in msg and "SOURCE.md" not in msg
    assert "DIFFGR2_PROFILE=smoke" in msg and 'profile = "smoke"' in msg


def test_env_dir_is_searched_first(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFGR2_AMAZON_DIR", str(write_raw(tmp_path / "env")))
    data = load_amazon_beauty()
    assert data.info["source"] == "raw" and data.info["root"] == str(tmp_path / "env")


# ---------------------------------------------------------------------------------------------------------------
# The real shared files
# ---------------------------------------------------------------------------------------------------------------

def _shared_dir() -> Path | None:
    for d in (Path("/work/shared/data/amazon_beauty"), Path(__file__).parents[1] / "../shared/data/amazon_beauty"):
        if (d / "gram" / "user_sequence.txt").is_file() and (d / "derived" / "items.jsonl").is_file():
            return d
    return None


@pytest.mark.skipif(_shared_dir() is None, reason="shared Amazon Beauty files not present")
def test_real_data():
    data = load_amazon_beauty(_shared_dir())
    check = verify_statistics(data)
    assert check == {k: (v, v, True) for k, v in EXPECTED.items()}
    assert data.info["five_core"] == {"min_user_length": 5, "min_item_count": 5, "repeated_items_within_users": 0,
                                      "ok": True}
    assert data.user_ids[0] == "A1YJEY40YUW4SE" and len(data.sequences[0]) == 5
    assert data.sequences[0] == [0, 1, 2, 3, 4]
    cat = data.catalog
    assert cat.item_ids[0] == "B004756YJA" and cat.titles[0].startswith("OPI Nail Lacquer")
    assert cat.brands[0] == "OPI" and cat.brands[2] is None        # "Unknown" placeholder
    assert cat.categories[2] == ["Skin Care", "Face", "Creams & Moisturizers"]
    assert sum(b is not None for b in cat.brands) == 7475 - 46       # 20 Unknown + 26 Generic dropped
    assert not any("&amp;" in t or "&#39;" in t for t in cat.titles)
    assert all(c and c[0] != "Beauty" for c in cat.categories)


# ---------------------------------------------------------------------------------------------------------------
# Downloader against a local HTTP server
# ---------------------------------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    honour_range = True
    cut_after = 0
    log: list = []

    def do_GET(self):  # noqa: N802
        name = self.path.lstrip("/")
        body = self.files.get(name)
        rng = self.headers.get("Range")
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self.log.append((name, rng, 404))
            return
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.log.append((name, rng, 416))
                return
            part = body[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            self.wfile.write(part)
            self.log.append((name, rng, 206))
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: self.cut_after] if self.cut_after else body)   # cut_after: connection drops
            self.log.append((name, rng, 200))

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    handler = type("H", (_Handler,), {"files": {}, "honour_range": True, "cut_after": 0, "log": []})
    handler.files[REVIEWS_FILE] = gz_bytes(reviews_lines())
    handler.files[META_FILE] = gz_bytes(META_LINES)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    srv.handler = handler
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}/"
    yield srv
    srv.shutdown()
    srv.server_close()


def fetch(dest, srv, **kw):
    return download_amazon_beauty(dest, urls={"base": srv.base}, expected_reviews=len(REVIEWS), progress=False,
                                  timeout=10, **kw)


def test_download_verify_and_skip(tmp_path, server):
    out = fetch(tmp_path, server)
    assert out["reviews"].read_bytes() == server.handler.files[REVIEWS_FILE]
    assert out["meta"].read_bytes() == server.handler.files[META_FILE]
    assert not list(tmp_path.glob("*.part"))
    record = json.loads(out["record"].read_text())
    assert len(record["files"][REVIEWS_FILE]["sha256"]) == 64
    assert record["statistics"] == {"users": 2, "items": 3, "interactions": 5}
    assert load_amazon_beauty(tmp_path).info["source"] == "raw"
    n = len(server.handler.log)
    fetch(tmp_path, server)                                        # verified finals are not fetched again
    assert len(server.handler.log) == n
    fetch(tmp_path, server, force=True)
    assert len(server.handler.log) == n + 2


def test_download_resumes_part(tmp_path, server):
    body = server.handler.files[REVIEWS_FILE]
    (tmp_path / f"{REVIEWS_FILE}.part").write_bytes(body[:20])
    out = fetch(tmp_path, server)
    assert (REVIEWS_FILE, "bytes=20-", 206) in server.handler.log
    assert out["reviews"].read_bytes() == body
    record = json.loads(out["record"].read_text())
    assert record["files"][REVIEWS_FILE]["resumed_from"] == 20


def test_download_interrupted_then_resumed(tmp_path, server):
    body = server.handler.files[REVIEWS_FILE]
    server.handler.cut_after = 30
    with pytest.raises(DataError, match=r"stopped at 30 of \d+ bytes.*rerun to resume"):
        fetch(tmp_path, server)
    assert (tmp_path / f"{REVIEWS_FILE}.part").read_bytes() == body[:30]
    assert not (tmp_path / REVIEWS_FILE).exists()
    server.handler.cut_after = 0
    out = fetch(tmp_path, server)
    assert (REVIEWS_FILE, "bytes=30-", 206) in server.handler.log
    assert out["reviews"].read_bytes() == body


def test_download_complete_part_416(tmp_path, server):
    body = server.handler.files[REVIEWS_FILE]
    (tmp_path / f"{REVIEWS_FILE}.part").write_bytes(body)
    out = fetch(tmp_path, server)
    assert (REVIEWS_FILE, f"bytes={len(body)}-", 416) in server.handler.log
    assert out["reviews"].read_bytes() == body


def test_download_restarts_when_range_ignored(tmp_path, server):
    server.handler.honour_range = False
    body = server.handler.files[REVIEWS_FILE]
    (tmp_path / f"{REVIEWS_FILE}.part").write_bytes(b"garbage that must not survive")
    out = fetch(tmp_path, server)
    assert (REVIEWS_FILE, "bytes=29-", 200) in server.handler.log
    assert out["reviews"].read_bytes() == body


def test_download_verification_failure_leaves_no_final(tmp_path, server):
    with pytest.raises(DataError, match=r"verification of reviews_Beauty_5\.json\.gz failed: 5 reviews, expected 7"):
        download_amazon_beauty(tmp_path, urls={"base": server.base}, expected_reviews=7, progress=False)
    assert not (tmp_path / REVIEWS_FILE).exists() and not (tmp_path / f"{REVIEWS_FILE}.part").exists()
    assert not (tmp_path / "DOWNLOADED.json").exists()

    blob = server.handler.files[REVIEWS_FILE]
    server.handler.files[REVIEWS_FILE] = blob[: len(blob) - 12]     # a truncated gzip, served in full
    with pytest.raises(DataError, match="truncated or corrupt"):
        fetch(tmp_path / "t", server)
    assert not (tmp_path / "t" / REVIEWS_FILE).exists()

    server.handler.files[REVIEWS_FILE] = blob
    server.handler.files[META_FILE] = gz_bytes([m for m in META_LINES if "'I2'" not in m])
    with pytest.raises(DataError, match=r"verification of meta_Beauty.*missing from the metadata.*I2"):
        fetch(tmp_path / "m", server)
    assert not (tmp_path / "m" / META_FILE).exists()


def test_download_unreachable(tmp_path, server):
    server.handler.files.pop(META_FILE)
    with pytest.raises(DataError, match="HTTP 404"):
        fetch(tmp_path, server)
    assert not (tmp_path / META_FILE).exists()


def test_existing_bad_file_names_the_cli_flag(tmp_path):
    write_raw(tmp_path)
    blob = (tmp_path / REVIEWS_FILE).read_bytes()
    (tmp_path / REVIEWS_FILE).write_bytes(blob[: len(blob) - 12])        # truncated, already in place: not fetched
    with pytest.raises(DataError) as e:
        download_amazon_beauty(tmp_path, expected_reviews=len(REVIEWS), progress=False)
    assert "rerun with --force" in str(e.value) and (tmp_path / REVIEWS_FILE).exists()
