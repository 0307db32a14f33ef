"""Where an invalid ranking goes wrong: the first bad item of the answer, what is wrong with it, and where it came from.

``parse_ranking`` says *whether* an answer is a permutation of the candidates; these diagnostics say *where* it
stops being one, which is what tells you what the model has not learned:

* ``where``: the part of the output that breaks first: ``no answer`` (no ``<answer>`` span), ``pick`` (the first
  answer item, the one the trace's pick decides), ``rest`` (items 2..N, the order that follows the check), or
  ``end`` (the right items, but too few, too many, or not closed);
* ``kind``: ``duplicate`` (a candidate already written), ``out_of_set`` (a SID that is not a candidate), ``stray``
  (a token that is neither a label nor a whole SID), ``missing`` / ``extra`` items, ``unclosed``;
* ``level``: for an out-of-set SID, the first SID level whose code differs from the candidate its label names (from
  the closest candidate when there is no label);
* ``copied_from``: where that wrong code comes from: ``candidate`` (another candidate has this code at this level),
  ``history`` (a history item has it), or ``nowhere``. Codes copied from the wrong item are the signature of a model
  that copies by SID prefix instead of by label.

When the trace ends with the candidates' ranks (``ranks #2 #1 ...``), :func:`ranks_state` says whether an answer's
mistake was already in those ranks (``broken``: not a permutation), was made while following them (``departed``: the
answer's order is not theirs), or lies inside an item whose label was right (``followed``: e.g. a wrong SID code).

The ranks are a count over the check's points and the pick, which a model can learn by heart for the point patterns
it has seen in training instead of counting. :func:`check_pattern` reads the (points, pick) an output's own trace
wrote; given the training patterns (:func:`training_check_patterns`), the table says how many invalid answers, and
how many answers in all, came from a check no training row had.

:func:`failure_table` counts these over a whole evaluation, for notebooks 02 and 04.
"""
from __future__ import annotations

from collections import Counter

from .data.teacher import rank_tokens
from .text import ANSWER, LEVEL_NAMES, answer_items, label_position, label_token, output_tokens, split_output

PARTS = ("no answer", "pick", "rest", "end")


def _first_difference(sid: tuple[str, ...], reference: tuple[str, ...]) -> int:
    return next((lvl for lvl, (a, b) in enumerate(zip(sid, reference)) if a != b), len(sid))


def locate_failure(output, candidates: list[tuple[str, ...]], history: list[tuple[str, ...]] | None = None) -> dict:
    """The first thing wrong with ``output`` (a string or token list) as a ranking of ``candidates``.

    Returns a dict with ``where`` (``valid`` when nothing is wrong), ``kind``, ``slot`` (1-based item index), and for
    out-of-set SIDs ``level`` (a letter) and ``copied_from``. Never raises on model output.
    """
    _, answer_at, body, closed = split_output(output)       # None, a number, a string or tokens: never raises
    candidates = [tuple(c) for c in candidates or []]
    history = [tuple(h) for h in (history or [])]
    out = {"where": "valid", "kind": None, "slot": None, "level": None, "copied_from": None}
    if not candidates:
        raise ValueError("locate_failure needs the candidates' SIDs (got none)")
    n, sid_len = len(candidates), len(candidates[0])
    if answer_at is None:
        return {**out, "where": "no answer", "kind": "no answer"}
    index = {c: k for k, c in enumerate(candidates)}
    seen: set[int] = set()
    for slot, (label, sid, _) in enumerate(answer_items(body, sid_len), start=1):
        where = "pick" if slot == 1 else "rest"
        if slot > n:
            return {**out, "where": "end", "kind": "extra", "slot": slot}
        if sid is None:
            return {**out, "where": where, "kind": "stray", "slot": slot}
        k = index.get(sid)
        if k is None:
            ref = candidates[label] if label is not None and 0 <= label < n else max(
                candidates, key=lambda c: _first_difference(sid, c))
            lvl = _first_difference(sid, ref)
            code = sid[lvl] if lvl < sid_len else None
            others = [c for c in candidates if c != ref]
            source = ("candidate" if any(c[lvl] == code for c in others) else
                      "history" if any(h[lvl] == code for h in history if len(h) == sid_len) else "nowhere")
            return {**out, "where": where, "kind": "out_of_set", "slot": slot, "level": LEVEL_NAMES[lvl],
                    "copied_from": source}
        if k in seen:
            return {**out, "where": where, "kind": "duplicate", "slot": slot}
        seen.add(k)
    if len(seen) < n:
        return {**out, "where": "end", "kind": "missing", "slot": len(seen) + 1}
    if not closed:
        return {**out, "where": "end", "kind": "unclosed"}
    return out


def pick_agrees(output, n_candidates: int) -> bool | None:
    """Does the answer's first label repeat the trace's ``pick``? None when either is missing."""
    tokens = output_tokens(output)
    if "pick" not in tokens or ANSWER not in tokens:
        return None
    i, a = tokens.index("pick"), len(tokens) - 1 - tokens[::-1].index(ANSWER)
    if i + 1 >= len(tokens) or a + 1 >= len(tokens):
        return None
    picked, first = tokens[i + 1], tokens[a + 1]
    labels = {label_token(k) for k in range(n_candidates)}
    if picked not in labels or first not in labels:
        return None
    return picked == first


def ranks_state(output, n_candidates: int) -> str | None:
    """How the answer relates to the trace's ``ranks`` list (the last one before the answer).

    ``broken``: the ranks are not a permutation of ``#1``..``#N`` (or a further rank follows them); ``departed``: they
    are, but the answer's labels are not the order they give; ``followed``: the answer's labels are that order (an
    invalid answer can still have followed them, with a wrong SID under the right label). None when there is no
    answer, or no ranks list before it. Never raises on model output.
    """
    tokens, a, body, _ = split_output(output)
    n = int(n_candidates)
    if n <= 0 or a is None or "ranks" not in tokens[:a]:
        return None
    i = a - tokens[:a][::-1].index("ranks")                  # just after the last "ranks" before the answer
    ranks, after = tokens[i:i + n], tokens[i + n:i + n + 1]
    expected = rank_tokens(list(range(n)))                    # #1 .. #N, spelled as the teacher writes them
    if sorted(ranks, key=lambda t: (len(t), t)) != expected or (after and after[0].startswith("#")):
        return "broken"
    order = [label_token(ranks.index(r)) for r in expected]
    named = set(order)
    labels = [t for t in body if t in named][:n]
    return "followed" if labels == order else "departed"


def check_pattern(output, n_candidates: int) -> tuple[tuple[int, ...], int] | None:
    """The (points of candidates [1]..[N], pick position) an output's trace wrote in its check, or None when the
    output has no check of N labelled entries in order, each ending in its points, followed by ``pick [k]``.
    Never raises on model output."""
    tokens = output_tokens(output)
    n = int(n_candidates)
    if "check" not in tokens or "pick" not in tokens[tokens.index("check"):]:
        return None
    start = tokens.index("check") + 1
    pick_at = tokens.index("pick", start)
    entries = [e for e in " ".join(tokens[start:pick_at]).split(";") if e.split() and set(e.split()) != {"-"}]
    if len(entries) != n or pick_at + 1 >= len(tokens):
        return None
    points = []
    for k, entry in enumerate(entries):
        words = entry.split()
        if words[0] != label_token(k) or not (words[-1].isascii() and words[-1].isdigit()):
            return None
        points.append(int(words[-1]))
    pick = label_position(tokens[pick_at + 1])
    return (tuple(points), pick) if pick is not None and pick < n else None


def check_patterns(outputs, n_candidates: int) -> set:
    """Every :func:`check_pattern` among ``outputs`` (e.g. the teacher completions SFT trains on)."""
    return {p for p in (check_pattern(out, n_candidates) for out in outputs) if p is not None}


def training_check_patterns(ex) -> set:
    """The :func:`check_patterns` of the rows SFT trains on (an :class:`~diffgr2_lite.data.examples.ExampleSet`'s
    rejection-sampled and reading rows)."""
    completions = [c for split in ("train", "reading") for c in ex.splits[split]["completion"]]
    return check_patterns(completions, ex.fmt.n_candidates)


def failure_table(outputs: list[str], rows: list[dict], sid_words, seen_checks: set | None = None) -> dict:
    """Counts of :func:`locate_failure` over an evaluation (``rows`` carry ``candidates`` and ``history`` item ids).

    Returns ``n``, ``invalid``, and for invalid outputs the counts of ``where``, ``kind``, ``level`` and
    ``copied_from``, plus ``pick_disagrees`` (answers whose first item is not the trace's pick) and ``ranks`` (the
    :func:`ranks_state` of invalid outputs that have an answer and a ranks list before it). With ``seen_checks`` (the
    training rows' :func:`check_patterns`), ``unseen_check``: outputs that wrote a check and pick no training row had
    (an output without a readable check is not counted), ``all`` of them and the ``invalid`` ones.
    """
    where, kind, level, source, ranks = Counter(), Counter(), Counter(), Counter(), Counter()
    disagree = 0
    unseen = Counter()
    for out, r in zip(outputs, rows):
        cands = [sid_words(c) for c in r["candidates"]]
        f = locate_failure(out, cands, [sid_words(h) for h in r.get("history", [])])
        if pick_agrees(out, len(cands)) is False:
            disagree += 1
        pattern = check_pattern(out, len(cands)) if seen_checks is not None else None
        is_unseen = pattern is not None and pattern not in seen_checks
        unseen["all"] += is_unseen
        if f["where"] == "valid":
            continue
        unseen["invalid"] += is_unseen
        where[f["where"]] += 1
        kind[f["kind"]] += 1
        state = ranks_state(out, len(cands))
        if state:
            ranks[state] += 1
        if f["level"]:
            level[f["level"]] += 1
            source[f["copied_from"]] += 1
    table = {"n": len(outputs), "invalid": sum(where.values()), "where": dict(where), "kind": dict(kind),
             "level": dict(level), "copied_from": dict(source), "pick_disagrees": disagree,
             "ranks": dict(ranks)}
    if seen_checks is not None:
        table["unseen_check"] = {"all": unseen["all"], "invalid": unseen["invalid"]}
    return table


def failure_rows(systems: dict[str, dict], ds, sid_words, seen_checks: set | None = None) -> list[dict]:
    """One table row per system (name -> scored evaluation on ``ds``): where and how its invalid answers break (with
    ``seen_checks``, also how many came from a check that no training row had: see :func:`failure_table`)."""
    rows = ds.select_columns(["candidates", "history"]).to_list()
    out = []
    for name, scored in systems.items():
        t = failure_table(scored["outputs"], rows, sid_words, seen_checks)
        n, bad = t["n"], max(1, t["invalid"])
        row = {"system": name, "invalid": f"{t['invalid'] / max(1, n):.1%}"}
        for part in ("pick", "rest", "end", "no answer"):
            row[f"at {part}"] = f"{t['where'].get(part, 0) / bad:.0%}"
        for kind in ("duplicate", "out_of_set", "stray"):
            row[kind] = f"{t['kind'].get(kind, 0) / bad:.0%}"
        oos = max(1, sum(t["level"].values()))
        row["wrong level (a/b/c)"] = "/".join(f"{t['level'].get(c, 0) / oos:.0%}" for c in "abc")
        row["copied from cand/hist/none"] = "/".join(f"{t['copied_from'].get(s, 0) / oos:.0%}"
                                                     for s in ("candidate", "history", "nowhere"))
        row["answer ≠ pick"] = f"{t['pick_disagrees'] / max(1, n):.1%}"
        if t["ranks"]:
            row["ranks already broken"] = f"{t['ranks'].get('broken', 0) / bad:.0%}"
        if "unseen_check" in t:
            u = t["unseen_check"]
            row["check unseen in training: invalid / all"] = f"{u['invalid'] / bad:.0%} / {u['all'] / max(1, n):.0%}"
        out.append(row)
    return out
