"""
Tokenize once: a JSONL file's examples as flat arrays on disk, memory-mapped by every rank and
every rerun, so a process's memory does not grow with the dataset and a restart does not tokenize
again.

    examples = cache.load("sft.jsonl", "sft", tok, {"max_length": 2048, "train_on_prompt": False})
    examples[i]  # {"input_ids": [...], "loss_mask": [...], "where": "sft.jsonl:17"}, as chat.tokenize_sft

Kinds (what a record becomes; the same functions as the uncached path, so the same ids):
  sft         formats.sft_example -> chat.tokenize_sft                 input_ids, loss_mask
  preference  formats.preference_example -> chat.tokenize_preference   prompt_ids, chosen_ids, rejected_ids (+ margin)
  unpaired    formats.unpaired_example -> tokenize_preference with both answers the completion (KTO's
              truncation rule)                                          prompt_ids, completion_ids, label
  prompts     formats.prompt_example -> chat.tokenize_prompt           prompt_ids, record (the JSON object)

Directory: <cache_dir or <data>.cache>/<kind>-<key>/ holding manifest.json, and per field either
<field>.bin (every example's values, concatenated) with <field>.off.npy (int64 [n + 1]: example i
is values[off[i]:off[i + 1]]), or <field>.npy (one value per example: the source line, KTO's
label, the RM margin with NaN for none). Tokens are uint32 and masks uint8: 5 bytes a token.

The key hashes everything the arrays depend on: the data file (size, mtime and its bytes), the
Tok object as rendering sees it (tokenizer.json as loaded, bos/eos, chat format, system prompt and
every other attribute), the kind and its settings (max_length, truncation), and the source of the
code that renders (chat.py, formats.py, this file). Any change gives a new key, hence a new
directory; old ones are left for the user to delete (`rm -r <data>.cache`).

Building: every rank reads the lines, tokenizes its share (chunks of CHUNK records, round-robin),
and writes its pieces into <dir>.tmp-<run id>; rank 0 joins them in record order, writes the
manifest and renames the directory into place, so a half-written cache is never read (a directory
without its manifest is rebuilt). Under torchrun the ranks must share the filesystem. With a
byte-level BPE of the Llama-3 / Qwen / GPT-2 kind, texts are cut at their added tokens and into
words, each distinct word encoded once (_MemoTokenizer: the same ids, 3-8x less tokenizer time once
words recur).
"""
import array
import bisect
import copy
import functools
import hashlib
import itertools
import json
import math
import operator
import os
import re
import shutil
import time

import numpy as np

from . import chat, formats

CHUNK = 1024  # records per rank's share (round-robin) and per write
U32, U8, I64, F64 = np.dtype("uint32"), np.dtype("uint8"), np.dtype("int64"), np.dtype("float64")
assert array.array("I").itemsize == U32.itemsize, "the build writes uint32 ids with the array module's 'I'"
LAYOUT = {  # kind: (per-example arrays of varying length, one-value-per-example arrays)
    "sft": ({"input_ids": U32, "loss_mask": U8}, {"line": I64}),
    "preference": ({"prompt_ids": U32, "chosen_ids": U32, "rejected_ids": U32}, {"line": I64, "margin": F64, "same": U8}),
    "unpaired": ({"prompt_ids": U32, "completion_ids": U32}, {"line": I64, "label": U8}),
    "prompts": ({"prompt_ids": U32, "record": U8}, {"line": I64}),
}
SETTINGS = {  # kind: the keyword settings its tokenization takes
    "sft": ("max_length", "train_on_prompt"),
    "preference": ("max_length", "max_prompt_length"),
    "unpaired": ("max_length", "max_prompt_length"),
    "prompts": ("max_prompt_length", "required"),
}


def encode(kind, rec, where, tok, s):
    """One JSONL record (a dict) -> its arrays, validated and tokenized as the uncached path does."""
    if kind == "sft":
        return chat.tokenize_sft(formats.sft_example(rec, where), tok, s["max_length"], s["train_on_prompt"])
    if kind == "preference":
        ex = formats.preference_example(rec, where)
        return {**chat.tokenize_preference(ex, tok, s["max_length"], s["max_prompt_length"]),
                "margin": float(ex.get("margin", math.nan)), "same": ex["chosen"] == ex["rejected"]}
    if kind == "unpaired":  # truncated by the pair rule, as a pair whose two answers are both the completion
        ex = formats.unpaired_example(rec, where)
        e = chat.tokenize_preference({**ex, "chosen": ex["completion"], "rejected": ex["completion"]}, tok,
                                     s["max_length"], s["max_prompt_length"])
        return {"prompt_ids": e["prompt_ids"], "completion_ids": e["chosen_ids"], "label": ex["label"]}
    if kind == "prompts":
        rec = formats.prompt_example(rec, where, s["required"])
        return {"prompt_ids": chat.tokenize_prompt(rec, tok, s["max_prompt_length"]),
                "record": json.dumps(rec).encode()}
    raise ValueError(f"data cache kind {kind!r}: expected one of {', '.join(LAYOUT)}")


# ----------------------------------------------------------------------------- loading

class Examples:
    """A cache directory's examples, read lazily from memory-mapped arrays: examples[i] is the
    dict the tokenize_* function returns (lists of ints), with "where" (file:line) and the
    record's scalars ("label"; "margin" when the record has one; "record" for prompts)."""

    def __init__(self, path, source):
        with open(os.path.join(path, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.path, self.source, self.n = path, source, self.manifest["records"]
        ragged, scalar = LAYOUT[self.manifest["kind"]]
        self.ragged = {k: (_mmap(os.path.join(path, f"{k}.bin"), dt), np.load(os.path.join(path, f"{k}.off.npy"), mmap_mode="r"))
                       for k, dt in ragged.items()}
        self.scalar = {k: np.load(os.path.join(path, f"{k}.npy"), mmap_mode="r") for k in scalar}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        i = int(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"example {i} of {self.n}")
        i %= self.n
        out = {}
        for k, (values, off) in self.ragged.items():
            v = values[off[i]:off[i + 1]]
            out[k] = json.loads(v.tobytes()) if k == "record" else v.tolist()
        out["where"] = f"{self.source}:{int(self.scalar['line'][i])}"
        if "label" in self.scalar:
            out["label"] = bool(self.scalar["label"][i])
        if "margin" in self.scalar and not math.isnan(m := float(self.scalar["margin"][i])):
            out["margin"] = m
        return out

    def column(self, name):
        """A one-value-per-example array (line, label, margin), memory-mapped."""
        return self.scalar[name]


class Unpaired:
    """Preference pairs seen as KTO's unpaired examples (TRL's unpair_preference_dataset): every
    chosen answer (desirable), then every rejected one, so that neighbours (the KL rows) have
    different prompts. Works on a list of tokenized pairs or on Examples, without copying."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return 2 * len(self.pairs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self.pairs)
        i %= 2 * n
        e = self.pairs[i % n]
        return {"prompt_ids": e["prompt_ids"], "completion_ids": e["chosen_ids" if i < n else "rejected_ids"],
                "label": i < n}


def _mmap(path, dtype):
    # np.memmap refuses an empty file
    return np.memmap(path, dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)


def key(path, kind, tok, settings):
    """Hex digest of everything the cached arrays depend on (see the module docstring)."""
    h = hashlib.blake2b(digest_size=16)
    st = os.stat(path)
    # every attribute of the Tok (fields added later included); objects other than plain data
    # (a compiled template, say) by their type only: their repr may hold an address
    attrs = {k: v.to_str() if k == "tokenizer" else json.dumps(v, sort_keys=True, default=lambda o: type(o).__name__)
             for k, v in vars(tok).items()}
    code = [open(os.path.join(os.path.dirname(__file__), f), "rb").read() for f in ("chat.py", "formats.py", "cache.py")]
    h.update(json.dumps({"kind": kind, "settings": settings, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                         "tok": attrs, "code": [hashlib.blake2b(c).hexdigest() for c in code]}, sort_keys=True).encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _complete(path, k):
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return json.load(f)["key"] == k
    except (OSError, ValueError, KeyError):
        return False


def load(path, kind, tok, settings, cache_dir="", rank=0, world=1, barrier=lambda: None, from_rank0=lambda x: x):
    """The examples of the JSONL file `path` as `kind` ("sft", "preference", "unpaired",
    "prompts"), from the cache if it matches, else tokenized into it first. settings: the kind's
    SETTINGS. Under torchrun every rank calls this with its rank, the world size, a barrier and
    from_rank0 (rank 0's value of an object, on every rank); they share the work of a build and
    read the same files. cache_dir: default <path>.cache."""
    if sorted(settings) != sorted(SETTINGS[kind]):
        raise ValueError(f"data cache kind {kind!r} takes settings {SETTINGS[kind]}, got {sorted(settings)}")
    # rank 0's key on every rank: ranks can see one file with different mtimes (the built-in task's
    # files are written by every rank, the last rename winning), and must agree on one directory
    k = from_rank0(key(path, kind, tok, settings))
    final = os.path.join(cache_dir or f"{path}.cache", f"{kind}-{k[:24]}")
    if _complete(final, k):
        if rank == 0:
            print(f"data cache: reusing {final}", flush=True)
        return _open(final, path, kind, rank)
    t0 = time.time()
    # one name for every rank of this job (torchrun gives them a run id), another for any other job
    tmp = f"{final}.tmp-{os.environ.get('TORCHELASTIC_RUN_ID', os.getpid())}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    try:
        n = _build_part(path, kind, tok, settings, tmp, rank, world)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if rank == 0:
        _join(tmp, kind, n, world)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({"key": k, "kind": kind, "records": n, "source": os.path.abspath(path), "settings": settings,
                       "tokens": int(np.load(os.path.join(tmp, next(iter(LAYOUT[kind][0])) + ".off.npy"), mmap_mode="r")[-1])}, f)
        if os.path.isdir(final):  # left incomplete (or another job just finished it: same content)
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another job renamed its identical copy into place first
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"data cache: tokenized {n} records of {path} into {final} in {time.time() - t0:.1f}s "
              f"({world} process{'es' if world > 1 else ''})", flush=True)
    barrier()
    return _open(final, path, kind, rank)


def _open(final, path, kind, rank):
    examples = Examples(final, path)
    if kind == "preference" and rank == 0:  # the cached twin of formats.load_preference's warning
        same = np.flatnonzero(examples.column("same"))
        formats.warn_identical(path, len(same), examples.column("line")[same[:6]].tolist(), len(examples))
    return examples


# ----------------------------------------------------------------------------- building

# Llama-3's (GPT-4's) and Qwen2/3's pre-tokenizer regexes, and GPT-2's: in each, a space inside a
# match is either its first character or one of a run of whitespace. So a space that follows a
# non-space character always starts a match, and encoding the text piece by piece, cut before each
# such space, gives exactly the tokens of encoding it whole (see _word_memo)
SPLIT_PATTERNS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
CUT = re.compile(r"(?= )(?<=\S)")  # Python's \s is a superset of Unicode White_Space, so \S is safe
GAP = re.compile(r"\s ")  # where absent, CUT cuts before every space
MEMO_SIZE = 1 << 18  # pieces remembered (~250 bytes each), then forgotten all at once


def _word_memo(tk):
    """True when tk's tokens of a text are the concatenation of those of its pieces cut by CUT:
    a BPE whose pre-tokenizer is byte-level with one of the known regexes (or GPT-2's own), no
    normalizer but NFC (which never joins across a space), and no added token that holds or strips
    whitespace."""
    from tokenizers import models

    pre = json.loads(tk.pre_tokenizer.__getstate__()) if tk.pre_tokenizer else {}
    norm = json.loads(tk.normalizer.__getstate__()) if tk.normalizer else None
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"]:  # GPT-2: the regex is ByteLevel's own
        ok = steps[0].get("use_regex", True)
    else:
        ok = (types == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
              and steps[0].get("pattern", {}).get("Regex") in SPLIT_PATTERNS
              and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"))
    return (ok and not steps[-1].get("add_prefix_space") and isinstance(tk.model, models.BPE)
            and (norm is None or norm.get("type") == "NFC")
            and not any(t.lstrip or t.rstrip or any(c.isspace() for c in t.content)
                        for t in tk.get_added_tokens_decoder().values()))


IDS, CHARS = operator.itemgetter(0), operator.itemgetter(2)  # of a piece's (ids, offsets, characters)


class _Encoding:
    """A text's ids, and when asked their offsets, from its pieces' (see _MemoTokenizer)."""

    def __init__(self, ids, pieces):
        self.ids, self.pieces = ids, pieces  # pieces: (ids, offsets, characters) of each, in order

    @property
    def offsets(self):
        starts = itertools.accumulate(map(CHARS, self.pieces), initial=0)
        return [(a + at, b + at) for (_, offs, _), at in zip(self.pieces, starts) for a, b in offs]

    @property
    def ends(self):
        return _Ends(self.pieces)


class _Ends:
    """ends[t] (token t's end offset in the text) and first_ending_after(c, lo) (what bisecting the
    ends gives), looked up in the pieces' offsets when asked: chat.py needs a few per text, not a
    list of every token's."""

    def __init__(self, pieces):
        self.pieces = pieces

    @functools.cached_property
    def start(self):  # each piece's first character
        return list(itertools.accumulate(map(CHARS, self.pieces), initial=0))

    @functools.cached_property
    def first(self):  # each piece's first token
        return list(itertools.accumulate(map(len, map(IDS, self.pieces)), initial=0))

    def __len__(self):
        return self.first[-1]

    def __getitem__(self, t):
        if not 0 <= t < self.first[-1]:
            raise IndexError(f"token {t} of {self.first[-1]}")
        j = bisect.bisect_right(self.first, t) - 1
        return self.start[j] + self.pieces[j][1][t - self.first[j]][1]

    def first_ending_after(self, c, lo=0):
        """The first token t >= lo with ends[t] > c (bisect.bisect_right(ends, c, lo))."""
        at = t = 0  # the piece's first character and token
        for ids, offs, n in self.pieces:
            if at + n > c:
                for i, (_, b) in enumerate(offs):
                    if at + b > c:
                        return max(lo, t + i)
            at, t = at + n, t + len(ids)
        return max(lo, t)


def _added_split(tk):
    """A regex that cuts a text at its added tokens (<|eot_id|>, ...) as the library finds them:
    leftmost-longest in the raw text, the text between them pre-tokenized on its own. None where
    some token is matched otherwise (in the normalized text, or as a single word only)."""
    added = tk.get_added_tokens_decoder().values()
    if not added or any(t.normalized or t.single_word for t in added) or getattr(tk, "encode_special_tokens", False):
        return None
    # at each position the first alternative that matches wins: longest first gives leftmost-longest
    return re.compile("(" + "|".join(map(re.escape, sorted({t.content for t in added}, key=len, reverse=True))) + ")")


class _MemoTokenizer:
    """Stands in for the Tokenizer while building: a text (without special tokens added) is cut at
    its added tokens and then by CUT into pieces, each encoded once and remembered. Most pieces of
    natural text recur (words with their leading space), so most are never encoded again: the
    regex pre-tokenizer, which is most of tokenizing's cost, runs once per distinct piece, not
    once per occurrence. (Without the cut at added tokens a template's "last word<|eot_id|>...
    <|end_header_id|>\n\nfirst" would be a piece, new in nearly every conversation.)"""

    def __init__(self, tk):
        self.tk, self.added = tk, _added_split(tk)
        # an added token to join new pieces by (see _encode_pieces)
        self.sep = next(((i, t.content) for i, t in tk.get_added_tokens_decoder().items()), None) if self.added else None
        # piece -> (ids, offsets, characters); "spaced" holds the same for pieces that start with a
        # space, keyed without it (the common case below finds them without building the string)
        self.bare, self.spaced = {}, {}

    def _walk(self, text, bare, spaced):
        """bare(piece) or spaced(piece without its leading space) of each piece of text, in order."""
        out = []
        for seg in self.added.split(text) if self.added else (text,):
            if " " not in seg:
                if seg:
                    out.append(bare(seg))
            elif GAP.search(seg):  # a space after whitespace somewhere: cut by the rule itself
                out += map(bare, CUT.split(seg))
            else:  # every space follows a non-space, so each starts a piece
                words = seg.split(" ")
                if words[0]:
                    out.append(bare(words[0]))
                out += map(spaced, words[1:])
        return out

    def encode(self, text, add_special_tokens=True):
        if add_special_tokens:
            return self.tk.encode(text, add_special_tokens=True)
        try:  # the common case: every piece seen before, one lookup each
            pieces = self._walk(text, self.bare.__getitem__, self.spaced.__getitem__)
        except KeyError:
            pieces = self._learn(text)
        ids = []
        for p in pieces:
            ids += p[0]
        return _Encoding(ids, pieces)

    def _learn(self, text):
        """What _walk finds for text, its new pieces encoded and remembered first."""
        if len(self.bare) > MEMO_SIZE:  # forgotten all at once
            self.bare, self.spaced = {}, {}
        pieces = self._walk(text, str, " ".__add__)  # the pieces themselves
        new = [p for p in dict.fromkeys(pieces) if p not in self.bare]
        for p, value in zip(new, self._encode_pieces(new)):
            self.bare[p] = value
            if p[0] == " ":  # found by either path
                self.spaced[p[1:]] = value
        return list(map(self.bare.__getitem__, pieces))

    def _encode_pieces(self, pieces):
        """(ids, offsets, characters) of each piece: in one call where the tokenizer has added
        tokens, the pieces joined by one (the library cuts text at added tokens, so each piece is
        encoded as alone; checked: every joint is that token, where the join put it). A call per
        piece costs several times more."""
        if self.sep is not None and len(pieces) > 1:
            sep_id, sep = self.sep
            enc = self.tk.encode(sep.join(pieces), add_special_tokens=False)
            ids, offs, out, i, at = enc.ids, enc.offsets, [], 0, 0
            for p in pieces:
                end = at + len(p)  # the piece is text[at:end], the joint after it text[end:end + len(sep)]
                j = i
                while j < len(ids) and offs[j][0] < end:
                    j += 1
                out.append((ids[i:j], [(a - at, b - at) for a, b in offs[i:j]], len(p)))
                if len(out) < len(pieces) and not (j < len(ids) and ids[j] == sep_id and offs[j] == (end, end + len(sep))):
                    break
                i, at = j + 1, end + len(sep)
            else:
                if i == len(ids) + 1:
                    return out
        encs = (self.tk.encode(p, add_special_tokens=False) for p in pieces)
        return [(e.ids, e.offsets, len(p)) for p, e in zip(pieces, encs)]

    def __getattr__(self, name):
        return getattr(self.tk, name)


def _build_part(path, kind, tok, settings, tmp, rank, world):
    """Tokenize this rank's chunks (c % world == rank) into <tmp>/<field>.<rank>[.len];
    returns the number of records in the file (every rank reads every line, parses its own)."""
    ragged, scalar = LAYOUT[kind]
    if _word_memo(tok.tokenizer):  # same tokens, faster
        tok = copy.copy(tok)  # a shallow copy keeps every attribute, set at load time or later
        tok.tokenizer = _MemoTokenizer(tok.tokenizer)
    files = {k: open(os.path.join(tmp, f"{k}.{rank}"), "wb") for k in list(ragged) + list(scalar)}
    files.update({f"{k}.len": open(os.path.join(tmp, f"{k}.{rank}.len"), "wb") for k in ragged})
    n, chunk = 0, []

    def flush():
        recs = [(f"{path}:{line}", formats.parse_line(text, f"{path}:{line}")) for line, text in chunk]
        rows = [encode(kind, rec, where, tok, settings) for where, rec in recs]
        for k, dt in ragged.items():
            np.array([len(r[k]) for r in rows], I64).tofile(files[f"{k}.len"])
            # from Python ints several times faster than numpy's conversion
            values = array.array("I") if dt == U32 else bytearray()
            add = values.fromlist if dt == U32 else values.extend  # lists of ids; masks and records (bytes)
            for r in rows:
                add(r[k])
            files[k].write(values)
        np.array([line for line, _ in chunk], I64).tofile(files["line"])
        for k in scalar:
            if k != "line":
                np.array([r[k] for r in rows], scalar[k]).tofile(files[k])
        chunk.clear()

    try:
        for i, (line, text) in enumerate(formats.numbered_lines(path)):
            n += 1
            if (i // CHUNK) % world == rank:
                chunk.append((line, text))
                if len(chunk) == CHUNK:
                    flush()
        if chunk:
            flush()
    finally:
        for f in files.values():
            f.close()
    return n


def _copy(src, dst, nbytes, block=1 << 24):
    while nbytes > 0:
        buf = src.read(min(block, nbytes))
        if not buf:
            raise OSError(f"{src.name}: ends {nbytes} bytes early")
        dst.write(buf)
        nbytes -= len(buf)


def _join(tmp, kind, n, world):
    """Rank 0: the ranks' pieces, chunk by chunk in record order, into <field>.bin / .off.npy /
    .npy; streamed (a block at a time), never the whole dataset in memory."""
    ragged, scalar = LAYOUT[kind]
    sizes = [min(CHUNK, n - c * CHUNK) for c in range(math.ceil(n / CHUNK))]  # records per chunk; rank c % world
    for k, dt in ragged.items():
        lens = [np.fromfile(os.path.join(tmp, f"{k}.{r}.len"), I64) for r in range(world)]
        order, taken = [], [0] * world
        for c, size in enumerate(sizes):
            r = c % world
            order.append((r, lens[r][taken[r]:taken[r] + size]))
            taken[r] += size
        if world == 1:  # already in order
            os.rename(os.path.join(tmp, f"{k}.0"), os.path.join(tmp, f"{k}.bin"))
        else:
            srcs = [open(os.path.join(tmp, f"{k}.{r}"), "rb") for r in range(world)]
            with open(os.path.join(tmp, f"{k}.bin"), "wb") as out:
                for r, piece in order:
                    _copy(srcs[r], out, int(piece.sum()) * dt.itemsize)
            for f in srcs:
                f.close()
        off = np.zeros(n + 1, I64)
        if n:
            np.cumsum(np.concatenate([piece for _, piece in order]), out=off[1:])
        np.save(os.path.join(tmp, f"{k}.off.npy"), off)
    for k, dt in scalar.items():
        parts, taken = [np.fromfile(os.path.join(tmp, f"{k}.{r}"), dt) for r in range(world)], [0] * world
        pieces = []
        for c, size in enumerate(sizes):
            r = c % world
            pieces.append(parts[r][taken[r]:taken[r] + size])
            taken[r] += size
        np.save(os.path.join(tmp, f"{k}.npy"), np.concatenate(pieces) if pieces else np.zeros(0, dt))
    for name in os.listdir(tmp):  # the ranks' pieces
        if name.rsplit(".", 1)[-1].isdigit() or name.endswith(".len"):
            os.remove(os.path.join(tmp, name))
