"""data/: chat masks token by token, the shift, packing, truncation, malformed input, data order,
the built-in task and the prepare scripts."""
import gzip
import json
import os

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

import agent
from data import batching, chat, formats, prepare_gsm8k, prepare_hh, task

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def make_tok(fmt, tmp_path):
    """A character-level tokenizer with the special tokens of `fmt`, saved as an HF directory."""
    specials = {"chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "plain": ["<|pad|>", "<|bos|>", "<|eos|>"]}[fmt]
    vocab = {t: i for i, t in enumerate(specials + task.CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(specials)
    tk.save(str(tmp_path / "tokenizer.json"))
    tcfg = {"chatml": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
            "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
            "plain": {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}}[fmt]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    tok = chat.load_tokenizer(tmp_path)
    assert tok.chat_format == fmt
    return tok


EXPECTED = {  # the HF chat templates' text (without injected default system prompts)
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
              "<|im_start|>assistant\n4<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
    "plain": "<|bos|>System: Be brief.\nUser: Hi there\nAssistant: Hello!<|eos|>User: 2+2?\nAssistant: 4<|eos|>",
}
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "plain": "<|eos|>"}
LAST_TURN = {"chatml": "4<|im_end|>\n", "llama3": "4<|eot_id|>", "plain": "4<|eos|>"}  # after the generation prompt


@pytest.mark.parametrize("fmt", ["chatml", "llama3", "plain"])
def test_chat_render_text_and_exact_assistant_mask(fmt, tmp_path):
    tok = make_tok(fmt, tmp_path)
    ids, mask = chat.render_chat(CONV, tok)
    assert tok.tokenizer.decode(ids, skip_special_tokens=False) == EXPECTED[fmt]
    # token by token: the masked tokens are exactly both assistant turns and their end tokens
    pieces = [tok.tokenizer.id_to_token(i) for i, m in zip(ids, mask) if m]
    assert pieces == list("Hello!") + [END[fmt]] + ["4", END[fmt]]
    # and every masked token sits inside an assistant turn, contiguous per turn
    runs, prev = 0, 0
    for m in mask:
        runs += int(m == 1 and prev == 0)
        prev = m
    assert runs == 2
    # the generation prompt is the template's text and a prefix of the rendered answer
    prompt = chat.tokenize_prompt({"prompt": CONV[:4]}, tok, 10**6)
    assert tok.tokenizer.decode(prompt, skip_special_tokens=False) == EXPECTED[fmt][:-len(LAST_TURN[fmt])]
    assert ids[:len(prompt)] == prompt
    assert tok.eos_id in tok.stop_ids and tok.tokenizer.token_to_id(END[fmt]) in tok.stop_ids


def test_chat_formats_match_transformers_templates(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = make_tok("chatml", tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    # Qwen2's template (default system prompt removed): our text must be what HF renders
    hf.chat_template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n'}}"
                        "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
    text = hf.apply_chat_template(CONV[:4], tokenize=False, add_generation_prompt=True)
    assert tok.tokenizer.decode(chat.tokenize_prompt({"prompt": CONV[:4]}, tok, 10**6), skip_special_tokens=False) == text


def test_llama3_trims_content(tmp_path):
    tok = make_tok("llama3", tmp_path)
    ids, mask = chat.render_chat([{"role": "user", "content": " hi\n"}, {"role": "assistant", "content": "\n yo "}], tok)
    assert tok.tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>")
    assert [tok.tokenizer.id_to_token(i) for i, m in zip(ids, mask) if m] == ["y", "o", "<|eot_id|>"]


def test_default_system_prompt_option(tmp_path):
    tok = make_tok("chatml", tmp_path)
    tok.system_prompt = chat.QWEN25_SYSTEM_PROMPT  # what Qwen2.5's template does when none is given
    ids = chat.tokenize_prompt({"prompt": "Hi there"}, tok, 10**6)
    assert tok.tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    ids, _ = chat.render_chat(CONV, tok)  # a conversation with its own system message keeps it
    assert tok.tokenizer.decode(ids, skip_special_tokens=False) == EXPECTED["chatml"]


def test_load_tokenizer_special_tokens(tmp_path):
    tok = make_tok("chatml", tmp_path)
    endoftext, im_end = tok.tokenizer.token_to_id("<|endoftext|>"), tok.tokenizer.token_to_id("<|im_end|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}, "bos_token": None}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [endoftext, im_end]}))
    tok = chat.load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, endoftext, endoftext)  # pad falls back to eos
    assert tok.stop_ids == [endoftext, im_end]
    assert chat.load_tokenizer(tmp_path, chat_format="plain").chat_format == "plain"


def test_tokenize_sft_forms(tmp_path):
    tok = make_tok("chatml", tmp_path)
    conv = chat.tokenize_sft({"messages": CONV[1:3]}, tok, 100)
    assert chat.tokenize_sft({"prompt": "Hi there", "completion": "Hello!"}, tok, 100) == conv
    assert chat.tokenize_sft({"messages": CONV[1:3]}, tok, 100, train_on_prompt=True)["loss_mask"] == [1] * len(conv["input_ids"])
    text = chat.tokenize_sft({"text": "abc"}, tok, 100)  # no bos in this tokenizer: text + eos
    assert tok.tokenizer.decode(text["input_ids"], skip_special_tokens=False) == "abc<|im_end|>" and all(text["loss_mask"])


def test_collate_sft_shift_and_mask(tmp_path):
    tok = make_tok("plain", tmp_path)
    exs = [chat.tokenize_sft({"messages": CONV[1:3]}, tok, 100), chat.tokenize_sft({"text": "abc"}, tok, 100)]
    b = batching.collate_sft(exs, tok.pad_id)
    for r, e in enumerate(exs):
        n = len(e["input_ids"])
        assert b["input_ids"][r, :n].tolist() == e["input_ids"]
        assert b["labels"][r, :n - 1].tolist() == e["input_ids"][1:]
        assert b["loss_mask"][r, :n - 1].tolist() == e["loss_mask"][1:]
        assert b["loss_mask"][r, n - 1:].sum() == 0 and b["attention_mask"][r, n:].sum() == 0
    trained = [tok.tokenizer.id_to_token(int(t)) for t, m in zip(b["labels"][0], b["loss_mask"][0]) if m]
    assert trained == list("Hello!") + ["<|eos|>"]
    assert b["loss_mask"][1].sum() == 4  # text: "abc" + eos predicted from bos, a, b, c


def test_sft_truncation_keeps_start_and_rejects_empty(tmp_path):
    tok = make_tok("plain", tmp_path)
    e = chat.tokenize_sft({"messages": CONV[1:3]}, tok, 30)
    full = chat.tokenize_sft({"messages": CONV[1:3]}, tok, 1000)
    assert e["input_ids"] == full["input_ids"][:30] and len(full["input_ids"]) > 30
    with pytest.raises(formats.DataError, match="no trainable token"):
        chat.tokenize_sft({"messages": CONV[1:3]}, tok, 10)


def test_preference_truncation_rule(tmp_path):
    tok = make_tok("plain", tmp_path)
    ex = {"prompt": [{"role": "user", "content": "x" * 40}], "chosen": "c" * 30, "rejected": "r" * 10}
    full = chat.tokenize_preference(ex, tok, 1000, 1000)
    P, C, R = (len(full[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert (C, R) == (31, 11)  # completion + eos
    t = chat.tokenize_preference(ex, tok, 60, 20)  # P + C > 60: prompt keeps 20 (bos + last 19), completions cut to 40
    assert full["prompt_ids"][0] == tok.bos_id and t["prompt_ids"] == full["prompt_ids"][:1] + full["prompt_ids"][-19:]
    assert t["chosen_ids"] == full["chosen_ids"] and t["rejected_ids"] == full["rejected_ids"]
    t = chat.tokenize_preference(ex, tok, 40, 20)
    assert t["chosen_ids"] == full["chosen_ids"][:20] and t["rejected_ids"] == full["rejected_ids"]
    same = chat.tokenize_preference(ex, tok, P + C, 5)  # fits: nothing is cut
    assert same == full


def test_rl_prompt_truncation_keeps_bos(tmp_path):
    tok = make_tok("plain", tmp_path)
    full = chat.tokenize_prompt({"prompt": "x" * 40}, tok, 1000)
    assert chat.tokenize_prompt({"prompt": "x" * 40}, tok, 10) == full[:1] + full[-9:] and full[0] == tok.bos_id
    with pytest.raises(ValueError, match="must be positive"):
        chat.tokenize_prompt({"prompt": "x"}, tok, 0)  # ids[-0:] would silently keep everything


def test_prompt_completion_learns_the_completion_only(tmp_path):
    """TRL's prompt-completion form: assistant turns inside the prompt are context, not targets."""
    tok = make_tok("chatml", tmp_path)
    p = tmp_path / "d.jsonl"
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "EARLIER"}, {"role": "user", "content": "And?"}]
    p.write_text(json.dumps({"prompt": prompt, "completion": [{"role": "assistant", "content": "Now"}]}) + "\n")
    (ex,) = formats.load_sft(p)
    e = chat.tokenize_sft(ex, tok, 100)
    learned = tok.tokenizer.decode([t for t, m in zip(e["input_ids"], e["loss_mask"]) if m], skip_special_tokens=False)
    assert learned == "Now<|im_end|>"
    conv = chat.tokenize_sft({"messages": prompt + [{"role": "assistant", "content": "Now"}]}, tok, 100)
    assert conv["input_ids"] == e["input_ids"] and sum(conv["loss_mask"]) > sum(e["loss_mask"])  # messages: every turn
    with pytest.raises(formats.DataError, match=f"{p}:1: no trainable token"):  # errors name the record's line
        chat.tokenize_sft(ex, tok, 5)


def test_collate_preference_rows_and_masks(tmp_path):
    tok = make_tok("chatml", tmp_path)
    exs = [chat.tokenize_preference({"prompt": "Hi", "chosen": "Yes", "rejected": "No way"}, tok, 100, 50),
           chat.tokenize_preference({"prompt": "Hello you", "chosen": "A", "rejected": "B"}, tok, 100, 50)]
    b = batching.collate_preference(exs, tok.pad_id)
    assert b["input_ids"].shape[0] == 4
    for r, (e, k) in enumerate([(exs[0], "chosen_ids"), (exs[1], "chosen_ids"), (exs[0], "rejected_ids"), (exs[1], "rejected_ids")]):
        targets = [int(t) for t, m in zip(b["labels"][r], b["loss_mask"][r]) if m]
        assert targets == e[k]
    assert tok.tokenizer.decode(exs[0]["rejected_ids"], skip_special_tokens=False) == "No way<|im_end|>"


def doc_mask(docs):
    """The block-diagonal causal mask the model builds from document ids: i sees j iff j <= i and
    both are in the same (non-padding) document."""
    T = docs.shape[-1]
    causal = torch.ones(T, T).tril().bool()
    return causal & (docs[:, :, None] == docs[:, None, :]) & (docs[:, None, :] > 0)


def test_packing_isolates_documents(tmp_path):
    tok = make_tok("plain", tmp_path)
    exs = [chat.tokenize_sft({"text": t}, tok, 100) for t in ["abcdef", "gh", "ijklmnopq", "rs", "t" * 30]]
    b = batching.pack_sft(exs, 16, tok.pad_id)
    assert b["input_ids"].shape == (3, 16)  # [abcdef gh] [ijklmnopq rs] [t*30 cut to 16]
    docs, ids, pos, mask, labels = b["attention_mask"], b["input_ids"], b["position_ids"], b["loss_mask"], b["labels"]
    # nothing dropped, in order (the 32-token example is cut to 16, as documented)
    got = [ids[r][docs[r] == d].tolist() for r in range(len(ids)) for d in range(1, int(docs[r].max()) + 1)]
    assert got == [e["input_ids"][:16] for e in exs]
    seen, which = doc_mask(docs), iter(exs)
    for r in range(len(ids)):
        for d in range(1, int(docs[r].max()) + 1):
            own, sel = next(which), docs[r] == d
            own_ids, own_mask = own["input_ids"][:16], own["loss_mask"][:16]
            for i in sel.nonzero().flatten().tolist():
                # token i sees exactly its own example's prefix up to itself: no other document
                assert ids[r][seen[r, i]].tolist() == own_ids[:pos[r, i] + 1]
            assert pos[r][sel].tolist() == list(range(len(own_ids)))  # positions restart per document
            assert labels[r][sel].tolist() == own_ids[1:] + [tok.pad_id]  # no label crosses documents
            assert mask[r][sel].tolist() == own_mask[1:] + [0]  # the last token predicts nothing
    assert (mask[docs == 0] == 0).all() and (ids[docs == 0] == tok.pad_id).all()


def test_packing_mask_agrees_with_model(tmp_path):
    """The contract with model.py: its attention bias from document ids is the mask above."""
    try:
        import model as M
    except Exception as e:  # model.py is written concurrently; its own tests cover it
        pytest.skip(f"model.py not importable: {e}")
    if not hasattr(M, "attention_bias"):
        pytest.skip("model.attention_bias not present")
    tok = make_tok("plain", tmp_path)
    b = batching.pack_sft([chat.tokenize_sft({"text": t}, tok, 100) for t in ["abcdef", "gh", "ijk"]], 16, tok.pad_id)
    allowed = M.attention_bias(b["attention_mask"], 16)[:, 0].bool()
    want = doc_mask(b["attention_mask"])
    real = b["attention_mask"] > 0
    assert torch.equal(allowed[real], want[real])  # padding rows may attend anywhere harmless


@pytest.mark.parametrize("line,field", [
    ('{"prompt": "a", "completion": 3}', "completion"),
    ('{"prompt": "a"}', "completion"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
    ('{"prompt": "a", "completion": "b"', "invalid JSON"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant"),
])
def test_malformed_sft_names_file_line_field(tmp_path, line, field):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "ok", "completion": "fine"}\n' + line + "\n")
    with pytest.raises(formats.DataError) as e:
        formats.load_sft(p)
    assert f"{p}:2" in str(e.value) and field in str(e.value)


@pytest.mark.parametrize("line,error", [
    ('{"prompt": "a", "chosen": "b"}', "missing field 'rejected'"),
    ('{"prompt": "a", "chosen": 5, "rejected": "c"}', "field 'chosen': expected a string or a list of messages, got int"),
    ('{"prompt": [{"role": "bot", "content": "x"}], "chosen": "b", "rejected": "c"}',
     "field 'prompt': message 0: role 'bot' is not one of system/user/assistant/tool"),
    ('{"prompt": "a", "chosen": [{"role": "user", "content": "x"}], "rejected": "c"}',
     "field 'chosen': the last message must be the assistant's, got 'user'"),
    ('{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "b", "rejected": "c"}',
     "field 'prompt': ends with an assistant message"),
    ('{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "x"},'
     ' {"role": "assistant", "content": "b"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},'
     ' {"role": "user", "content": "y"}, {"role": "assistant", "content": "c"}]}', "first differ at a user message"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}', "field 'margin': expected a number, got str"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"', "invalid JSON"),
])
def test_malformed_preference_names_file_line_field(tmp_path, line, error):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "ok", "chosen": "yes", "rejected": "no"}\n' + line + "\n")
    with pytest.raises(formats.DataError) as e:
        formats.load_preference(p)
    assert str(e.value).startswith(f"{p}:2: ") and error in str(e.value)


def test_malformed_preference_and_unpaired(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": 1}\n')
    with pytest.raises(formats.DataError, match=r"p.jsonl:1: field 'rejected'"):
        formats.load_preference(p)
    p.write_text('{"prompt": "a", "completion": "b", "label": "yes"}\n')
    with pytest.raises(formats.DataError, match=r"p.jsonl:1: field 'label': expected a boolean"):
        formats.load_unpaired(p)
    p.write_text('{"prompt": "a", "answer": "1"}\n\n{"question": "b"}\n')
    with pytest.raises(formats.DataError, match=r"p.jsonl:3: missing field 'prompt'"):
        formats.load_prompts(p)
    assert formats.read_jsonl(p) == [{"prompt": "a", "answer": "1"}, {"question": "b"}]


def test_implicit_prompt_preference(tmp_path):
    p = tmp_path / "p.jsonl"
    u = {"role": "user", "content": "q"}
    p.write_text(json.dumps({"chosen": [u, {"role": "assistant", "content": "good"}],
                             "rejected": [u, {"role": "assistant", "content": "bad"}]}) + "\n")
    (r,) = formats.load_preference(p)
    assert r["prompt"] == [u] and r["chosen"][0]["content"] == "good" and r["rejected"][0]["content"] == "bad"


def test_batch_indices_rank_aware_and_resumable():
    n, B, W = 103, 4, 3
    for step in range(20):
        parts = [batching.batch_indices(n, B, 7, step, r, W) for r in range(W)]
        flat = [i for p in parts for i in p]
        assert len(flat) == B * W == len(set(flat))
        assert parts == [batching.batch_indices(n, B, 7, step, r, W) for r in range(W)]  # pure function
    epoch0 = [i for s in range(8) for r in range(W) for i in batching.batch_indices(n, B, 7, s, r, W)]
    assert len(set(epoch0)) == 96  # 8 global batches of 12 cover 96 distinct examples, 7 dropped
    assert batching.batch_indices(n, B, 7, 0, 0, W) != batching.batch_indices(n, B, 7, 8, 0, W)  # new epoch, new order
    # one process with a batch of B * W sees exactly the union of the W ranks
    assert sorted(batching.batch_indices(n, B * W, 7, 5, 0, 1)) == sorted(
        i for r in range(W) for i in batching.batch_indices(n, B, 7, 5, r, W))


def test_builtin_task_files(tmp_path):
    a, b = task.ensure_task(str(tmp_path / "a")), task.ensure_task(str(tmp_path / "b"))
    names = sorted(os.listdir(a))
    assert names == ["config.json", "test.jsonl", "tokenizer.json", "tokenizer_config.json", "train.jsonl",
                     "train_tools.jsonl"]
    for f in names:  # deterministic: byte-identical in two directories
        assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), f
    stamp = os.stat(os.path.join(a, "train.jsonl")).st_mtime_ns
    assert task.ensure_task(a) == a and os.stat(os.path.join(a, "train.jsonl")).st_mtime_ns == stamp  # idempotent
    train, test = formats.load_prompts(os.path.join(a, "train.jsonl")), formats.load_prompts(os.path.join(a, "test.jsonl"))
    assert (len(train), len(test)) == (task.N_TRAIN, task.N_TEST)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len(formats.load_sft(os.path.join(a, "train.jsonl"))) == task.N_TRAIN  # also valid SFT data
    tools = formats.load_sft(os.path.join(a, "train_tools.jsonl"))  # every 3rd demonstration calls the calculator
    assert len(tools) == task.N_TRAIN and sum("messages" in r for r in tools) == -(-task.N_TRAIN // task.TOOL_DEMOS)
    call = tools[0]["messages"][1]["content"]
    assert agent.ToolEnv([agent.calculator]).step(call)[0][0]["content"] == tools[0]["messages"][2]["content"]
    tok = chat.load_tokenizer(a)
    cfg = json.load(open(os.path.join(a, "config.json")))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.chat_format) == (1, 2, 0, [2], "plain")
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    assert cfg["vocab_size"] == tok.tokenizer.get_vocab_size() == 100
    unk = tok.tokenizer.token_to_id("<|unk|>")
    forgot = {True: 0, False: 0}  # units carry -> demonstrations that dropped it
    for r, held_out in [(r, False) for r in train] + [(r, True) for r in test]:
        a_, b_ = map(int, r["prompt"].removeprefix("What is ").removesuffix("?").split("+"))
        assert a_ + b_ == int(r["answer"]) and all(10 <= x < 100 for x in (a_, b_))
        carry, demo = a_ % 10 + b_ % 10 >= 10, int(r["completion"])
        if held_out or not carry:  # the truth, except where the teacher may drop the units carry
            assert demo == a_ + b_
        else:
            assert demo in (a_ + b_, a_ + b_ - 10)
            forgot[True] += demo != a_ + b_
            forgot[False] += demo == a_ + b_
        for text in (r["prompt"], r["completion"]):  # exact round trip, no unknown token
            ids = tok.encode(text)
            assert unk not in ids and tok.tokenizer.decode(ids) == text
    rate = forgot[True] / (forgot[True] + forgot[False])  # ~1,800 carry problems: binomial sd ~0.01
    assert abs(rate - task.TEACHER_FORGETS_CARRY) < 0.04, rate
    ids, mask = chat.render_chat([{"role": "user", "content": train[0]["prompt"]},
                                  {"role": "assistant", "content": train[0]["completion"]}], tok)
    assert tok.tokenizer.decode(ids, skip_special_tokens=False) == f"<|bos|>User: {train[0]['prompt']}\nAssistant: {train[0]['completion']}<|eos|>"


def test_builtin_task_answers():
    assert task.extract_answer(" 936\n") == "936" and task.extract_answer("-5") == "-5"
    assert task.extract_answer("936 is it") is None and task.extract_answer("9 3 6") is None and task.extract_answer("") is None
    assert task.is_correct(" 936 ", "936") and task.is_correct("12", 12)
    assert not task.is_correct("9360", "936") and not task.is_correct("0936", "936") and not task.is_correct("936 is it", "936")
    assert task.reward_fn(["p", "q"], ["12", "13"], answer=["12", "12"], other=[1, 2]) == [1.0, 0.0]
    assert task.reward_fn(prompts=["p"], completions=["7"], answer=["7"]) == [1.0]


def test_gsm8k_reward_and_prepare(tmp_path):
    r = prepare_gsm8k.gsm8k_reward
    assert r(["q"] * 4, ["so 1,234 apples", "It is 5.0", "7 then 8", "none"], answer=["1234", "5", "7", "3"]) == [1.0, 1.0, 0.0, 0.0]
    assert r(["q"] * 3, ["She makes $18.", "#### -3", "2.5 kg"], answer=["18.0", "-3", "2,5"]) == [1.0, 1.0, 0.0]
    # the marked final answer wins over numbers written after it
    assert r(["q"] * 2, ["#### 72\nfor the 3 apples", "#### 3 then 72"], answer=["72", "72"]) == [1.0, 0.0]
    src = tmp_path / "g.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.write(json.dumps({"question": "2*3?", "answer": "2*3=<<2*3=6>>6\n#### 6"}) + "\n")
    prepare_gsm8k.main(str(src), str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "sft.jsonl").read_text()) == {"prompt": "2*3?", "completion": "2*3=6\n#### 6"}
    assert json.loads((tmp_path / "out" / "rl.jsonl").read_text()) == {"prompt": "2*3?", "answer": "6"}


def test_prepare_gsm8k_on_real_data(tmp_path):
    src = os.path.join(SHARED, "gsm8k-test.jsonl.gz")
    if not os.path.exists(src):
        pytest.skip("../shared/data not present")
    prepare_gsm8k.main(src, str(tmp_path))
    sft, rl = formats.load_sft(tmp_path / "sft.jsonl"), formats.load_prompts(tmp_path / "rl.jsonl")
    assert len(sft) == len(rl) == 1319
    completions = [e["completion"][0]["content"] for e in sft]
    assert not any("<<" in c or ">>" in c for c in completions)
    # the reference solutions earn full reward against the extracted answers
    assert prepare_gsm8k.gsm8k_reward([r["prompt"] for r in rl], completions, [r["answer"] for r in rl]) == [1.0] * len(rl)


def test_prepare_hh_parses_dialogues(tmp_path):
    rec = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: sure",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help?\n\nAssistant: no"}
    out = prepare_hh.convert(rec)
    assert [m["role"] for m in out["prompt"]] == ["user", "assistant", "user"]
    assert out["chosen"] == [{"role": "assistant", "content": "sure"}] and out["rejected"][0]["content"] == "no"
    with pytest.raises(ValueError):
        prepare_hh.convert({"chosen": rec["chosen"], "rejected": "\n\nHuman: other\n\nAssistant: no"})


def test_prepare_hh_held_out_split_is_fixed_and_disjoint(tmp_path):
    with open(tmp_path / "hh.jsonl", "w") as f:
        for i in range(10):
            rec = {"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"}
            f.write(json.dumps(rec) + "\n")
    parts = []
    for run in ("a", "b"):
        prepare_hh.main(str(tmp_path / "hh.jsonl"), str(tmp_path / run), held_out=3)
        parts.append([(tmp_path / run / f"{k}.jsonl").read_text().splitlines() for k in ("test", "train")])
    (test, train), again = parts[0], parts[1]
    assert len(test) == 3 and len(train) == 7 and again == [test, train]  # the same split every time
    assert sorted(json.loads(x)["prompt"][0]["content"] for x in test + train) == sorted(f"q{i}" for i in range(10))


def test_prepare_hh_on_real_data(tmp_path):
    src = os.path.join(SHARED, "hh-rlhf-harmless-base-test.jsonl.gz")
    if not os.path.exists(src):
        pytest.skip("../shared/data not present")
    out, skipped = prepare_hh.main(src, str(tmp_path / "hh.jsonl"))
    assert len(out) > 0.95 * (len(out) + len(skipped))
    pairs = formats.load_preference(tmp_path / "hh.jsonl")  # our own reader accepts the output
    for p in pairs:
        roles = [m["role"] for m in p["prompt"]]
        assert roles[0] == roles[-1] == "user" and all(a != b for a, b in zip(roles, roles[1:]))
        assert [m["role"] for m in p["chosen"] + p["rejected"]] == ["assistant", "assistant"]
