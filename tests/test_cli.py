"""The command line and the generated results table."""
import json
import os
from pathlib import Path

import pytest

from diffgr2_lite import artifacts as art
from diffgr2_lite.__main__ import README_END, README_START, main, results_table


def test_unknown_profile_is_a_clear_error(capsys):
    assert main(["results", "--profile", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown profile 'nope'" in err and "smoke" in err and "full" in err


def test_unknown_notebook_is_a_clear_error(capsys):
    assert main(["notebooks", "--profile", "smoke", "--only", "99"]) == 2
    assert "no notebook matches" in capsys.readouterr().err


def _record(r1, valid, **extra):
    m = {"recall@1": r1, "recall@3": 0.5, "ndcg@3": 0.4, "ndcg@10": 0.6, "valid_rate": valid}
    return {"device": "GPU X", "profile": "full", "dataset": "amazon_beauty", "seed": 0, "created": "t", "n_eval": 7,
            "metrics": m, "metrics_strict": {**m, "recall@1": r1 * valid}, **extra}


def test_results_table_is_generated_from_the_files(tmp_path):
    (tmp_path / "retriever.json").write_text(json.dumps(_record(0.25, 1.0)))
    (tmp_path / "cft.json").write_text(json.dumps(_record(0.3125, 0.5, block_size=32, tau=1.0, ci95={
        "recall@1": {"diff": 0.01, "lo": -0.02, "hi": 0.04}})))
    table = results_table({f.stem: json.loads(f.read_text()) for f in tmp_path.glob("*.json")})
    assert "Test users: 7" in table and "GPU X" in table
    assert "| retriever order (floor) | 0.2500 |" in table
    assert "| + CFT | 0.3125 |" in table and "0.1562" in table          # strict R@1 = 0.3125 * 0.5
    assert "+0.010 [-0.020, +0.040]" in table and "B=32, tau=1.0" in table
    assert "naive conversion" not in table                             # absent stages are not invented
    assert "sub-blocks" not in table                                   # decoded across the whole block
    (tmp_path / "cft.json").write_text(json.dumps(_record(0.3125, 0.5, block_size=32, tau=1.0, sub_block=8)))
    table = results_table({f.stem: json.loads(f.read_text()) for f in tmp_path.glob("*.json")})
    assert "| B=32, tau=1.0, sub-blocks of 8 |" in table


def test_results_tables_speed_rows_carry_each_settings_accuracy_over_every_prompt():
    def row(batch, scored, valid):
        return {"decoder": "diffusion", "batch": batch, "block_size": 32, "tau": 0.9, "sub_block": 8,
                "tokens_per_s": 1000.0, "tokens_per_forward": 2.0, "speedup_vs_ar": 2.5, "recall@1": 0.5,
                "strict_recall@1": 0.5 * valid, "valid_rate": valid, "scored": scored}

    table = results_table({"retriever": _record(0.25, 1.0),
                           "speed": {"device": "GPU X", "rows": [row(1, 16, 1.0), row(64, 1741, 0.98)]}})
    # the batch-1 row timed 16 prompts, all valid; the setting is 98% valid over 1,741: both rows say so
    assert table.count("| 0.5000 | 0.4900 | 0.9800 | 1741 |") == 2 and "| 16 |" not in table
    assert "scored over |" in table


def test_results_table_without_results(tmp_path):
    assert "No results yet" in results_table({})


# ----------------------------------------------------------------------------------------------- `results` on bad input
FULL_METRICS = dict.fromkeys(art.METRICS, 0.25)
README = f"# title\n\n{README_START}\nOLD TABLE\n{README_END}\n\nmore text\n"


def _full_record(r1=0.25, **extra):
    m = {**FULL_METRICS, "recall@1": r1}
    return {"device": "GPU X", "profile": "full", "dataset": "amazon_beauty", "seed": 0,
            "created": "2026-11-26T04:39:51+00:00", "versions": {"torch": "2.11", "transformers": "5.17"},
            "n_eval": 7, "split": "test", "metrics": m, "metrics_strict": m, **extra}


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository with a committed results/full/ar.json and README table, and an empty runs folder."""
    old = os.umask(0o022)
    monkeypatch.setattr(art, "REPO", tmp_path)
    monkeypatch.setenv("DIFFGR2_RUNS", str(tmp_path / "runs"))
    (tmp_path / "README.md").write_text(README)
    (tmp_path / "results" / "full").mkdir(parents=True)
    (tmp_path / "results" / "full" / "ar.json").write_text(json.dumps(_full_record(0.125)))
    yield tmp_path
    os.umask(old)


def run_file(repo: Path, stage: str, text: str, profile: str = "full") -> Path:
    f = repo / "runs" / profile / stage / "metrics.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    return f


def snapshot(repo: Path) -> dict:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*"))
            if p.is_file() and "runs" not in p.parts}


@pytest.mark.parametrize("bad, expected", [
    (json.dumps(_full_record(0.5))[:50], "is not valid JSON"),
    ("{}", "missing key 'device'"),
    (json.dumps({k: v for k, v in _full_record(0.5).items() if k != "metrics"}), "missing key 'metrics'"),
])
def test_results_refuses_a_bad_run_file_before_touching_anything(repo, capsys, bad, expected):
    run_file(repo, "retriever", json.dumps(_full_record(0.5)))           # a good file is not copied either
    bad_file = run_file(repo, "ar", bad)
    before = snapshot(repo)
    assert main(["results"]) == 2
    err = capsys.readouterr().err
    assert str(bad_file) in err and expected in err and str(repo / "results") not in err
    assert snapshot(repo) == before                                     # committed results and README untouched


def test_results_copies_valid_runs_keeps_modes_and_ignores_unknown_files(repo, capsys):
    run_file(repo, "ar", json.dumps(_full_record(0.5)))
    run_file(repo, "cft", json.dumps(_full_record(0.375, block_size=32, tau=1.0, tokens_per_forward=2.0)))
    run_file(repo, "train_speed", "not ours")                          # a later stage this command does not know
    (repo / "results" / "full" / "train_speed.json").write_text("[]")
    (repo / "README.md").chmod(0o664)
    assert main(["results"]) == 0
    assert json.loads((repo / "results" / "full" / "ar.json").read_text())["metrics"]["recall@1"] == 0.5
    readme = (repo / "README.md").read_text()
    assert "OLD TABLE" not in readme and "| AR GR2 (free decoding) | 0.5000 |" in readme and "| + CFT | 0.3750 |" in readme
    assert readme.endswith(f"{README_END}\n\nmore text\n")
    assert (repo / "README.md").stat().st_mode & 0o777 == 0o664          # not 0600 after the atomic write
    assert (repo / "results" / "full" / "cft.json").stat().st_mode & 0o777 == 0o644
    assert (repo / "results" / "full" / "train_speed.json").read_text() == "[]"
    assert sorted(p.name for p in (repo / "results" / "full").iterdir()) == ["ar.json", "cft.json", "train_speed.json"]


def test_results_refuses_a_bad_committed_file_before_writing(repo, capsys):
    (repo / "results" / "full" / "teacher.json").write_text("{}")
    run_file(repo, "ar", json.dumps(_full_record(0.5)))
    before = snapshot(repo)
    assert main(["results"]) == 2
    assert str(repo / "results" / "full" / "teacher.json") in capsys.readouterr().err
    assert snapshot(repo) == before


def test_results_of_the_smoke_profile_leave_the_full_table(repo, capsys):
    run_file(repo, "ar", json.dumps({**_full_record(0.5), "profile": "smoke"}), profile="smoke")
    assert main(["results", "--profile", "smoke"]) == 0
    assert (repo / "README.md").read_text() == README
    assert "full profile only" in capsys.readouterr().out
    assert json.loads((repo / "results" / "smoke" / "ar.json").read_text())["profile"] == "smoke"


# ----------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("argv", [["notebooks", "--only"], ["results", "--profile"], ["results", "--bogus"], [],
                                  ["frobnicate"]])
def test_bad_arguments_are_one_line_and_exit_2(argv, capsys, monkeypatch):
    import diffgr2_lite.__main__ as cli

    monkeypatch.setattr(cli, "run_notebooks", lambda *a, **k: pytest.fail("ran notebooks"))
    monkeypatch.setattr(cli, "collect_results", lambda *a, **k: pytest.fail("collected results"))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "--help" in err


def test_empty_notebook_prefix_does_not_select_every_notebook(capsys, monkeypatch):
    monkeypatch.setattr("papermill.execute_notebook", lambda *a, **k: pytest.fail("ran a notebook"))
    assert main(["notebooks", "--profile", "smoke", "--only", ""]) == 2
    assert "no notebook matches" in capsys.readouterr().err
