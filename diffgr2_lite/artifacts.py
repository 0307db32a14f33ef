"""Stage artifacts: ``runs/<profile>/<stage>/``, written atomically, with a metrics JSON in one shape for every stage.

Every write goes to a temporary name in the same folder and is moved into place with ``os.replace``, so a crash
never leaves a half-written checkpoint or JSON behind. Results for DESIGN.md section 9 are built by
:func:`stage_record`.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import stat
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def runs_dir(profile_name: str, dataset: str | None = None) -> Path:
    """``runs/<profile>`` (``runs/<profile>-<dataset>`` when a profile runs a dataset other than its default)."""
    root = Path(os.environ.get("DIFFGR2_RUNS", REPO / "runs"))
    return root / (profile_name if dataset is None else f"{profile_name}-{dataset}")


def stage_dir(profile, stage: str) -> Path:
    """``runs/<profile>/<stage>``. Not created here: every writer creates its parent folder (:func:`atomic_write_text`,
    :func:`atomic_dir`), so reading, or failing before the first write, leaves no empty folder."""
    from .config import PROFILES

    default = PROFILES[profile.name].dataset if profile.name in PROFILES else None
    return runs_dir(profile.name, None if profile.dataset == default else profile.dataset) / stage


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` is a set-and-restore race)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _keep_mode(tmp: str | Path, final: Path, default: int) -> None:
    """Give a temporary file or folder the mode ``final`` has (or the umask's default for a new one).

    ``mkstemp``/``mkdtemp`` create 0600/0700 entries: replacing a 0644 README with one would make it owner-only.
    """
    try:
        mode = stat.S_IMODE(final.stat().st_mode)
    except FileNotFoundError:
        mode = default & ~_umask()
    os.chmod(tmp, mode)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        _keep_mode(tmp, path, 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, (set, tuple)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def atomic_dir(final: str | Path):
    """Context manager: yields a temporary folder that replaces ``final`` as a whole when the block succeeds."""
    final = Path(final)

    class _Ctx:
        def __enter__(self):
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
            _keep_mode(self.tmp, final, 0o777)
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            old = None
            if final.exists():
                old = final.parent / f".{final.name}.old.{os.getpid()}"
                os.replace(final, old)
            os.replace(self.tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return False

    return _Ctx()


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it to rebuild the stage") from exc


def device_name(device) -> str:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def stage_record(stage: str, profile, scored: dict, n_eval: int, device, wall_s: float, extra: dict | None = None,
                 split: str = "test") -> dict:
    """The DESIGN.md section 9 record of one evaluated system."""
    rec = {
        "stage": stage, "device": device_name(device), "profile": profile.name, "dataset": profile.dataset,
        "seed": profile.seed, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), "n_eval": int(n_eval), "split": split, "wall_s": round(float(wall_s), 2),
        "metrics": scored["metrics"], "metrics_strict": scored["metrics_strict"],
    }
    if extra:
        rec.update(extra)
    return rec


class Timer:
    def __enter__(self):
        self.t0 = time.time()
        return self

    def __exit__(self, *a):
        self.s = time.time() - self.t0
        return False


# ----------------------------------------------------------------------------------------------- results schema
METRICS = ("recall@1", "recall@3", "ndcg@3", "ndcg@10", "valid_rate", "duplicate_rate", "dropped_rate",
           "out_of_set_rate", "malformed_rate", "mean_reasoning_tokens", "mean_answer_tokens")
# every evaluated stage with a metrics record, in the results table's order (pipeline.STAGES adds data and speed)
RESULT_STAGES = ("retriever", "teacher", "ar_direct", "ar", "ar_constrained", "naive", "naive_constrained", "cft",
                 "cft_whole", "cft_sub4", "opd", "rl")
DIFFUSION_STAGES = ("naive", "naive_constrained", "cft", "cft_whole", "cft_sub4", "opd", "rl")
RECORD_SCHEMA = {"device": "str", "profile": "str", "dataset": "str", "seed": "int", "created": "ISO time",
                 "versions": "object", "n_eval": "int", "split": "str", "metrics": "object",
                 "metrics_strict": "object"}
DIFFUSION_SCHEMA = {"block_size": "int", "tau": "number", "tokens_per_forward": "number"}
VERSIONS_SCHEMA = {"torch": "str", "transformers": "str"}
SPEED_SCHEMA = {"device": "str", "versions": "object", "rows": "list"}
SPEED_ROW_SCHEMA = {"decoder": "str", "batch": "int", "block_size": "int", "tau": "number or null",
                    "tokens_per_s": "number", "ms_per_forward": "number", "tokens_per_forward": "number",
                    "latency_ms_per_request": "number", "recall@1": "number", "valid_rate": "number", "graphs": "bool"}


def _is(value, kind: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "ISO time":
        try:
            datetime.fromisoformat(value)
            return True
        except (TypeError, ValueError):
            return False
    return {"str": isinstance(value, str), "int": isinstance(value, int) and not isinstance(value, bool),
            "number": number, "number or null": number or value is None, "bool": isinstance(value, bool),
            "object": isinstance(value, dict), "list": isinstance(value, list)}[kind]


def _check_keys(obj, schema: dict, path, where: str = "") -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {where.rstrip('.') or 'the file'} should be a JSON object, got {type(obj).__name__}")
    for key, kind in schema.items():
        if key not in obj:
            raise ValueError(f"{path}: missing key {where}{key!r}")
        if not _is(obj[key], kind):
            raise ValueError(f"{path}: key {where}{key!r} should be {kind}, got {obj[key]!r:.60}")


def check_result(path: str | Path, stage: str) -> dict:
    """Read a stage's metrics file and check it has every key of DESIGN.md section 9 (extra keys are fine).

    ``results`` runs this on every file before it writes anything, so a truncated or partial run file is named and
    refused instead of replacing a committed result. Raises ValueError naming the file and the key.
    """
    rec = read_json(path)
    if stage == "speed":
        _check_keys(rec, SPEED_SCHEMA, path)
        for i, row in enumerate(rec["rows"]):
            _check_keys(row, SPEED_ROW_SCHEMA, path, f"rows[{i}].")
    else:
        _check_keys(rec, {**RECORD_SCHEMA, **(DIFFUSION_SCHEMA if stage in DIFFUSION_STAGES else {})}, path)
        for part in ("metrics", "metrics_strict"):
            _check_keys(rec[part], dict.fromkeys(METRICS, "number"), path, f"{part}.")
    _check_keys(rec["versions"], VERSIONS_SCHEMA, path, "versions.")
    return rec
