"""Atomic writes and checkpoints: no temp files left, old data kept on failure, round trips, vocabulary guard."""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # see test_data.py

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffgr2_lite import artifacts
from diffgr2_lite.artifacts import atomic_dir, atomic_write_json, atomic_write_text, read_json
from diffgr2_lite.config import ModelSize
from diffgr2_lite.model import CheckpointError, build_model, load_checkpoint, save_checkpoint
from diffgr2_lite.text import build_vocabulary, encode, make_tokenizer, vocab_fingerprint

torch.set_num_threads(1)


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ----------------------------------------------------------------------------------------------- JSON
def test_atomic_write_json_round_trip_and_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    obj = {"a": 1, "np": np.float32(0.5), "arr": np.arange(3), "tuple": (1, 2), "path": Path("x/y"), "i": np.int64(7)}
    atomic_write_json(path, obj)
    assert listing(path.parent) == ["metrics.json"]
    assert read_json(path) == {"a": 1, "np": 0.5, "arr": [0, 1, 2], "tuple": [1, 2], "path": "x/y", "i": 7}
    atomic_write_json(path, {"b": 2})                        # replaced as a whole
    assert read_json(path) == {"b": 2}
    assert listing(path.parent) == ["metrics.json"]


def test_atomic_write_json_unserialisable_keeps_old_file(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"old": True})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert read_json(path) == {"old": True}
    assert listing(tmp_path) == ["m.json"]


def test_atomic_write_text_failure_in_replace_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"old": True})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, '{"new": true}')
    monkeypatch.undo()
    assert read_json(path) == {"old": True}
    assert listing(tmp_path) == ["m.json"]


def test_atomic_write_is_never_half_written(tmp_path, monkeypatch):
    """At the moment the file is swapped in, the temporary file already holds the whole text."""
    path = tmp_path / "big.json"
    big = {"x": list(range(20000))}
    real_replace = os.replace
    seen = {}

    def spy(src, dst):
        seen["tmp_text"] = Path(src).read_text()
        seen["same_dir"] = Path(src).parent == Path(dst).parent
        real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", spy)
    atomic_write_json(path, big)
    assert json.loads(seen["tmp_text"]) == big and seen["same_dir"]


def test_read_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")


# ----------------------------------------------------------------------------------------------- folders
def test_atomic_dir_replaces_on_success(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        assert Path(tmp) != final and Path(tmp).parent == final.parent
        (Path(tmp) / "new.txt").write_text("new")
        assert (final / "old.txt").exists()                  # the old folder is intact while writing
    assert listing(final) == ["new.txt"]
    assert listing(tmp_path) == ["ckpt"]                     # no temp or .old folder left


def test_atomic_dir_keeps_old_folder_when_the_block_raises(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (Path(tmp) / "partial.bin").write_bytes(b"123")
            raise RuntimeError("crash mid-write")
    assert listing(final) == ["old.txt"] and (final / "old.txt").read_text() == "old"
    assert listing(tmp_path) == ["ckpt"]


def test_atomic_dir_creates_new_folder(tmp_path):
    final = tmp_path / "a" / "b"
    with atomic_dir(final) as tmp:
        (Path(tmp) / "f").write_text("x")
    assert listing(final) == ["f"]
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "never") as tmp:
            raise ValueError
    assert not (tmp_path / "never").exists() and listing(tmp_path) == ["a"]


# ----------------------------------------------------------------------------------------------- checkpoints
def make_tok(extra: str = ""):
    return make_tokenizer(build_vocabulary(["pick next+ brand+ ; . step1 " + extra], (3, 3, 2)))


def make_model(tok, seed=0):
    return build_model(ModelSize(hidden=32, layers=2, heads=4, intermediate=64), len(tok.get_vocab()), 64, tok,
                       seed=seed).float().eval()


def test_checkpoint_round_trip(tmp_path):
    tok = make_tok()
    model = make_model(tok)
    path = tmp_path / "ckpt"
    save_checkpoint(model, tok, path, meta={"stage": "ar", "epochs": 1.5})
    assert listing(tmp_path) == ["ckpt"]
    loaded, tok2, meta = load_checkpoint(path)
    assert meta["stage"] == "ar" and meta["epochs"] == 1.5 and meta["vocab_fingerprint"] == vocab_fingerprint(tok)
    assert tok2.get_vocab() == tok.get_vocab()
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd2)
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    ids = torch.tensor(encode(tok, ["<bos> pick <a_1> <b_2> <c_0> ; <eos>"]))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-6)
    assert not loaded.training
    # loading with the matching tokenizer passes it through
    _, tok3, _ = load_checkpoint(path, tokenizer=tok)
    assert tok3 is tok


def test_checkpoint_overwrite_keeps_one_folder(tmp_path):
    tok = make_tok()
    path = tmp_path / "ckpt"
    save_checkpoint(make_model(tok, seed=0), tok, path, meta={"v": 1})
    m2 = make_model(tok, seed=1)
    save_checkpoint(m2, tok, path, meta={"v": 2})
    loaded, _, meta = load_checkpoint(path)
    assert meta["v"] == 2
    k = "model.embed_tokens.weight"
    assert torch.equal(loaded.state_dict()[k], m2.state_dict()[k])
    assert listing(tmp_path) == ["ckpt"]


def test_checkpoint_other_vocabulary_is_refused(tmp_path):
    tok = make_tok()
    path = tmp_path / "ckpt"
    save_checkpoint(make_model(tok), tok, path)
    other = make_tok("extra words here")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, tokenizer=other)
    msg = str(e.value)
    assert "another vocabulary" in msg and str(path) in msg
    assert vocab_fingerprint(tok) in msg and vocab_fingerprint(other) in msg
    assert isinstance(e.value, ValueError)


def test_checkpoint_incomplete_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "nothing")
    tok = make_tok()
    path = tmp_path / "ckpt"
    save_checkpoint(make_model(tok), tok, path)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    tok = make_tok()
    path = tmp_path / "ckpt"
    save_checkpoint(make_model(tok, seed=0), tok, path, meta={"v": 1})

    def broken(*a, **k):
        raise RuntimeError("interrupted")

    import diffgr2_lite.model as model_mod

    monkeypatch.setattr(model_mod, "save_tokenizer", broken)
    with pytest.raises(RuntimeError):
        save_checkpoint(make_model(tok, seed=1), tok, path, meta={"v": 2})
    monkeypatch.undo()
    _, _, meta = load_checkpoint(path)
    assert meta["v"] == 1
    assert listing(tmp_path) == ["ckpt"]


# ----------------------------------------------------------------------------------------------- file modes
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_atomic_writes_keep_the_mode_of_what_they_replace(tmp_path, umask_022):
    new = tmp_path / "new.json"
    atomic_write_json(new, {"a": 1})
    assert mode(new) == 0o644                                # the umask's mode, not mkstemp's 0600
    shared = tmp_path / "README.md"
    shared.write_text("old")
    shared.chmod(0o664)
    atomic_write_text(shared, "new")
    assert shared.read_text() == "new" and mode(shared) == 0o664
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (Path(tmp) / "f").write_text("x")
    assert mode(tmp_path / "ckpt") == 0o755                  # not mkdtemp's 0700
    (tmp_path / "ckpt").chmod(0o750)
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (Path(tmp) / "f").write_text("y")
    assert mode(tmp_path / "ckpt") == 0o750


def test_checkpoint_files_are_not_owner_only(tmp_path, umask_022):
    tok = make_tok()
    save_checkpoint(make_model(tok), tok, tmp_path / "ckpt")
    assert mode(tmp_path / "ckpt") == 0o755 and mode(tmp_path / "ckpt" / "meta.json") == 0o644


# ----------------------------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture
def checkpoint(tmp_path):
    tok = make_tok()
    save_checkpoint(make_model(tok), tok, tmp_path / "ckpt", meta={"v": 1})
    return tmp_path / "ckpt", tok


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_weights_are_a_checkpoint_error_naming_the_file(checkpoint, keep):
    path, tok = checkpoint
    weights = path / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: int(len(blob) * keep)])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, tok)
    assert str(weights) in str(e.value)


@pytest.mark.parametrize("name, text", [("meta.json", '{"v": 1, "vocab'), ("meta.json", "[1, 2]"),
                                        ("meta.json", "\udcff"), ("config.json", "{not json")])
def test_malformed_checkpoint_json_is_a_checkpoint_error_naming_the_file(checkpoint, name, text):
    path, tok = checkpoint
    (path / name).write_text(text, errors="surrogateescape")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, tok)
    assert str(path / name) in str(e.value)


def test_missing_weights_or_tokenizer_are_checkpoint_errors(checkpoint):
    path, tok = checkpoint
    (path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_checkpoint(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path, tok)


# ----------------------------------------------------------------------------------------------- results schema
METRICS = dict.fromkeys(artifacts.METRICS, 0.5)


def stage_file(**changes) -> dict:
    rec = {"stage": "cft", "device": "GPU X", "profile": "full", "dataset": "amazon_beauty", "seed": 0,
           "created": "2026-11-26T04:39:51+00:00", "versions": {"torch": "2.11", "transformers": "5.17"},
           "n_eval": 7, "split": "test", "metrics": dict(METRICS), "metrics_strict": dict(METRICS),
           "block_size": 32, "tau": 1.0, "tokens_per_forward": 1.5, "ci95": {}, "wall_s": 3.0}
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not None}


SPEED_ROW = {"decoder": "ar", "batch": 1, "block_size": 1, "tau": None, "tokens_per_s": 1500.0,
             "ms_per_forward": 0.6, "tokens_per_forward": 1.0, "latency_ms_per_request": 99.0, "recall@1": 0.5,
             "valid_rate": 0.25, "graphs": True, "speedup_vs_ar": 1.0}


def test_check_result_accepts_complete_records_with_extra_keys(tmp_path):
    path = tmp_path / "cft.json"
    atomic_write_json(path, stage_file())
    assert artifacts.check_result(path, "cft")["n_eval"] == 7
    atomic_write_json(path, stage_file(block_size=None, tau=None, tokens_per_forward=None))
    assert artifacts.check_result(path, "teacher")["seed"] == 0        # not a diffusion stage: no block_size needed
    atomic_write_json(path, {"device": "GPU X", "versions": {"torch": "2", "transformers": "5"},
                             "rows": [SPEED_ROW, {**SPEED_ROW, "decoder": "diffusion", "tau": 0.9}]})
    assert len(artifacts.check_result(path, "speed")["rows"]) == 2


@pytest.mark.parametrize("stage, record, expected", [
    ("ar", {}, "missing key 'device'"),
    ("ar", [], "the file should be a JSON object"),
    ("ar", stage_file(metrics=None), "missing key 'metrics'"),
    ("ar", stage_file(metrics={**METRICS, "ndcg@10": None}), "key metrics.'ndcg@10' should be number"),
    ("ar", stage_file(metrics_strict={"recall@1": 0.5}), "missing key metrics_strict.'recall@3'"),
    ("ar", stage_file(n_eval="7"), "key 'n_eval' should be int"),
    ("ar", stage_file(created="yesterday"), "key 'created' should be ISO time"),
    ("ar", stage_file(versions={"torch": "2"}), "missing key versions.'transformers'"),
    ("cft", stage_file(tau=None), "missing key 'tau'"),
    ("cft_whole", stage_file(block_size=None), "missing key 'block_size'"),    # CFT's other decoding orders too
    ("speed", {"device": "x", "versions": {"torch": "2", "transformers": "5"}, "rows": [{**SPEED_ROW, "graphs": 1}]},
     "key rows[0].'graphs' should be bool"),
    ("speed", {"device": "x", "versions": {}, "rows": []}, "missing key versions.'torch'"),
])
def test_check_result_names_the_file_and_the_key(tmp_path, stage, record, expected):
    path = tmp_path / f"{stage}.json"
    atomic_write_json(path, record)
    with pytest.raises(ValueError) as e:
        artifacts.check_result(path, stage)
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value)


def test_check_result_names_a_truncated_file(tmp_path):
    path = tmp_path / "ar.json"
    atomic_write_json(path, stage_file())
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        artifacts.check_result(path, "ar")
