"""Command line: ``python -m diffgr2_lite <verb>``.

    notebooks       run the notebook series headlessly with papermill into runs/<profile>/notebooks/
    finalize-notebooks  make executed notebooks the committed ones: comment out papermill's injected parameters,
                    widgets -> text, stable metadata (nbfiles.py); e.g. finalize-notebooks runs/full/notebooks
    lab             JupyterLab on notebooks/ with the project's save hook (make lab)
    results         copy runs/<profile>/<stage>/metrics.json into results/<profile>/ and regenerate the README table
    download-amazon fetch the canonical Amazon Beauty files (reviews_Beauty_5.json.gz, meta_Beauty.json.gz)
    bench           the AR vs block-diffusion speed benchmark on the profile's checkpoints
    bench-train     training speed of every stage, before and after train.py (results/<profile>/train_speed.json)
    train           build the training stages' checkpoints (copy warm-up, AR, CFT, OPD, RL); under
                    ``accelerate launch --num_processes N`` on N GPUs
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import artifacts as art
from .config import PROFILES, ConfigError, get_profile

NOTEBOOK_DIR = art.REPO / "notebooks"
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


class RunFailed(RuntimeError):
    """A notebook of the series raised: the message names it, the cell and the error (exit status 1)."""


def run_notebooks(profile_name: str, only: list[str] | None = None, out_dir: str | None = None) -> Path:
    import os

    import papermill as pm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("DIFFGR2_PLAIN_PROGRESS", "1")   # kernels inherit it: text bars, one final line (progress.py)
    profile = get_profile(profile_name)
    out = Path(out_dir) if out_dir else art.runs_dir(profile.name) / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    notebooks = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        unknown = [o for o in only if not o or not any(nb.stem.startswith(o) for nb in notebooks)]
        if unknown:
            raise ConfigError(f"no notebook matches {unknown}; notebooks: {', '.join(nb.stem for nb in notebooks)}")
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(o) for o in only)]
    # the overview runs last: its closing cell reads what the other notebooks of this run measured
    last = len(notebooks) > 1
    notebooks.sort(key=lambda nb: (last and nb.stem.startswith("00_"), nb.stem))
    for nb in notebooks:
        t0 = time.time()
        print(f"== {nb.name} (profile {profile.name})", flush=True)
        try:
            pm.execute_notebook(str(nb), str(out / nb.name), parameters={"profile": profile.name},
                                kernel_name="python3", cwd=str(NOTEBOOK_DIR),
                                progress_bar={"desc": f"   {nb.stem}", "unit": "cell"},
                                extra_arguments=["--IPKernelApp.log_level=ERROR"])   # not its TCP warning
        except pm.PapermillExecutionError as exc:
            raise RunFailed(f"{nb.name} failed in cell [{exc.exec_count}]: {exc.ename}: {exc.evalue}\n"
                            f"the executed notebook, with the traceback, is {out / nb.name}") from None
        print(f"   done in {time.time() - t0:.0f} s", flush=True)
    print(f"\nexecuted notebooks: {out}\nstage artifacts and metrics: {art.runs_dir(profile.name)}\n"
          f"to commit them: python -m diffgr2_lite finalize-notebooks {out}")
    return out


def collect_results(profile_name: str) -> Path:
    """results/<profile>/<stage>.json from the saved run outputs, then the README table generated from them.

    Every file is checked against DESIGN.md section 9 before anything is written, so a truncated or partial run file
    is named and refused instead of replacing a committed result; writes are atomic. The README shows the full
    profile only: a smoke run must not replace it.
    """
    src = art.runs_dir(profile_name)
    dst = art.REPO / "results" / profile_name
    stages = (*art.RESULT_STAGES, "speed")
    runs = {s: src / s / "metrics.json" for s in stages if (src / s / "metrics.json").exists()}
    kept = {s: dst / f"{s}.json" for s in stages if s not in runs and (dst / f"{s}.json").exists()}
    records = {s: art.check_result(f, s) for s, f in {**kept, **runs}.items()}
    table = results_table(records) if profile_name == "full" else None
    for stage in runs:                                   # what was checked is what is written (each file read once)
        art.atomic_write_json(dst / f"{stage}.json", records[stage])
    print(f"copied {len(runs)} stage files into {dst}: {', '.join(runs) or 'none'}")
    if table is None:
        print(f"README table not changed: it shows the full profile only, not {profile_name!r}")
    else:
        update_readme(table)
    return dst


def results_table(records: dict) -> str:
    """The markdown table of every stage in ``records`` (stage -> checked run record, ``speed`` included): generated
    from the run files, never typed by hand."""
    rows, meta = [], None
    names = {"retriever": "retriever order (floor)", "teacher": "programmatic teacher", "ar_direct": "AR, no reasoning",
             "ar": "AR GR2 (free decoding)", "ar_constrained": "AR GR2 (constrained decoding)",
             "naive": "naive conversion", "naive_constrained": "naive + external assignment",
             "cft": "+ CFT", "cft_whole": "+ CFT, whole block", "cft_sub4": "+ CFT, sub-blocks of 4",
             "opd": "+ CFT + OPD", "rl": "+ CFT + OPD + RL"}
    for stage in art.RESULT_STAGES:
        if stage not in records:
            continue
        r = records[stage]
        if meta is None or stage == "ar":        # the header names the device the models ran on
            meta = r
        m, ms = r["metrics"], r["metrics_strict"]
        ci = r.get("ci95", {}).get("recall@1")
        ci_s = f"{ci['diff']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]" if ci else ""
        tau = f"B={r['block_size']}, tau={r['tau']}" if "block_size" in r else ""
        if r.get("sub_block"):                   # the chunks the sampler committed in (none: the whole block)
            tau += f", sub-blocks of {r['sub_block']}"
        rows.append(f"| {names[stage]} | {m['recall@1']:.4f} | {m['recall@3']:.4f} | {m['ndcg@3']:.4f} | "
                    f"{ms['recall@1']:.4f} | {m['valid_rate']:.4f} | {ci_s} | {tau} |")
    if not rows:
        return "_No results yet: run the full profile on a GPU, then `make results`._"
    head = (f"Test users: {meta['n_eval']} ({meta['dataset']}, profile `{meta['profile']}`, device {meta['device']}, "
            f"seed {meta['seed']}, {meta['created']}).\n\n"
            "| system | R@1 | R@3 | NDCG@3 | strict R@1 | valid | R@1 vs AR, 95% paired bootstrap | decoder |\n"
            "|---|---|---|---|---|---|---|---|")
    tail = ""
    if "speed" in records:
        from .viz import setting_accuracy, setting_key

        s = records["speed"]
        acc = setting_accuracy(s["rows"])      # each setting's accuracy over the most prompts it was scored on
        tail = ("\n\nSpeed (" + s["device"] + "):\n\n| decoder | batch | B | tau | sub-block | tokens/s | "
                "tokens/forward | speedup | R@1 | strict R@1 | valid | scored over |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        tail += "\n".join(f"| {r['decoder']} | {r['batch']} | {r['block_size']} | {r['tau']} | "
                          f"{r.get('sub_block') or ''} | {r['tokens_per_s']:.0f} | {r['tokens_per_forward']:.2f} | "
                          f"{r.get('speedup_vs_ar', 1.0):.2f}x | {a['recall@1']:.4f} | "
                          f"{_strict(a)} | {a['valid_rate']:.4f} | {a.get('scored') or '–'} |"
                          for r, a in ((r, acc[setting_key(r)]) for r in s["rows"]))
    return head + "\n" + "\n".join(rows) + tail


def _strict(row: dict) -> str:
    """Strict R@1 of a speed row; runs before it was recorded show a dash (not measured, not zero)."""
    v = row.get("strict_recall@1")
    return "–" if v is None else f"{v:.4f}"


def update_readme(table: str) -> None:
    readme = art.REPO / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        print("README has no results markers; table not written")
        return
    a, b = text.index(README_START) + len(README_START), text.index(README_END)
    art.atomic_write_text(readme, text[:a] + "\n" + table + "\n" + text[b:])
    print("README results table regenerated")


class _Parser(argparse.ArgumentParser):
    """Bad arguments give one line on stderr and exit 2 (argparse would print the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None) -> int:
    ap = _Parser(prog="python -m diffgr2_lite", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    nb = sub.add_parser("notebooks", help="run the notebook series with papermill")
    nb.add_argument("--profile", default=None, help=f"one of {', '.join(PROFILES)} (default: $DIFFGR2_PROFILE or auto)")
    nb.add_argument("--only", nargs="+", help="notebook number prefixes, e.g. 00 01")
    nb.add_argument("--out", default=None)
    rs = sub.add_parser("results", help="collect results/<profile>/ and regenerate the README table")
    rs.add_argument("--profile", default="full")
    dl = sub.add_parser("download-amazon", help="download the canonical Amazon Beauty files")
    dl.add_argument("--dest", default=str(art.REPO / "data" / "amazon_beauty"))
    dl.add_argument("--force", action="store_true")
    bn = sub.add_parser("bench", help="speed benchmark (GPU)")
    bn.add_argument("--profile", default=None)
    fz = sub.add_parser("finalize-notebooks", help="executed notebooks -> notebooks/ (nbfiles.finalize_notebook)")
    fz.add_argument("executed_dir", help="a folder of executed NN_*.ipynb, e.g. runs/full/notebooks")
    fz.add_argument("--into", default=str(NOTEBOOK_DIR), help="where to write them (default: notebooks/)")
    sub.add_parser("lab", help="JupyterLab on notebooks/ with the project's save hook; other arguments go to it")
    sub.add_parser("bench-train", help="training speed of every stage (GPU); options: bench-train --help")
    tr = sub.add_parser("train", help="train the stages' checkpoints (data parallel under accelerate launch)")
    tr.add_argument("--profile", default=None)
    tr.add_argument("--stages", nargs="+", default=["copy_warmup", "ar", "ar_direct", "cft", "opd", "rl"],
                    help="the stages to build (each also builds what it starts from)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench-train"]:                      # its own options (diffgr2_lite/bench_train.py)
        from .bench_train import main as bench_train

        return bench_train(argv[1:])
    args, extra = ap.parse_known_args(argv)
    if extra and args.verb != "lab":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.verb == "notebooks":
            run_notebooks(args.profile or get_profile().name, args.only, args.out)
        elif args.verb == "results":
            if args.profile not in PROFILES:
                raise ConfigError(f"unknown profile {args.profile!r}; valid profiles: {', '.join(PROFILES)}")
            collect_results(args.profile)
        elif args.verb == "download-amazon":
            from .data.amazon import download_amazon_beauty

            download_amazon_beauty(args.dest, force=args.force)
        elif args.verb == "bench":
            run_notebooks(args.profile or get_profile().name, ["08"])
        elif args.verb == "finalize-notebooks":
            from .nbfiles import finalize_dir

            finalize_dir(args.executed_dir, args.into)
        elif args.verb == "lab":
            import os

            from .nbfiles import lab_args

            cmd = [sys.executable, "-m", "jupyter", "lab", *lab_args(), *extra]
            print(" ".join(cmd), flush=True)
            os.execv(sys.executable, cmd)
        elif args.verb == "train":
            from .pipeline import train_stages

            train_stages(get_profile(args.profile), args.stages)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
