"""data/cache.py: the memory-mapped token cache gives exactly the batches of tokenizing in memory
(every script's data path), its key follows every input, a half-written cache is never read, 1
and 2 ranks build the same files. (A resumed run reusing it: test_train_sft.py's resume test.)"""
import bisect
import json
import os
import random
import threading

import pytest
import torch

from data import batching, cache, chat, formats
from test_data import make_tok

LLAMA3 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "tokenizers", "llama3")


def msgs(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def records(kind, n=40, seed=0):
    """n records of every form the kind accepts, some long enough to be truncated."""
    rng = random.Random(seed)

    def text():
        return " ".join(rng.choice(["hi", "the cat", "\n7+8", "  spaced ", "é!", "x" * rng.randint(1, 30)])
                        for _ in range(rng.randint(1, 3)))
    out = []
    for i in range(n):
        if kind == "sft":
            out.append([{"messages": msgs(("system", text()), ("user", text()), ("assistant", text()), ("user", text()),
                                          ("assistant", text()))},
                        {"prompt": text(), "completion": text()},
                        {"prompt": msgs(("user", text()), ("assistant", text()), ("user", text())), "completion": text()},
                        {"text": text()}][i % 4])
        elif kind == "preference":
            u = msgs(("user", text()))
            out.append([{"prompt": text(), "chosen": text(), "rejected": text(), "margin": i / 3},
                        {"chosen": u + msgs(("assistant", text())), "rejected": u + msgs(("assistant", text()))},
                        {"prompt": u, "chosen": text(), "rejected": text(), "id": i}][i % 3])
        elif kind == "unpaired":
            out.append({"prompt": text(), "completion": text(), "label": i % 3 != 0})
        else:
            out.append({"prompt": text() if i % 2 else msgs(("user", text())), "answer": str(i), "extra": [i, "x"]})
    return out


def write(path, recs):
    with open(path, "w") as f:
        for i, r in enumerate(recs):
            f.write(json.dumps(r) + "\n" + ("\n" if i % 7 == 3 else ""))  # blank lines: line numbers must still match
    return str(path)


SETTINGS = {"sft": {"max_length": 100, "train_on_prompt": False}, "preference": {"max_length": 64, "max_prompt_length": 24},
            "unpaired": {"max_length": 64, "max_prompt_length": 24}, "prompts": {"max_prompt_length": 40, "required": ["answer"]}}


def uncached(kind, path, tok, s):
    """What the scripts did before the cache (and still do for in-memory data)."""
    if kind == "sft":
        return [chat.tokenize_sft(ex, tok, s["max_length"], s["train_on_prompt"]) for ex in formats.load_sft(path)]
    if kind == "preference":
        return [chat.tokenize_preference(ex, tok, s["max_length"], s["max_prompt_length"]) for ex in formats.load_preference(path)]
    if kind == "unpaired":
        out = []
        for ex in formats.load_unpaired(path):
            e = chat.tokenize_preference({**ex, "chosen": ex["completion"], "rejected": ex["completion"]}, tok,
                                         s["max_length"], s["max_prompt_length"])
            out.append({"prompt_ids": e["prompt_ids"], "completion_ids": e["chosen_ids"], "label": ex["label"]})
        return out
    return [{"prompt_ids": chat.tokenize_prompt(r, tok, s["max_prompt_length"]), "record": r} for r in formats.load_prompts(path)]


def batches(kind, examples, pad_id):
    """Every batch layout the scripts build from these examples, over a few random index sets."""
    g = random.Random(1)
    out = []
    for _ in range(3):
        idx = g.sample(range(len(examples)), 8)
        chunk = [examples[j] for j in idx]
        if kind == "sft":
            out += [batching.collate_sft(chunk, pad_id), batching.pack_sft(chunk, 100, pad_id)]
        elif kind == "preference":  # DPO two-row and shared-prompt, RM; KTO from pairs
            kto = cache.Unpaired(examples)
            kto_rows = [{"prompt_ids": kto[j]["prompt_ids"], "chosen_ids": kto[j]["completion_ids"],
                         "rejected_ids": kto[(j + 1) % len(kto)]["completion_ids"]} for j in idx + [len(examples) + 1]]
            out += [batching.collate_preference(chunk, pad_id), batching.collate_preference_shared(chunk, pad_id),
                    batching.collate_preference_shared(kto_rows, pad_id), {"label": torch.tensor([kto[j]["label"] for j in idx])}]
        elif kind == "unpaired":  # KTO rows: completion j, then the next one, after prompt j
            rows = [{"prompt_ids": examples[j]["prompt_ids"], "chosen_ids": examples[j]["completion_ids"],
                     "rejected_ids": examples[(j + 1) % len(examples)]["completion_ids"]} for j in idx]
            out += [batching.collate_preference_shared(rows, pad_id), batching.collate_preference(rows, pad_id),
                    {"label": torch.tensor([e["label"] for e in chunk])}]
        else:
            out += [batching.collate_prompts([e["prompt_ids"] for e in chunk], pad_id), [e["record"] for e in chunk]]
    return out


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


@pytest.fixture(scope="module")
def llama3():
    if not os.path.exists(LLAMA3):
        pytest.skip("../shared/tokenizers/llama3 not present")
    return chat.load_tokenizer(LLAMA3)


@pytest.fixture(scope="module")
def qwen3():
    path = os.path.join(LLAMA3, "..", "qwen3")
    if not os.path.exists(path):
        pytest.skip("../shared/tokenizers/qwen3 not present")
    return chat.load_tokenizer(path)


def byte_bpe(pattern=cache.SPLIT_PATTERNS[0], gpt2=False, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
    """A small byte-level BPE trained here with a Llama-3 / Qwen2 / GPT-2 style pre-tokenizer: the
    kind of tokenizer the build encodes piece by piece (cache._MemoTokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if gpt2 else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    corpus = [" ".join(random.Random(i).choices(["the", "cat", "sat", "on", "mat", "7+8=15", "é", "don't", "\n", "  "], k=30))
              for i in range(200)]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials), show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(params=["chatml", "bpe", "bpe-template", "llama3-real", "qwen3-real"])
def tok(request, tmp_path):
    if request.param == "chatml":  # character level: every content token is its own character
        return make_tok("chatml", tmp_path)
    if request.param.startswith("bpe"):  # byte-level BPE: encoded piece by piece in the build
        byte_bpe().save(str(tmp_path / "tokenizer.json"))
        config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        if request.param == "bpe-template":  # rendered by jinja: the build's lazy token ends, one render saved
            config["chat_template"] = CHATML_TEMPLATE
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        return chat.load_tokenizer(tmp_path)
    return request.getfixturevalue(request.param[:-5])  # real ones with their chat templates (Qwen3's: <think> blocks)


@pytest.mark.parametrize("kind", ["sft", "preference", "unpaired", "prompts"])
def test_cached_batches_identical(kind, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CHUNK", 7)  # several chunks, a partial last one
    path = write(tmp_path / "d.jsonl", records(kind))
    ref = uncached(kind, path, tok, SETTINGS[kind])
    ds = cache.load(path, kind, tok, SETTINGS[kind])
    assert isinstance(ds, cache.Examples) and len(ds) == len(ref)
    lines = [n for n, _ in formats.numbered_lines(path)]
    for i in range(len(ds)):
        e = ds[i]
        assert e["where"] == f"{path}:{lines[i]}"
        assert {k: v for k, v in e.items() if k not in ("where", "margin")} == ref[i]
    if kind == "preference":  # the margin where the record has one, else none
        want = [r.get("margin") for r in formats.load_preference(path)]
        assert [ds[i].get("margin") for i in range(len(ds))] == want
    assert_same(batches(kind, ds, tok.pad_id), batches(kind, ref, tok.pad_id))
    if tok.chat_format == "chatml":  # character-level: the truncation rules are exercised
        full = [len(e.get("input_ids", e.get("prompt_ids"))) + max(len(e.get(k, [])) for k in ("chosen_ids", "rejected_ids", "completion_ids"))
                for e in ref]
        limit = SETTINGS[kind]["max_length"] if kind != "prompts" else SETTINGS[kind]["max_prompt_length"]
        assert limit in full
    assert ds[-1] == ds[len(ds) - 1] and ds[2:5] == [ds[2], ds[3], ds[4]]


def test_cached_truncation_and_errors_name_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CHUNK", 2)
    tok = make_tok("chatml", tmp_path)
    good = {"prompt": "a", "completion": "b"}
    path = write(tmp_path / "d.jsonl", [good] * 4 + [{"prompt": "a", "completion": 3}])
    with pytest.raises(formats.DataError, match=f"{path}:6: field 'completion'"):  # a blank line after record 4
        cache.load(path, "sft", tok, SETTINGS["sft"])
    path = write(tmp_path / "d.jsonl", [good] * 2 + [{"prompt": "x" * 120, "completion": "b"}])
    with pytest.raises(formats.DataError, match=f"{path}:3: no trainable token"):
        cache.load(path, "sft", tok, SETTINGS["sft"])
    open(path, "w").write("\n\n")
    with pytest.raises(formats.DataError, match="no records"):
        cache.load(path, "sft", tok, SETTINGS["sft"])
    assert os.listdir(path + ".cache") == []  # nothing half-built left behind


def cache_dirs(path):
    return sorted(os.listdir(path + ".cache"))


def test_key_follows_every_input_and_the_cache_rebuilds(tmp_path):
    os.makedirs(tmp_path / "t")
    tok = make_tok("chatml", tmp_path / "t")
    path = write(tmp_path / "d.jsonl", records("sft", 10))
    s = SETTINGS["sft"]
    base = cache.key(path, "sft", tok, s)
    assert cache.key(path, "sft", tok, dict(s)) == base  # deterministic
    changed = {
        "max_length": cache.key(path, "sft", tok, {**s, "max_length": 49}),
        "train_on_prompt": cache.key(path, "sft", tok, {**s, "train_on_prompt": True}),
        "kind": cache.key(path, "prompts", tok, s),
    }
    for attr, value in [("chat_format", "plain"), ("system_prompt", "Be nice."), ("bos_id", 5),
                        ("template_kwargs", {"enable_thinking": False})]:  # any attribute, even one added later
        t = chat.load_tokenizer(tmp_path / "t")
        setattr(t, attr, value)
        changed[attr] = cache.key(path, "sft", t, s)
    t = chat.load_tokenizer(tmp_path / "t")
    t.tokenizer.add_tokens(["<new>"])  # tokenizer.json's content
    changed["tokenizer"] = cache.key(path, "sft", t, s)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed["mtime"] = cache.key(path, "sft", tok, s)
    data = open(path).read()
    open(path, "w").write(data.replace("hi", "ho", 1))  # same size, same mtime: only the bytes differ
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed["content"] = cache.key(path, "sft", tok, s)
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed
    # a changed file gets a new cache with the new tokens; the old one is not read
    open(path, "w").write(data)
    old = cache.load(path, "sft", tok, s)
    open(path, "w").write(data.replace("hi", "ho"))
    new = cache.load(path, "sft", tok, s)
    assert len(cache_dirs(path)) == 2
    assert [new[i]["input_ids"] for i in range(len(new))] == [e["input_ids"] for e in uncached("sft", path, tok, s)]
    assert [new[i]["input_ids"] for i in range(len(new))] != [old[i]["input_ids"] for i in range(len(old))]


def test_half_written_cache_is_ignored(tmp_path, monkeypatch):
    tok = make_tok("chatml", tmp_path)
    path = write(tmp_path / "d.jsonl", records("sft", 10))
    s = SETTINGS["sft"]
    want = [e["input_ids"] for e in uncached("sft", path, tok, s)]
    final = os.path.join(path + ".cache", "sft-" + cache.key(path, "sft", tok, s)[:24])
    os.makedirs(final + ".tmp-999")  # another run's build, interrupted
    open(os.path.join(final + ".tmp-999", "input_ids.0"), "wb").write(b"\1" * 40)
    os.makedirs(final)  # arrays without their manifest (written last): incomplete
    open(os.path.join(final, "input_ids.bin"), "wb").write(b"\0" * 40)
    ds = cache.load(path, "sft", tok, s)
    assert [ds[i]["input_ids"] for i in range(len(ds))] == want
    # a manifest with another key is not trusted either
    m = json.load(open(os.path.join(final, "manifest.json")))
    json.dump({**m, "key": "0" * 32}, open(os.path.join(final, "manifest.json"), "w"))
    built = []
    real = cache._build_part
    monkeypatch.setattr(cache, "_build_part", lambda *a: built.append(1) or real(*a))
    ds = cache.load(path, "sft", tok, s)
    assert built and [ds[i]["input_ids"] for i in range(len(ds))] == want
    cache.load(path, "sft", tok, s)
    assert len(built) == 1  # complete now: reused, not rebuilt


def test_one_and_two_ranks_build_the_same_cache(tmp_path, monkeypatch):
    """Two ranks as two threads with a real barrier: the split, the pieces and their join are
    the code torchrun's processes run."""
    monkeypatch.setattr(cache, "CHUNK", 3)
    tok = make_tok("chatml", tmp_path)
    path = write(tmp_path / "d.jsonl", records("preference", 20))
    s = SETTINGS["preference"]
    one = cache.load(path, "preference", tok, s, str(tmp_path / "one"))
    wait = threading.Barrier(2, timeout=60).wait
    got = [None, None]

    def rank(r):
        got[r] = cache.load(path, "preference", tok, s, str(tmp_path / "two"), r, 2, wait)
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0].path == got[1].path and os.path.basename(got[0].path) == os.path.basename(one.path)
    names = sorted(os.listdir(one.path))
    assert names == sorted(os.listdir(got[0].path)) and "prompt_ids.bin" in names and "margin.npy" in names
    for name in names:
        assert open(os.path.join(one.path, name), "rb").read() == open(os.path.join(got[0].path, name), "rb").read(), name
    assert os.listdir(tmp_path / "two") == [os.path.basename(one.path)]  # no temp dir left


def test_ranks_use_rank0s_key(tmp_path, monkeypatch):
    """Ranks can see one file with different mtimes (every rank writes the built-in task's files,
    the last rename winning), hence different keys: all of them must build and read rank 0's
    directory. Here rank 1's key differs on purpose; without from_rank0 it writes into a temp dir
    nobody made and the build fails."""
    tok = make_tok("chatml", tmp_path)
    path = write(tmp_path / "d.jsonl", records("sft", 10))
    real = cache.key
    monkeypatch.setattr(cache, "key", lambda *a: real(*a) + ("" if threading.current_thread().name == "r0" else "0"))
    wait = threading.Barrier(2, timeout=20).wait
    shared, got = [None], [None, None]

    def rank(r):
        def from_rank0(k):
            if r == 0:
                shared[0] = k
            wait()
            return shared[0]
        got[r] = cache.load(path, "sft", tok, SETTINGS["sft"], str(tmp_path / "c"), r, 2, wait, from_rank0)
    threads = [threading.Thread(target=rank, args=(r,), name=f"r{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[1] is not None and got[0].path == got[1].path and len(got[1]) == 10


# first: " z" new twice in one text, as a piece cut by the rule and as one found after a plain space
TRICKY = ["q  w z<|im_end|>v z", "a  b", "a   b c", "a \nb", "x 's", "it's don't 'LL", "hi <|im_end|> next", " lead", "trail ", "  ", "",
          "日本語 のテキスト 123456 x", "emoji 😀 test 😀😀", "tab\t sep", "a\u00a0b c", "cafe\u0301 e\u0301 \u0301x",
          "x\r\n y", "1 2 3 4444 55555", "<|im_start|>user\nhi there<|im_end|>\n", "a\u2028 b\u3000 c\u200b d", "!! ?? ..."]


def tricky(n=3000, seed=0):
    rng = random.Random(seed)
    alphabet = list(" \n\t\r\u00a0abcXY019'.,!?😀éü日\u0301\u2028\u3000\u200b\x1c") + ["<|im_end|>", "'s", "  "]
    return TRICKY + ["".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(n)]


@pytest.mark.parametrize("which", ["llama3-regex", "qwen2-regex", "gpt2", "no-added-tokens", "llama3-real", "qwen3-real"])
def test_piecewise_encoding_equals_whole(which):
    """The build's tokenizer stand-in (cut before each space that follows a non-space, each piece
    encoded once and remembered) gives the ids and offsets of encoding each text whole."""
    from tokenizers import Tokenizer

    if which.endswith("-real"):
        path = os.path.join(LLAMA3, "..", which[:-5], "tokenizer.json")
        if not os.path.exists(path):
            pytest.skip(f"{path} not present")
        tk = Tokenizer.from_file(path)
    else:  # new pieces are encoded joined by an added token, or one by one where there is none
        tk = byte_bpe(cache.SPLIT_PATTERNS[which == "qwen2-regex"], gpt2=which == "gpt2",
                      specials=() if which == "no-added-tokens" else ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    assert cache._word_memo(tk)
    memo = cache._MemoTokenizer(tk)
    assert (memo.sep is None) == (which == "no-added-tokens")
    for _ in range(2):  # pieces new, then remembered
        for t in tricky():
            want, got = tk.encode(t, add_special_tokens=False), memo.encode(t, add_special_tokens=False)
            assert (got.ids, got.offsets) == (want.ids, want.offsets), repr(t)
    assert 1000 < len(memo.bare) < 20000  # pieces recur (whitespace-led "words"): each is encoded once
    assert memo.encode("a b", add_special_tokens=True).ids == tk.encode("a b").ids


def test_piecewise_encoding_cuts_at_added_tokens():
    """Added tokens are cut out as the library finds them (leftmost-longest, overlapping ones too),
    so a template's "last word<|im_end|>\n<|im_start|>assistant\nfirst word" is not one piece new in
    every conversation: the memo holds words, not pairs of words."""
    from tokenizers import AddedToken

    tk = byte_bpe()
    tk.add_tokens([AddedToken("<|im", normalized=False), AddedToken("end|>x", normalized=False)])  # overlapping
    assert cache._word_memo(tk) and cache._added_split(tk)
    memo = cache._MemoTokenizer(tk)
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefgh", k=5)) for _ in range(40)]
    texts = [f"<|im_start|>user\n{' '.join(rng.choices(words, k=4))}<|im_end|>\n<|im_start|>assistant\n"
             f"{' '.join(rng.choices(words, k=4))}<|im_end|>x<|im" for _ in range(400)]
    for t in texts + tricky(300) + ["<|im_end|>x", "<|imend|>x", "a<|im<|im_end|>"]:
        want, got = tk.encode(t, add_special_tokens=False), memo.encode(t, add_special_tokens=False)
        assert (got.ids, got.offsets) == (want.ids, want.offsets), repr(t)
    memo = cache._MemoTokenizer(tk)
    for t in texts:
        memo.encode(t, add_special_tokens=False)
    assert len(memo.bare) < 150  # cut only at spaces: ~700 pieces, most holding two words


def test_lazy_token_ends_are_the_offsets_ends():
    """The build's encodings give token ends lazily (chat.py bisects them for the assistant mask):
    the same as the library's offsets."""
    tk = byte_bpe()
    memo = cache._MemoTokenizer(tk)
    for t in tricky(300):
        ends = memo.encode(t, add_special_tokens=False).ends
        want = [b for _, b in tk.encode(t, add_special_tokens=False).offsets]
        assert len(ends) == len(want) and [ends[i] for i in range(len(ends))] == want, repr(t)
        for c in range(len(t) + 2):
            for lo in {0, len(want) // 2, len(want)}:
                assert ends.first_ending_after(c, lo) == bisect.bisect_right(want, c, lo), (repr(t), c, lo)
        with pytest.raises(IndexError):
            ends[len(want)]


def test_piecewise_encoding_only_where_it_is_exact(tmp_path):
    """Tokenizers where cutting at spaces could change the tokens are encoded whole."""
    from tokenizers import AddedToken, normalizers, pre_tokenizers

    tk = byte_bpe()
    assert cache._word_memo(tk)
    other = byte_bpe(r"\s?\w+|\S")  # a regex whose matches may hold a space anywhere: unknown, so not trusted
    assert not cache._word_memo(other)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # each piece would get its own space
    assert not cache._word_memo(tk)
    tk = byte_bpe()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()  # sentencepiece-style: "▁" joins across the cut
    assert not cache._word_memo(tk)
    tk = byte_bpe()
    tk.normalizer = normalizers.Lowercase()
    assert not cache._word_memo(tk)
    tk = byte_bpe()
    tk.add_special_tokens([AddedToken("<mask>", rstrip=True)])  # eats the space after it: a cut would keep it
    assert not cache._word_memo(tk)
    assert tk.encode("<mask> b", add_special_tokens=False).ids != \
        tk.encode("<mask>", add_special_tokens=False).ids + tk.encode(" b", add_special_tokens=False).ids
    # and the build then encodes with the tokenizer itself
    assert not cache._word_memo(make_tok("chatml", tmp_path).tokenizer)  # word-level
