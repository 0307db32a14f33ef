"""The text layer: one vocabulary, one tokenizer, the prompt/completion format and a ranking parser that never raises.

Every "word" of the format is one whitespace-separated token, so the tokenizer is a word-level one (built with the
``tokenizers`` library, wrapped as a transformers fast tokenizer). An item is written as its semantic ID (one token per
level, ``<a_3> <b_17> <c_0>``) followed by a few words. Candidates carry a **label** ``[1]`` ... ``[10]`` in the
prompt (RankGPT-style), the reasoning refers to them by label, and the answer writes each ranked candidate as its
label followed by its SID::

    prompt     = <bos> <user> history : ITEM x H  candidates : ([k] ITEM) x 10 <assistant>
    completion = <think> reasoning </think> <answer> ([k] SID) x 10 </answer> <eos>

Why labels (a deviation from the paper, whose answer is the bare SIDs): a small model trained from scratch must copy
every SID code exactly, and candidates share SID prefixes with each other and with history items, so "the code that
follows ``<a_31>``" is ambiguous. A label in front of the SID makes every copy a one-step lookup (find ``[k]`` in the
prompt, copy what follows it), and keeps track of which candidates are already written with 10 fixed tokens. The
answer is still judged by its SIDs alone: a duplicated, dropped or out-of-set SID is exactly as invalid as in the
paper, so the structural gap of a parallel decoder stays the paper's.

Prompts have a fixed length (short histories are left-filled with ``<pad>`` item slots), so a batch of prompts is a
plain rectangle: no padding masks, identical positions in every row, static shapes for CUDA graphs.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

PAD, BOS, EOS, UNK, MASK = "<pad>", "<bos>", "<eos>", "<unk>", "<mask>"
USER, ASSISTANT = "<user>", "<assistant>"
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, MASK, USER, ASSISTANT, THINK, END_THINK, ANSWER, END_ANSWER]
LEVEL_NAMES = "abcdefgh"
_SID_RE = re.compile(r"^<([a-h])_(\d+)>$")
_LABEL_RE = re.compile(r"^\[(\d+)\]$")
_WORD_RE = re.compile(r"[a-z0-9]+")


def sid_tokens(codes) -> tuple[str, ...]:
    """Semantic-ID codes (one int per level) -> their tokens, e.g. (3, 17, 0) -> ('<a_3>', '<b_17>', '<c_0>')."""
    return tuple(f"<{LEVEL_NAMES[level]}_{int(c)}>" for level, c in enumerate(codes))


def label_token(position: int) -> str:
    """The label of the candidate at 0-based ``position`` in the retriever's list: 0 -> '[1]'."""
    return f"[{int(position) + 1}]"


def label_token_ids(tokenizer, n: int) -> list[int]:
    """The token ids of the labels ``[1]``..``[n]``, in candidate order."""
    return tokenizer.convert_tokens_to_ids([label_token(k) for k in range(n)])


def label_position(token: str) -> int | None:
    """'[3]' -> 2 (the 0-based candidate position); None for any other token."""
    m = _LABEL_RE.match(str(token))
    return int(m.group(1)) - 1 if m else None


def word_token(text: str) -> str:
    """A category or brand name as one token: 'Creams & Moisturizers' -> 'Creams_&_Moisturizers'."""
    return "_".join(str(text).split()) or UNK


def title_words(title: str, k: int) -> list[str]:
    """The first k lower-case alphanumeric words of a title (padded with '-' so every item has the same length)."""
    words = _WORD_RE.findall(title.lower())[:k]
    return words + ["-"] * (k - len(words))


# ----------------------------------------------------------------------------------------------- the format
@dataclass(frozen=True)
class PromptFormat:
    """Fixed-length prompt layout: ``history_len`` item slots, ``n_candidates`` labelled candidates, ``title_words``
    per item."""

    history_len: int
    n_candidates: int
    title_words: int
    sid_len: int

    @property
    def item_len(self) -> int:
        return self.sid_len + 2 + self.title_words + 1          # SID, brand, category, title words, ';'

    @property
    def prompt_len(self) -> int:
        return 7 + self.history_len * self.item_len + self.n_candidates * (self.item_len + 1)

    @property
    def candidate_sid_positions(self) -> list[list[int]]:
        """Prompt positions of each candidate's SID codes (the prompt is fixed-length, one token per word)."""
        first = 4 + self.history_len * self.item_len + 2          # <bos> <user> history : [items] candidates :
        return [[first + k * (self.item_len + 1) + 1 + j for j in range(self.sid_len)]
                for k in range(self.n_candidates)]

    @property
    def answer_len(self) -> int:
        return 2 + self.n_candidates * (self.sid_len + 1) + 1  # <answer> ([k] SID) x N </answer> <eos>


def item_words(sid: tuple[str, ...], brand: str | None, category: str, title: str, n_title: int) -> list[str]:
    return [*sid, word_token(brand) if brand else "no_brand", word_token(category), *title_words(title, n_title), ";"]


def build_prompt(fmt: PromptFormat, history: list[list[str]], candidates: list[list[str]]) -> str:
    """Join item word lists into the fixed-length prompt (the most recent ``history_len`` items are kept).

    Each candidate is preceded by its label, ``[1]`` for the retriever's first.
    """
    if len(candidates) != fmt.n_candidates:
        raise ValueError(f"expected {fmt.n_candidates} candidates, got {len(candidates)}")
    hist = history[-fmt.history_len:]
    pad_slots = [[PAD] * fmt.item_len] * (fmt.history_len - len(hist))
    words = [BOS, USER, "history", ":"]
    for item in pad_slots + hist:
        words += item
    words += ["candidates", ":"]
    for pos, item in enumerate(candidates):
        words += [label_token(pos), *item]
    words += [ASSISTANT]
    assert len(words) == fmt.prompt_len, (len(words), fmt.prompt_len)
    return " ".join(words)


def build_answer(candidates: list[tuple[str, ...]], order: list[int] | None = None) -> str:
    """``<answer> [k] SID ... </answer> <eos>``: the candidates (SIDs in retriever order) ranked by ``order``
    (0-based positions; default: the retriever's order)."""
    order = list(range(len(candidates))) if order is None else order
    body = [t for p in order for t in (label_token(p), *candidates[p])]
    return " ".join([ANSWER, *body, END_ANSWER, EOS])


def build_completion(reasoning: str | None, candidates: list[tuple[str, ...]], order: list[int]) -> str:
    """Reasoning (None for the direct, no-reasoning variant) followed by the ranked answer and the end token."""
    answer = build_answer(candidates, order)
    return f"{THINK} {reasoning} {END_THINK} {answer}" if reasoning is not None else answer


# ----------------------------------------------------------------------------------------------- parsing
@dataclass
class ParsedRanking:
    """What a model's output says, and what scoring does with it.

    ``ranking`` is the list of candidate positions (0 = the retriever's first) used for paper scoring: the model's own
    ranking when valid, else the retriever order (the paper's fallback). ``model_ranking`` is what the model wrote,
    mapped to candidate positions where it could be (-1 for an out-of-set SID).
    """

    ranking: list[int]
    model_ranking: list[int]
    valid: bool
    duplicate: bool = False
    dropped: bool = False
    out_of_set: bool = False
    malformed: bool = False
    reasoning_tokens: int = 0
    answer_tokens: int = 0
    notes: list[str] = field(default_factory=list)


def output_tokens(output) -> list[str]:
    """A model output (a string, a token list, or garbage) as a list of token strings; [] when it is neither."""
    if output is None:
        return []
    if isinstance(output, str):
        return output.split()
    try:
        return [str(t) for t in output]
    except TypeError:
        return []


class OutputParts(NamedTuple):
    """A model output cut where the parser and the diagnostics read it (see :func:`split_output`)."""

    tokens: list[str]            # the output up to its first <eos>
    answer_at: int | None        # index in ``tokens`` of the last <answer> (None without one)
    body: list[str]              # the tokens after it, up to </answer>
    closed: bool                 # whether a </answer> ends the body


def split_output(output) -> OutputParts:
    """Cut an output at its first ``<eos>``, find its last ``<answer>`` and the answer body up to ``</answer>``: the one
    reading of an output that :func:`parse_ranking` and the failure diagnostics share. Never raises."""
    tokens = output_tokens(output)
    if EOS in tokens:
        tokens = tokens[: tokens.index(EOS)]
    if ANSWER not in tokens:
        return OutputParts(tokens, None, [], False)
    start = len(tokens) - 1 - tokens[::-1].index(ANSWER)      # the last answer span counts
    body = tokens[start + 1:]
    closed = END_ANSWER in body
    return OutputParts(tokens, start, body[: body.index(END_ANSWER)] if closed else body, closed)


def read_sid(body: list[str], i: int, sid_len: int) -> tuple[str, ...] | None:
    """The SID starting at ``body[i]`` if the next ``sid_len`` tokens are one code per level, in level order."""
    chunk = tuple(body[i:i + sid_len])
    levels = [_SID_RE.match(t) for t in chunk]
    if len(chunk) == sid_len and all(m and m.group(1) == LEVEL_NAMES[k] for k, m in enumerate(levels)):
        return chunk
    return None


def answer_items(body: list[str], sid_len: int) -> list[tuple[int | None, tuple[str, ...] | None, int]]:
    """The answer body read as items, in order: (label position or None, SID or None, index of its first token).

    An item is an optional label followed by a whole SID. A token that starts no such item (a label followed by
    anything but an SID, a broken SID, a word) is a stray: an item with SID None, and reading resumes at the next token.
    """
    items, i = [], 0
    while i < len(body):
        label = label_position(body[i])
        j = i + (label is not None)                       # the SID starts after the label, if there is one
        sid = read_sid(body, j, sid_len)
        items.append((label, sid, i))
        i = j + sid_len if sid is not None else i + 1
    return items


def parse_ranking(output, candidates: list[tuple[str, ...]]) -> ParsedRanking:
    """Parse a completion (a string or a list of token strings) against the 10 candidate SIDs. Never raises.

    Valid means: an ``<answer> ... </answer>`` span whose items are SIDs, each optionally preceded by a label, that
    form a permutation of the candidates. **The SIDs decide**: a label is an anchor for the writer, not part of the
    ranking (a label that names another candidate than its SID is noted, not scored). Otherwise each failure is
    flagged: ``malformed`` (no answer span, stray tokens, a broken SID), ``out_of_set`` (an SID that is not a
    candidate), ``duplicate`` (a candidate twice), ``dropped`` (a candidate missing).
    """
    fallback: list[int] = []
    try:
        candidates = [tuple(c) for c in candidates]               # inside the guard: candidates may be None
        n = len(candidates)
        fallback = list(range(n))
        tokens, answer_at, body, closed = split_output(output)
        index = {c: i for i, c in enumerate(candidates)}
        sid_len = len(candidates[0]) if candidates else 3
        res = ParsedRanking(ranking=fallback, model_ranking=[], valid=False)
        res.reasoning_tokens = tokens.index(END_THINK) - tokens.index(THINK) - 1 if (
            THINK in tokens and END_THINK in tokens and tokens.index(END_THINK) > tokens.index(THINK)) else 0
        if not candidates:
            res.malformed = True
            res.notes.append("no candidates to parse against")
            return res
        if answer_at is None:
            res.malformed = True
            res.notes.append("no <answer> marker")
            return res
        if not closed:
            res.malformed = True
            res.notes.append("answer not closed")
        res.answer_tokens = len(body)
        sids: list[tuple[str, ...]] = []
        for label, chunk, i in answer_items(body, sid_len):
            if chunk is not None:
                sids.append(chunk)
                if label is not None and index.get(chunk, -1) not in (-1, label):
                    res.notes.append(f"label {body[i]} names another candidate than its SID")
            else:
                res.malformed = True
                res.notes.append(f"stray token {body[i]!r}")
        mapped = [index.get(s, -1) for s in sids]
        res.model_ranking = mapped
        res.out_of_set = any(m < 0 for m in mapped)
        seen = [m for m in mapped if m >= 0]
        res.duplicate = len(seen) != len(set(seen))
        res.dropped = len(set(seen)) < n
        res.valid = not (res.malformed or res.out_of_set or res.duplicate or res.dropped) and len(mapped) == n
        if res.valid:
            res.ranking = mapped
        return res
    except Exception as exc:  # the contract is "never raises": anything unexpected is a malformed output
        return ParsedRanking(ranking=fallback, model_ranking=[], valid=False, malformed=True,
                             notes=[f"parser error: {exc!r}"])


# ----------------------------------------------------------------------------------------------- tokenizer
def build_vocabulary(texts, sid_codebook_sizes: tuple[int, ...], min_count: int = 1, max_words: int = 20000,
                     n_labels: int = 10) -> list[str]:
    """Special tokens, every SID token, the candidate labels, then the words of ``texts`` by frequency (rarer ones
    become ``<unk>``)."""
    vocab = list(SPECIAL_TOKENS)
    for level, size in enumerate(sid_codebook_sizes):
        vocab += [f"<{LEVEL_NAMES[level]}_{c}>" for c in range(size)]
    vocab += [label_token(k) for k in range(n_labels)]
    fixed = set(vocab)
    counts = Counter(w for t in texts for w in t.split() if w not in fixed)
    vocab += [w for w, c in counts.most_common(max_words) if c >= min_count]
    return vocab


def sid_token_ranges(tok, levels: int) -> list[tuple[int, int]]:
    """[(first id, count)] of each SID level's tokens in ``tok`` (they are contiguous, see :func:`build_vocabulary`)."""
    vocab = tok.get_vocab()
    out = []
    for level in range(levels):
        name = LEVEL_NAMES[level]
        first = vocab[f"<{name}_0>"]
        count = 0
        while vocab.get(f"<{name}_{count}>") == first + count:
            count += 1
        out.append((first, count))
    return out


def make_tokenizer(vocab: list[str]):
    """A transformers fast tokenizer over a word-level vocabulary (whitespace split; no merges, no lower-casing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(vocab)) != len(vocab):
        raise ValueError("vocabulary has duplicate entries")
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # joins tokens with single spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                  unk_token=UNK, mask_token=MASK)
    return tok


def save_tokenizer(tok, path: str | Path) -> None:
    tok.save_pretrained(str(path))


def load_tokenizer(path: str | Path):
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer at {path} (expected {path / 'tokenizer.json'})")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def vocab_fingerprint(tok) -> str:
    """A short hash of the vocabulary: checkpoints record it, loading a checkpoint checks it."""
    import hashlib

    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def encode(tok, texts: list[str]) -> list[list[int]]:
    """Space-separated words -> token ids, one list per text: what ``tok.convert_tokens_to_ids(text.split())``
    gives (an unknown word is ``<unk>``), looked up in one vocabulary dict (the per-token call costs ~6 s on the
    full profile's 12M tokens; the Rust batch encoder, which also builds offsets, measured slower still)."""
    vocab, unk = tok.get_vocab(), tok.unk_token_id
    return [[vocab.get(w, unk) for w in t.split()] for t in texts]


def decode_tokens(tok, ids) -> list[str]:
    """Token ids -> token strings (no joining, no special-token stripping: the parser wants them all)."""
    return tok.convert_ids_to_tokens([int(i) for i in ids])
