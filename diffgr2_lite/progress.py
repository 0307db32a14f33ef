"""Progress bars that read well live and in committed notebooks.

``from .progress import tqdm`` is a drop-in for ``tqdm.auto.tqdm``:

* **Run by a person** (JupyterLab, a terminal): tqdm.auto's bar, the notebook widget in Jupyter.
* **Run headless** (``DIFFGR2_PLAIN_PROGRESS=1``, which ``python -m diffgr2_lite notebooks`` and ``make nbval`` set
  for their kernels): a plain-text bar that is never redrawn and writes one final line to stdout when it closes
  (``desc: 100%|██████████| 56/56 [01:19<00:00, 0.71it/s]``); a ``leave=False`` bar writes nothing. An executed
  notebook then keeps readable lines, not widgets that an untrusted notebook shows frozen at 0%, nor thousands of
  redraws. The bars of transformers, datasets and huggingface_hub (loading weights, saving shards) are switched off.
* **Either way** a bar over at most one step is disabled: it would sit at 0% for the whole step.
"""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.std import tqdm as _std_tqdm

PLAIN_ENV = "DIFFGR2_PLAIN_PROGRESS"


def plain() -> bool:
    """Headless run: ``$DIFFGR2_PLAIN_PROGRESS`` set to anything but empty/0/false/no."""
    return os.environ.get(PLAIN_ENV, "").strip().lower() not in ("", "0", "false", "no")


class PlainTqdm(_std_tqdm):
    """A text bar that draws nothing while it runs and writes its final state as one line when it closes."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("file", sys.stdout)
        kwargs.setdefault("dynamic_ncols", False)
        kwargs.setdefault("mininterval", 3600)      # no redraws (display() below ignores them anyway)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):          # never redrawn: the final line is written by close()
        return True

    def close(self):
        if self.disable:
            return
        leave = (self.pos == 0) if self.leave is None else self.leave
        line = None
        if leave:
            self._ema_dt = lambda: None              # the overall rate, as tqdm's own final line
            line = self.__str__()
        self.disable = True
        self._decr_instances(self)
        if line:
            self.fp.write(line.rstrip() + "\n")
            self.fp.flush()


def _steps(args, kwargs):
    total = kwargs.get("total")
    if total is None:
        iterable = args[0] if args else kwargs.get("iterable")
        try:
            total = len(iterable)
        except TypeError:
            return None
    return total


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm`` for people, :class:`PlainTqdm` headless; disabled over at most one step (see module doc)."""
    total = _steps(args, kwargs)
    if total is not None and total <= 1:
        kwargs["disable"] = True
    if plain():
        if kwargs.get("leave") is False:
            kwargs["disable"] = True                  # it would erase itself anyway
        return PlainTqdm(*args, **kwargs)
    return _auto_tqdm(*args, **kwargs)


def quiet_library_bars() -> None:
    """Switch off the progress bars of transformers, datasets and huggingface_hub (already imported or not)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import importlib

    for lib, module, fn in (("huggingface_hub", "huggingface_hub.utils", "disable_progress_bars"),
                            ("transformers", "transformers.utils.logging", "disable_progress_bar"),
                            ("datasets", "datasets.utils.tqdm", "disable_progress_bars")):
        if lib in sys.modules:
            getattr(importlib.import_module(module), fn)()


if plain():
    quiet_library_bars()
