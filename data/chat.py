"""
Tokenizers and chat rendering with the `tokenizers` library (and jinja2 for chat templates).

A tokenizer with a chat template (tokenizer_config.json's "chat_template", or chat_template.jinja)
is rendered with it exactly as transformers' apply_chat_template does: a sandboxed jinja2
environment with trim_blocks/lstrip_blocks, loopcontrols, the tojson filter, raise_exception,
strftime_now, the special tokens (bos_token, eos_token, ...) and extra variables (Qwen3's
enable_thinking, Llama 3.1's date_string: --chat-template-kwargs). One difference: printing a
variable nobody passed is an error naming it, where transformers prints "" (a silent hole in the
training text). The ids are the rendered text tokenized in one piece, as a server tokenizes it.

The assistant mask comes from the template's own output, not from per-family rules: for each
assistant message k of the conversation (rendered once, whole),
  - the messages before it must render as a prefix of the whole (else DataError: e.g. Mistral
    v0.3's template moves the system message into the last user turn only),
  - its turn starts where the whole rendering leaves the rendering of messages[:k] with the
    generation prompt (normally right after that prompt; where the template renders this turn
    without part of it, e.g. Qwen3 with enable_thinking=false before the last user turn, where the
    two diverge),
  - and ends with the first stop token (Tok.stop_ids: eos, generation_config's eos ids and the
    template's end-of-turn token) from there: what the model generates before a server stops it.
Masked = 1 from that start through that end-of-turn token, so the model learns to stop; text after
it (ChatML's "\\n") is the template's separator, never generated, so not trained (as TRL's
{% generation %} templates). Tokens straddling a boundary count as inside (transformers' rule).
Qwen3: the whole conversation is rendered once, so an earlier assistant turn is trained as the
template shows it in the full conversation (reasoning dropped) and the last one with what follows
the generation prompt, i.e. "<think>\\n\\n</think>\\n\\n" + content (the model writes that block when
served with thinking on; with enable_thinking=false the prompt holds it and it is not trained).

Prompts and answers (preference pairs, KTO, prompt/completion SFT, RL): prompt = the messages
with the generation prompt; completion = what follows it in the rendering of prompt + answer,
through its last end-of-turn token (TRL's rule). The whole rendering must start with the
prompt's, else DataError. The completion's ids are the one-piece ids after the prompt's; where a
token would straddle the boundary, the completion text is tokenized on its own.

Tokenizers without a template (the built-in task, GPT-2), or --chat-format, use a built-in format.
render_chat builds those segment by segment (role header, content, end-of-turn):

  chatml  (Qwen2/2.5/3)  <|im_start|>{role}\\n{content}<|im_end|>\\n ...   prompt: <|im_start|>assistant\\n
  llama3  (Llama 3.x)    <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> ...
  plain   (GPT-2, the built-in task)   [bos] User: {content}\\n  Assistant: {content}[eos] ...   prompt: "Assistant: "

(no default system prompts or <think> blocks there: Tok.system_prompt inserts one when a
conversation has none, in every mode).
"""
import bisect
import copy
import datetime
import functools
import json
import os
import re
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from .formats import DataError, as_messages

QWEN2_SYSTEM_PROMPT = "You are a helpful assistant."
QWEN25_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# the named special tokens transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES)
TEMPLATE_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass
class Tok:
    tokenizer: Tokenizer
    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_ids: list = field(default_factory=list)  # generation stops at any of these
    chat_format: str = "plain"  # "template" (the tokenizer's chat template), or built-in "chatml", "llama3", "plain"
    system_prompt: str | None = None  # inserted when a conversation starts without a system message
    chat_template: str | None = None  # the jinja source rendered when chat_format == "template"
    template_kwargs: dict = field(default_factory=dict)  # its variables: special tokens, then --chat-template-kwargs

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def special(self, token):
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"chat format {self.chat_format!r} needs the token {token!r}, which the tokenizer lacks")
        return i


def _read_json(path):
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno}); download it again") from None
    return {}


def _read_template(model_dir, tcfg):
    """The chat template source: chat_template.jinja wins over tokenizer_config.json (as in
    transformers); a list of named templates gives its "default"."""
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    t = tcfg.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        if "default" not in named:
            raise ValueError(f"{model_dir}/tokenizer_config.json: chat templates {sorted(named)} but none named 'default'")
        t = named["default"]
    return t or None


def _parse_template_kwargs(s):
    """--chat-template-kwargs: a JSON object (or a dict already) of template variables."""
    if isinstance(s, dict):
        return dict(s)
    try:
        kw = json.loads(s) if s else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--chat-template-kwargs: invalid JSON ({e.msg} at column {e.colno}): {s!r}") from None
    if not isinstance(kw, dict):
        raise ValueError(f"--chat-template-kwargs: expected a JSON object such as '{{\"enable_thinking\": false}}', got {s!r}")
    return kw


def load_tokenizer(model_dir, chat_format=None, system_prompt=None, template_kwargs=None) -> Tok:
    """tokenizer.json plus the special tokens of tokenizer_config.json / generation_config.json /
    config.json, and the chat template. Rendering: the tokenizer's chat template if it has one
    (chat_format "template"; template_kwargs: a JSON string or dict of extra template variables),
    else a built-in format detected from the vocabulary: <|im_start|> -> chatml,
    <|start_header_id|> -> llama3, else plain. chat_format="chatml"/"llama3"/"plain" forces a
    built-in one. eos_id is tokenizer_config's eos_token (else the first eos_token_id); stop_ids
    adds every eos_token_id and the end-of-turn token (the template's, found by rendering a probe
    conversation, or the built-in format's); bos is tokenizer_config's bos_token or none (with a
    template: only if the tokenizer itself adds it); pad falls back to eos."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: no such directory; --model expects a Hugging Face model directory "
                                "(config.json, model.safetensors, tokenizer.json)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; nanotrl reads the fast tokenizer's tokenizer.json (a model with "
                                "only a slow tokenizer: save one with transformers' AutoTokenizer.save_pretrained)")
    try:
        tk = Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception with serde's message
        raise ValueError(f"{path}: not a valid tokenizer.json ({e}); download it again") from None
    tcfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    gcfg = _read_json(os.path.join(model_dir, "generation_config.json"))
    mcfg = _read_json(os.path.join(model_dir, "config.json"))

    def content(name):
        t = tcfg.get(name)
        return t.get("content") if isinstance(t, dict) else t

    def tid(name):
        t = content(name)
        return tk.token_to_id(t) if t else None

    eos_cfg = gcfg.get("eos_token_id", mcfg.get("eos_token_id"))
    eos_list = eos_cfg if isinstance(eos_cfg, list) else [eos_cfg] if eos_cfg is not None else []
    eos = tid("eos_token")
    eos = eos if eos is not None else (eos_list[0] if eos_list else None)
    if eos is None:
        raise ValueError(f"{model_dir}: no eos token in tokenizer_config.json, generation_config.json or config.json")
    bos = tid("bos_token")  # not config.json's bos_token_id: Qwen sets one that its tokenizer never adds
    pad = tid("pad_token")
    pad = pad if pad is not None else mcfg.get("pad_token_id")
    pad = pad if pad is not None else eos
    stops = list(dict.fromkeys([eos] + eos_list))
    kwargs = _parse_template_kwargs(template_kwargs)
    template = None if chat_format else _read_template(model_dir, tcfg)
    if template is not None:
        specials = {k: content(k) for k in TEMPLATE_SPECIAL_TOKENS if content(k)}
        # a bos the tokenizer never adds is no bos to keep at a cut or put before plain text:
        # SmolLM2 names ChatML's turn opener <|im_start|> as its bos_token (Llama 3 adds its own)
        adds_bos = bos is not None and tk.encode("a", add_special_tokens=True).ids[:1] == [bos]
        tok = Tok(tk, bos if adds_bos else None, eos, pad, stops, "template", system_prompt, template,
                  {**specials, **kwargs})
        try:
            _compile(template)
        except Exception as e:  # jinja2.TemplateSyntaxError; jinja2 is imported lazily
            raise ValueError(f"{model_dir}: the chat template does not compile: {e}") from None
        end = _template_end_of_turn(tok)
        tok.stop_ids = list(dict.fromkeys(stops + ([end] if end is not None else [])))
        return tok
    if kwargs:
        raise ValueError(f"{model_dir}: --chat-template-kwargs given, but chats are rendered in a built-in format "
                         f"({'--chat-format ' + chat_format if chat_format else 'the tokenizer has no chat template'})")
    vocab = tk.get_vocab()
    fmt = chat_format or ("chatml" if "<|im_start|>" in vocab else "llama3" if "<|start_header_id|>" in vocab else "plain")
    if fmt not in ("chatml", "llama3", "plain"):
        raise ValueError(f"chat_format {fmt!r}: expected chatml, llama3 or plain (or empty: the tokenizer's chat template)")
    end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(fmt)
    if end is not None:
        if end not in vocab:
            raise ValueError(f"{model_dir}: chat format {fmt!r} needs the token {end!r}, which the tokenizer lacks")
        stops = list(dict.fromkeys(stops + [vocab[end]]))
    return Tok(tk, bos, eos, pad, stops, fmt, system_prompt)


# ----------------------------------------------------------------------------- chat templates

@functools.lru_cache(maxsize=8)
def _compile(source):
    """The template compiled as transformers compiles it (utils/chat_template_utils.py): an
    immutable sandbox (templates are code from a download), trim_blocks + lstrip_blocks,
    loopcontrols, {% generation %} accepted (its body is rendered; our masks need no markers),
    tojson without HTML escaping, raise_exception, strftime_now, and dict/namespace that cannot
    reach underscore attributes."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6 (older sandboxes have known escapes); found {jinja2.__version__}")

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Undefined(jinja2.Undefined):
        def __str__(self):  # transformers prints "" here; a missing variable must not vanish from the training text
            self._fail_with_undefined_error()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # jinja's signature trick, so namespace(self=...) works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Sandbox(ImmutableSandboxedEnvironment):
        def is_safe_attribute(self, obj, attr, value):
            # jinja's answer depends on the object's type and the name only (isinstance checks and
            # name lists): asked once per pair, not at every loop.index0 of every render
            key = (type(obj), attr)
            if obj.__class__ is not key[0]:  # a proxy: isinstance would also see its __class__
                return super().is_safe_attribute(obj, attr, value)
            if key not in self.safe:
                self.safe[key] = super().is_safe_attribute(obj, attr, value)
            return self.safe[key]

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, undefined=Undefined, extensions=[Generation, jinja2.ext.loopcontrols])
    env.safe = {}
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.datetime.now().strftime(f),
                       dict=Dict(), namespace=Namespace)
    template = env.from_string(source)
    # its globals are a ChainMap over env.globals (read key by key at every render): one dict instead
    template.globals = dict(template.globals)
    return template


def _template_messages(messages):
    """As transformers prepares them: keys whose value is None dropped; a message's reasoning under
    any of its names also given as reasoning_content and thinking (the names templates read)."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


def _render(messages, tok: Tok, add_generation_prompt, where):
    """The template's text of messages prepared by _template_messages; a template error
    (raise_exception, a missing variable) -> DataError at `where`."""
    import jinja2

    try:
        return _compile(tok.chat_template).render(**{"messages": messages, "tools": None, "documents": None,
                                                     "add_generation_prompt": add_generation_prompt,
                                                     **tok.template_kwargs})  # agent.py may give "tools"
    except jinja2.exceptions.UndefinedError as e:
        raise DataError(f"{where}: the chat template uses something not given: {e.message} (template variables go in "
                        "--chat-template-kwargs as JSON)") from None
    except jinja2.exceptions.TemplateError as e:  # raise_exception(...), a sandbox refusal
        raise DataError(f"{where}: the chat template refused the conversation: {e.message or e}") from None
    except Exception as e:  # a Python error inside the template (e.g. a string method on a number)
        raise DataError(f"{where}: the chat template failed on this conversation: {type(e).__name__}: {e}") from None


@functools.lru_cache(maxsize=8)
def _appends_generation_prompt(source):
    """True when add_generation_prompt decides nothing but a last top-level
    {% if add_generation_prompt %}, whose body prints constants and variables the template never
    sets (Llama 3's, Qwen's, ...): then a prompt with it is the prompt without it plus a suffix
    that depends on the template variables only (the same for every conversation)."""
    from jinja2 import nodes

    tree = _compile(source).environment.parse(source)
    last = tree.body[-1] if tree.body else None
    if not (isinstance(last, nodes.If) and isinstance(last.test, nodes.Name) and not last.elif_ and not last.else_
            and [n for n in tree.find_all(nodes.Name) if n.name == "add_generation_prompt"] == [last.test]):
        return False
    set_here = {n.name for n in tree.find_all(nodes.Name) if n.ctx != "load"}
    pure = (nodes.Output, nodes.TemplateData, nodes.Const, nodes.If, nodes.Name, nodes.Test, nodes.Not, nodes.And,
            nodes.Or, nodes.Compare, nodes.Operand, nodes.Concat)  # no calls, filters or loops
    inside = [n for b in last.body for n in [b, *b.find_all(nodes.Node)]]
    return all(type(n) in pure and not (isinstance(n, nodes.Name) and (n.name in set_here or n.name == "messages"))
               for n in inside)


PROBE = _template_messages([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}])  # what probes render
_SUFFIXES = []  # the last few (template, its variables, suffix) asked for: every conversation asks again


def _generation_suffix(tok: Tok):
    """What add_generation_prompt appends to every rendering with tok's template and variables
    (see _appends_generation_prompt), from a probe conversation; None where that does not hold or
    the probe does not render."""
    for template, kwargs, suffix in list(_SUFFIXES):  # a copy: other threads may add to it
        if template is tok.chat_template and kwargs == tok.template_kwargs:
            return suffix
    suffix = None
    if _appends_generation_prompt(tok.chat_template):
        try:
            bare, full = _render(PROBE[:1], tok, False, "probe"), _render(PROBE[:1], tok, True, "probe")
            suffix = full[len(bare):] if full.startswith(bare) else None
        except DataError:
            pass
    _SUFFIXES[:] = _SUFFIXES[-3:] + [(tok.chat_template, copy.deepcopy(tok.template_kwargs), suffix)]
    return suffix


def _template_end_of_turn(tok: Tok):
    """The first special token the template writes after an assistant answer (e.g. <|im_end|>,
    <|eot_id|>, </s>), from a probe conversation; None if the probe does not render."""
    try:
        head, full = _render(PROBE[:1], tok, True, "probe"), _render(PROBE, tok, False, "probe")
    except DataError:
        return None
    special = {i for i, t in tok.tokenizer.get_added_tokens_decoder().items() if t.special}
    enc = tok.tokenizer.encode(full, add_special_tokens=False)
    start = len(os.path.commonprefix([head, full]))
    return next((i for i, (s, _) in zip(enc.ids, enc.offsets) if s >= start and i in special), None)


def _template_chat(messages, tok: Tok, add_generation_prompt, first, where):
    """(text, ids, mask) of a conversation rendered with the chat template; mask = 1 on the turns of
    assistant messages from index `first` on (see the module docstring for the rule)."""
    prepared = _template_messages(messages)
    text = _render(prepared, tok, add_generation_prompt, where)
    enc = tok.tokenizer.encode(text, add_special_tokens=False)
    ids, ends = enc.ids, _token_ends(enc)
    mask, stops, t = [0] * len(ids), tok.stop_ids, 0
    suffix = _generation_suffix(tok)
    for k, m in enumerate(messages):
        if k < first or m["role"] != "assistant":
            continue
        before = _render(prepared[:k], tok, False, where)
        if not text.startswith(before):
            raise DataError(f"{where}: the chat template renders messages 0-{k - 1} differently once later messages "
                            f"follow (e.g. a system message moved or dropped), so assistant message {k} has no "
                            "well-defined place in the text; change the conversation (e.g. no system message)")
        # the same prompt with the generation prompt: a fixed suffix where the template only appends it
        head = before + suffix if suffix is not None else _render(prepared[:k], tok, True, where)
        start = len(head) if text.startswith(head) else len(os.path.commonprefix([head, text]))
        if t > 0 and ends[t - 1] > start:
            raise DataError(f"{where}: the chat template ends an assistant turn before message {k} with none of the "
                            f"stop tokens {sorted(set(stops))}: the model could not learn to stop")
        t = s = _first_ending_after(ends, start, t)
        t = _first_of(ids, stops, t)
        # where it is a prefix, the turn ends within it (the whole text, for the last message)
        after = text if k == len(messages) - 1 and not add_generation_prompt else _render(prepared[:k + 1], tok, False, where)
        if t == len(ids) or (after is not text and text.startswith(after) and ends[t] > len(after)):
            raise DataError(f"{where}: the chat template ends assistant message {k} with none of the stop tokens "
                            f"{sorted(set(stops))}: the model could not learn to stop")
        t += 1
        mask[s:t] = [1] * (t - s)
    return text, ids, mask


def _token_ends(enc):
    """Each token's end offset in the text: never decreasing, as tokens follow the text. The data
    cache's encodings give them lazily (enc.ends); the library's from its offsets."""
    ends = getattr(enc, "ends", None)
    return ends if ends is not None else [b for _, b in enc.offsets]


def _first_ending_after(ends, c, lo):
    """The first token t >= lo with ends[t] > c."""
    return bisect.bisect_right(ends, c, lo) if isinstance(ends, list) else ends.first_ending_after(c, lo)


def _first_of(ids, values, t):
    """The first index >= t in ids of any of values, else len(ids)."""
    n = len(ids)
    for v in values:
        try:
            n = ids.index(v, t, n)
        except ValueError:
            pass
    return n


# ----------------------------------------------------------------------------- built-in formats

def _segments(msg, tok: Tok, first):
    """(ids, trainable) segments of one message in the tokenizer's chat format."""
    role, content, fmt = msg["role"], msg["content"], tok.chat_format
    train = role == "assistant"
    if fmt == "chatml":
        return [([tok.special("<|im_start|>")] + tok.encode(f"{role}\n"), False), (tok.encode(content), train),
                ([tok.special("<|im_end|>")], train), (tok.encode("\n"), False)]
    if fmt == "llama3":
        head = ([tok.special("<|begin_of_text|>")] if first else []) + [tok.special("<|start_header_id|>")] + \
            tok.encode(role) + [tok.special("<|end_header_id|>")] + tok.encode("\n\n")
        return [(head, False), (tok.encode(content.strip()), train), ([tok.special("<|eot_id|>")], train)]
    bos = [tok.bos_id] if first and tok.bos_id is not None else []
    if role == "assistant":
        return [(bos + tok.encode("Assistant: "), False), (tok.encode(content), True), ([tok.eos_id], True)]
    return [(bos + tok.encode(f"{role.capitalize()}: {content}\n"), False)]


def _generation_prompt(tok: Tok, first):
    if tok.chat_format == "chatml":
        return [tok.special("<|im_start|>")] + tok.encode("assistant\n")
    if tok.chat_format == "llama3":
        return ([tok.special("<|begin_of_text|>")] if first else []) + [tok.special("<|start_header_id|>")] + \
            tok.encode("assistant") + [tok.special("<|end_header_id|>")] + tok.encode("\n\n")
    return ([tok.bos_id] if first and tok.bos_id is not None else []) + tok.encode("Assistant: ")


def _chat(messages, tok: Tok, add_generation_prompt=False, first=0, where="a conversation"):
    """(text, ids, mask) of a conversation: text is the template's rendering (None in a built-in
    format); mask = 1 on the turns of assistant messages from index `first` on."""
    if tok.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages, first = [{"role": "system", "content": tok.system_prompt}] + list(messages), first + 1
    if tok.chat_format == "template":
        return _template_chat(messages, tok, add_generation_prompt, first, where)
    ids, mask = [], []
    for i, msg in enumerate(messages):
        for seg, train in _segments(msg, tok, i == 0):
            ids += seg
            mask += [int(train and i >= first)] * len(seg)
    if add_generation_prompt:
        seg = _generation_prompt(tok, not messages)
        ids, mask = ids + seg, mask + [0] * len(seg)
    return None, ids, mask


def render_chat(messages, tok: Tok, add_generation_prompt=False):
    """Token ids of a conversation and its assistant mask (1 = train on this token): ([int], [0/1])."""
    _, ids, mask = _chat(messages, tok, add_generation_prompt)
    return ids, mask


def _prompt_answer(prompt_msgs, answer, tok: Tok, where):
    """TRL's rule for a prompt and its answer: (prompt ids with the generation prompt, the answer's
    ids after them through its last end-of-turn token, and the whole conversation's ids and mask
    with only the answer's assistant turns masked). The whole rendering must start with the
    prompt's; where a token straddles their boundary, the answer text is tokenized on its own."""
    ptext, pids, _ = _chat(prompt_msgs, tok, True, where=where)
    text, ids, mask = _chat(prompt_msgs + as_messages(answer, "assistant"), tok, first=len(prompt_msgs), where=where)
    if ptext is not None and not text.startswith(ptext):
        n = len(os.path.commonprefix([ptext, text]))
        raise DataError(f"{where}: the chat template renders the prompt (with its generation prompt) differently when "
                        f"the answer follows: {ptext[n:n + 40]!r} in the prompt vs {text[n:n + 40]!r}, so what the "
                        "model answers to is not defined")
    last = max(i for i, m in enumerate(mask) if m) + 1  # the template's separator after it (ChatML's "\n") is not answered
    if ids[:len(pids)] == pids:
        return pids, ids[len(pids):last], ids, mask
    assert ptext is not None, "built-in formats render the prompt's ids as a prefix"
    rest = tok.encode(text[len(ptext):])
    return pids, rest[:max(i for i, t in enumerate(rest) if t in tok.stop_ids) + 1], ids, mask


def tokenize_sft(example, tok: Tok, max_length, train_on_prompt=False):
    """{"input_ids", "loss_mask"} of an SFT example: {"messages"} (every assistant turn is
    learned), {"prompt", "completion"} (message lists: only the completion is learned) or {"text"}
    (bos + text + eos, all learned). loss_mask is per token (1 = learn this token); the shift to
    labels happens in batching.py.

    Truncation: the end is cut to max_length tokens (the start of a conversation is kept, as in
    TRL). An example left with no trainable token raises DataError (never skipped silently): raise
    max_length or fix the data."""
    if "text" in example:
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(example["text"]) + [tok.eos_id]
        mask = [1] * len(ids)
    elif "messages" in example:
        _, ids, mask = _chat(example["messages"], tok, where=example.get("where", "an example"))
    else:  # assistant turns inside the prompt are context, not targets
        _, _, ids, mask = _prompt_answer(as_messages(example["prompt"], "user"), example["completion"], tok,
                                         example.get("where", "an example"))
    if train_on_prompt:
        mask = [1] * len(ids)
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        raise DataError(f"{example.get('where', 'an example')}: no trainable token left after truncation to "
                        f"max_length={max_length}")
    return {"input_ids": ids, "loss_mask": mask}


def _keep_end(ids, n, tok: Tok):
    """The last n tokens of a prompt, keeping its leading BOS (Llama's <|begin_of_text|>) if cut."""
    if n <= 0:
        raise ValueError(f"max_prompt_length must be positive, got {n}")
    if len(ids) <= n:
        return ids
    return ids[:1] + ids[len(ids) - n + 1:] if tok.bos_id is not None and ids[0] == tok.bos_id else ids[-n:]


def tokenize_prompt(example, tok: Tok, max_prompt_length):
    """Prompt ids (a string is one user turn) ending with the assistant generation prompt, for
    RL and generation; if longer than max_prompt_length the start is cut (the end holds the
    question and the generation prompt) and the BOS kept."""
    _, ids, _ = _chat(as_messages(example["prompt"], "user"), tok, True, where=example.get("where", "a prompt"))
    return _keep_end(ids, max_prompt_length, tok)


def tokenize_preference(example, tok: Tok, max_length, max_prompt_length):
    """{"prompt_ids", "chosen_ids", "rejected_ids"}; completions end with the end-of-turn token.

    Truncation (TRL's rule): if prompt + longer completion exceeds max_length, the prompt keeps
    its last max_prompt_length tokens (and its BOS), then both completions are cut to
    max_length - len(prompt)."""
    where = example.get("where", "an example")
    prompt_msgs = as_messages(example["prompt"], "user")
    prompt, chosen, _, _ = _prompt_answer(prompt_msgs, example["chosen"], tok, where)
    _, rejected, _, _ = _prompt_answer(prompt_msgs, example["rejected"], tok, where)
    if len(prompt) + max(len(chosen), len(rejected)) > max_length:
        prompt = _keep_end(prompt, max_prompt_length, tok)
        keep = max_length - len(prompt)
        if keep <= 0:
            raise DataError(f"{where}: a prompt of {len(prompt)} tokens leaves no room "
                            f"for the answers in max_length={max_length} (max_prompt_length={max_prompt_length})")
        chosen, rejected = chosen[:keep], rejected[:keep]
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
