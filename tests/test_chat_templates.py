"""Chat templates rendered as transformers renders them, with exact assistant masks: real Llama-3
and Qwen3 tokenizers (../shared/tokenizers, skipped when absent) with their own templates and
with the templates of Mistral-Instruct v0.3, Llama-2-chat, Qwen2.5 and Llama-3.1 (tests/support/chat_templates.py).
transformers is the oracle: our ids must equal tokenizer(apply_chat_template(..., tokenize=False),
add_special_tokens=False)."""
import json
import os
import tempfile

import pytest
from tokenizers import Tokenizer

from chat_templates import LLAMA2_CHAT, LLAMA31, MISTRAL_V03, QWEN25
from data import chat, formats

TOKENIZERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "tokenizers")
SYS = {"role": "system", "content": "Be brief."}
U1, A1 = {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! Grüße 🙂"}
U2, A2 = {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}
CONVS = {"single": [U1, A1], "single+system": [SYS, U1, A1], "multi": [U1, A1, U2, A2], "multi+system": [SYS, U1, A1, U2, A2]}

# name: (real tokenizer, template (None = its own), template kwargs, the text of a trained assistant turn)
CASES = {
    "llama3": ("llama3", None, {}, lambda c, last: c + "<|eot_id|>"),
    "qwen3": ("qwen3", None, {}, lambda c, last: ("<think>\n\n</think>\n\n" if last else "") + c + "<|im_end|>"),
    "qwen3-no-thinking": ("qwen3", None, {"enable_thinking": False}, lambda c, last: c + "<|im_end|>"),
    "mistral-v0.3": ("llama3", MISTRAL_V03, {}, lambda c, last: " " + c + "<|eot_id|>"),
    "llama2-chat": ("llama3", LLAMA2_CHAT, {}, lambda c, last: " " + c + " <|eot_id|>"),
    "qwen2.5": ("qwen3", QWEN25, {}, lambda c, last: c + "<|im_end|>"),
    "llama3.1": ("llama3", LLAMA31, {"date_string": "01 Jan 2025"}, lambda c, last: c + "<|eot_id|>"),
}
_loaded = {}


class CachedTokenizer:
    """Stands in for tokenizers.Tokenizer inside data/chat.py: each real tokenizer.json (~10 MB,
    ~2 s to parse) is read once for the whole module."""
    @staticmethod
    def from_file(path):
        path = os.path.realpath(path)
        if path not in _loaded:
            _loaded[path] = Tokenizer.from_file(path)
        return _loaded[path]


def tokenizer_dir(tmp_path, name, template=None, **config):
    src = os.path.join(TOKENIZERS, name)
    if not os.path.exists(os.path.join(src, "tokenizer.json")):
        pytest.skip("../shared/tokenizers not present")
    if template is None:
        return src
    d = tempfile.mkdtemp(prefix=name, dir=tmp_path)
    os.symlink(os.path.join(src, "tokenizer.json"), os.path.join(d, "tokenizer.json"))
    cfg = json.load(open(os.path.join(src, "tokenizer_config.json")))
    cfg.pop("chat_template")
    cfg.update(config)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:  # where transformers saves templates; wins over the config
        f.write(template)
    return d


@pytest.fixture(scope="module")
def oracles():
    """transformers' tokenizer per real tokenizer (special tokens from its tokenizer_config.json)."""
    transformers = pytest.importorskip("transformers")
    out = {}
    for name in ("llama3", "qwen3"):
        src = os.path.join(TOKENIZERS, name)
        if os.path.exists(os.path.join(src, "tokenizer.json")):
            cfg = json.load(open(os.path.join(src, "tokenizer_config.json")))
            specials = {k: cfg[k] for k in chat.TEMPLATE_SPECIAL_TOKENS if cfg.get(k)}
            out[name] = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(src, "tokenizer.json"), **specials)
    return out


def load(tmp_path, monkeypatch, case):
    name, template, kwargs, turn = CASES[case]
    monkeypatch.setattr(chat, "Tokenizer", CachedTokenizer)
    tok = chat.load_tokenizer(tokenizer_dir(tmp_path, name, template), template_kwargs=json.dumps(kwargs))
    own = json.load(open(os.path.join(TOKENIZERS, name, "tokenizer_config.json")))["chat_template"]
    return tok, template or own, kwargs, turn


def hf_ids(hf, template, conv, kwargs, gen=False):
    text = hf.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=gen, **kwargs)
    return text, hf(text, add_special_tokens=False)["input_ids"]


def runs(tok, ids, mask):
    """The decoded text of each maximal run of masked tokens."""
    out, cur = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            out.append(tok.tokenizer.decode(cur, skip_special_tokens=False))
            cur = []
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_template_ids_and_masks_match_transformers(case, tmp_path, monkeypatch, oracles):
    tok, template, kwargs, turn = load(tmp_path, monkeypatch, case)
    hf = oracles[CASES[case][0]]
    assert tok.chat_format == "template" and tok.tokenizer.token_to_id(turn("", False)[-10:].lstrip(" ")) in tok.stop_ids
    for kind, conv in CONVS.items():
        if case == "mistral-v0.3" and "system" in kind:
            continue  # its template drops the system message when the conversation ends with an answer: below
        # SFT on a conversation: one-piece ids of transformers' text; masks = each assistant turn + its end token
        text, want = hf_ids(hf, template, conv, kwargs)
        e = chat.tokenize_sft({"messages": conv}, tok, 10**6)
        assert e["input_ids"] == want, (case, kind)
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        assert runs(tok, e["input_ids"], e["loss_mask"]) == [turn(c, i == len(answers) - 1) for i, c in enumerate(answers)]
        # RL / generation prompt: the conversation up to the last answer, with the generation prompt
        _, want = hf_ids(hf, template, conv[:-1], kwargs, gen=True)
        assert chat.tokenize_prompt({"prompt": conv[:-1]}, tok, 10**6) == want, (case, kind)
        # preference pair: prompt = with the generation prompt, answers = what follows, through the end token
        p = chat.tokenize_preference({"prompt": conv[:-1], "chosen": "Yes.", "rejected": "No, it is not."}, tok, 10**6, 10**6)
        assert p["prompt_ids"] == want
        _, full = hf_ids(hf, template, conv[:-1] + [{"role": "assistant", "content": "No, it is not."}], kwargs)
        assert full[:len(want) + len(p["rejected_ids"])] == want + p["rejected_ids"]
        assert tok.tokenizer.decode(p["chosen_ids"], skip_special_tokens=False) == turn("Yes.", True)
        # prompt/completion SFT learns the completion only
        e = chat.tokenize_sft({"prompt": conv[:-1], "completion": conv[-1:]}, tok, 10**6)
        assert runs(tok, e["input_ids"], e["loss_mask"]) == [turn(conv[-1]["content"], True)]


def test_template_variables_and_defaults(tmp_path, monkeypatch, oracles):
    tok, *_ = load(tmp_path, monkeypatch, "llama3.1")
    text = tok.tokenizer.decode(chat.tokenize_prompt({"prompt": "Hi"}, tok, 10**6), skip_special_tokens=False)
    assert "Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\n<|eot_id|>" in text  # --chat-template-kwargs
    tok, *_ = load(tmp_path, monkeypatch, "qwen2.5")
    text = tok.tokenizer.decode(chat.tokenize_prompt({"prompt": "Hi"}, tok, 10**6), skip_special_tokens=False)
    assert text == f"<|im_start|>system\n{chat.QWEN25_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # a template that prints a variable nobody passed names it (transformers would print "")
    d = tokenizer_dir(tmp_path, "llama3", "{% for m in messages %}{{ m.content }}{{ turn_end }}{% endfor %}")
    tok = chat.load_tokenizer(d)
    with pytest.raises(formats.DataError, match=r"d.jsonl:3: .*'turn_end' is undefined.*--chat-template-kwargs"):
        chat.tokenize_sft({"messages": [U1, A1], "where": "d.jsonl:3"}, tok, 100)
    tok = chat.load_tokenizer(d, template_kwargs='{"turn_end": "<|eot_id|>"}')
    assert runs(tok, *chat.tokenize_sft({"messages": [U1, A1]}, tok, 100).values()) == [A1["content"] + "<|eot_id|>"]
    with pytest.raises(ValueError, match="expected a JSON object"):
        chat.load_tokenizer(d, template_kwargs='["x"]')


def test_end_of_turn_token_comes_from_the_template(tmp_path, monkeypatch):
    """A base checkpoint whose eos is <|endoftext|> but whose template ends turns with <|im_end|> (Qwen2.5
    base): generation must stop, and masks end, at the template's end-of-turn token."""
    monkeypatch.setattr(chat, "Tokenizer", CachedTokenizer)
    tok = chat.load_tokenizer(tokenizer_dir(tmp_path, "qwen3", QWEN25, eos_token="<|endoftext|>"))
    assert tok.stop_ids == [tok.tokenizer.token_to_id("<|endoftext|>"), tok.tokenizer.token_to_id("<|im_end|>")]
    e = chat.tokenize_sft({"messages": [U1, A1, U2, A2]}, tok, 100)
    assert runs(tok, e["input_ids"], e["loss_mask"]) == [A1["content"] + "<|im_end|>", A2["content"] + "<|im_end|>"]
    # a template whose answers end with no stop token at all: the model could not learn to stop
    tok = chat.load_tokenizer(tokenizer_dir(tmp_path, "qwen3", "{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
                                                               "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"))
    with pytest.raises(formats.DataError, match="ends assistant message 1 with none of the stop tokens"):
        chat.tokenize_sft({"messages": [U1, A1]}, tok, 100)
    with pytest.raises(formats.DataError, match="ends assistant message 1 with none of the stop tokens"):
        chat.tokenize_sft({"messages": [U1, A1, {"role": "user", "content": "<|im_end|>"}, A2]}, tok, 100)


def test_template_errors_name_file_and_line(tmp_path, monkeypatch):
    tok, *_ = load(tmp_path, monkeypatch, "mistral-v0.3")
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"messages": [U1, A1]}) + "\n" + json.dumps({"messages": [U1, U2, A2]}) + "\n")
    good, bad = formats.load_sft(p)
    chat.tokenize_sft(good, tok, 100)
    with pytest.raises(formats.DataError, match=rf"{p}:2: the chat template refused .*roles must alternate"):
        chat.tokenize_sft(bad, tok, 100)
    # Mistral v0.3 writes the system message into the LAST user turn only: a prompt renders it, the same prompt
    # followed by its answer does not. Training on either would not be what the model is served with: an error.
    with pytest.raises(formats.DataError, match=f"{p}:2: the chat template renders .* differently"):
        chat.tokenize_preference({"prompt": [SYS, U1], "chosen": "a", "rejected": "b", "where": f"{p}:2"}, tok, 100, 50)
    with pytest.raises(formats.DataError, match="renders messages 0-1 differently"):
        chat.tokenize_sft({"messages": [SYS, U1, A1]}, tok, 100)
    prompt = tok.tokenizer.decode(chat.tokenize_prompt({"prompt": [SYS, U1]}, tok, 100), skip_special_tokens=False)
    assert prompt == "<|begin_of_text|>[INST] Be brief.\n\nHi there[/INST]"
    # a generation prompt the answered conversation does not contain (DeepSeek-R1 opens "<think>\n" there): a
    # pair has no well-defined answer (error); a conversation's turn starts where the two renderings part
    d = tokenizer_dir(tmp_path, "llama3", "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
                      "{{ m.content }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
                      "<|end_header_id|><think>\n{% endif %}")
    tok = chat.load_tokenizer(d)
    with pytest.raises(formats.DataError, match=r"renders the prompt \(with its generation prompt\) differently .*'<think>"):
        chat.tokenize_preference({"prompt": "q", "chosen": "a", "rejected": "b"}, tok, 100, 50)
    e = chat.tokenize_sft({"messages": [U1, A1]}, tok, 100)
    assert runs(tok, e["input_ids"], e["loss_mask"]) == [A1["content"] + "<|eot_id|>"]


def test_answer_starting_with_a_newline_keeps_the_prompt_tokens(tmp_path, monkeypatch, oracles):
    """Qwen2.5's generation prompt ends with "\\n"; an answer starting with "\\n" merges with it into one
    "\\n\\n" token in the one-piece text. The prompt keeps its served ids; the answer is tokenized on its own."""
    tok, template, kwargs, _ = load(tmp_path, monkeypatch, "qwen2.5")
    p = chat.tokenize_preference({"prompt": "Hi", "chosen": "\nYes", "rejected": "No"}, tok, 100, 50)
    assert p["prompt_ids"] == hf_ids(oracles["qwen3"], template, [{"role": "user", "content": "Hi"}], kwargs, gen=True)[1]
    assert tok.tokenizer.decode(p["chosen_ids"], skip_special_tokens=False) == "\nYes<|im_end|>"


def test_builtin_formats_stay_the_fallback(tmp_path, monkeypatch):
    monkeypatch.setattr(chat, "Tokenizer", CachedTokenizer)
    d = tokenizer_dir(tmp_path, "qwen3")
    tok = chat.load_tokenizer(d, chat_format="chatml")  # --chat-format forces a built-in format over the template
    assert tok.chat_format == "chatml" and tok.chat_template is None
    with pytest.raises(ValueError, match="--chat-template-kwargs given, but"):
        chat.load_tokenizer(d, chat_format="chatml", template_kwargs='{"enable_thinking": false}')


def template_tok(template, **kwargs):
    return chat.Tok(None, None, 0, 0, chat_template=template, template_kwargs=kwargs)


def render(template, conv, gen, **kwargs):
    return chat._render(chat._template_messages(conv), template_tok(template, **kwargs), gen, "test")


GEN_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"


@pytest.mark.parametrize("template, appends", [
    (LLAMA31, True), (QWEN25, True), (LLAMA2_CHAT, False), (MISTRAL_V03, False),  # the last two have no generation prompt
    (GEN_TEMPLATE + "{% if add_generation_prompt %}{{ bos_token }}<assistant>{% if think is defined and think %}"
     "<think>{% endif %}{% endif %}", True),
    (GEN_TEMPLATE.replace("</s>", "{% if not add_generation_prompt %}</s>{% endif %}")
     + "{% if add_generation_prompt %}<assistant>{% endif %}", False),  # decides something else too
    (GEN_TEMPLATE + "{% if add_generation_prompt %}<assistant>{{ messages | length }}{% endif %}", False),  # a filter
    (GEN_TEMPLATE + "{% if add_generation_prompt %}{{ strftime_now('%S') }}{% endif %}", False),  # a call
    ("{% set tag = '<a>' %}" + GEN_TEMPLATE + "{% if add_generation_prompt %}{{ tag }}{% endif %}", False),  # set here
    (GEN_TEMPLATE + "{% if add_generation_prompt %}<assistant>{% else %}<end>{% endif %}", False),
    (GEN_TEMPLATE + "{% if add_generation_prompt %}<assistant>{% endif %}<eof>", False),  # not the last thing
])
def test_generation_prompt_suffix(template, appends):
    """Where the template decides nothing but a last {% if add_generation_prompt %} printing constants
    and variables, a prompt's rendering with the generation prompt is the one without it plus a
    fixed suffix (the mask needs one render less per assistant turn); elsewhere both are rendered."""
    assert chat._appends_generation_prompt(template) == appends
    for kwargs in ({"bos_token": "<s>", "date_string": "01 Jan 2025"}, {"bos_token": "<s>", "think": True}):
        suffix = chat._generation_suffix(template_tok(template, **kwargs))
        assert (suffix is not None) == appends
        for conv in CONVS.values():
            for k in range(len(conv)):
                if appends:
                    assert render(template, conv[:k + 1], True, **kwargs) == render(template, conv[:k + 1], False, **kwargs) + suffix
    if "think" in template:  # the suffix follows the variables
        assert chat._generation_suffix(template_tok(template, bos_token="<s>", think=True)) == "<s><assistant><think>"
        assert chat._generation_suffix(template_tok(template, bos_token="<s>")) == "<s><assistant>"
        assert chat._generation_suffix(template_tok(template, bos_token=("<s>",))) == "('<s>',)<assistant>"  # as given


def test_sandbox_refuses_unsafe_attributes_every_time():
    """The sandbox's attribute verdicts are remembered per (type, name): a refusal stays a refusal."""
    for source in ["{{ messages.append('x') }}", "{{ messages[0].clear() }}", "{{ messages.__class__ }}",
                   "{{ messages[0].items.__self__ }}"]:
        for _ in range(2):
            with pytest.raises(formats.DataError):
                render(source, [U1], False)
    assert render("{{ messages[0].get('role') }}{% for m in messages %}{{ loop.index0 }}{% endfor %}", [U1, A1], False) == "user01"
