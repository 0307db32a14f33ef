"""The command line and the generated results table."""
import json

from diffgr2_lite.__main__ import main, results_table


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
    table = results_table(tmp_path)
    assert "Test users: 7" in table and "GPU X" in table
    assert "| retriever order (floor) | 0.2500 |" in table
    assert "| + CFT | 0.3125 |" in table and "0.1562" in table          # strict R@1 = 0.3125 * 0.5
    assert "+0.010 [-0.020, +0.040]" in table and "B=32, tau=1.0" in table
    assert "naive conversion" not in table                             # absent stages are not invented


def test_results_table_without_results(tmp_path):
    assert "No results yet" in results_table(tmp_path)
