"""
Tokenizers and chat rendering with the `tokenizers` library only (no transformers, no jinja).

render_chat builds token ids segment by segment (role header, content, end-of-turn), so the
assistant mask is exact by construction: 1 on every assistant content token and on the token that
ends the assistant turn (the model must learn to stop), 0 on everything else. The rendered text
is the one of the model family's HF chat template:

  chatml  (Qwen2/2.5/3)  <|im_start|>{role}\\n{content}<|im_end|>\\n ...   prompt: <|im_start|>assistant\\n
  llama3  (Llama 3.x)    <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> ...
  plain   (GPT-2, the built-in task)   [bos] User: {content}\\n  Assistant: {content}[eos] ...   prompt: "Assistant: "

Default system prompts: HF's Qwen2 / Qwen2.5 templates insert QWEN2_SYSTEM_PROMPT /
QWEN25_SYSTEM_PROMPT when a conversation has no system message, Llama 3.1's adds "Cutting Knowledge
Date" lines. Ours inserts nothing unless asked: load_tokenizer(dir, system_prompt=QWEN25_SYSTEM_PROMPT)
(or setting Tok.system_prompt) reproduces Qwen2.5's text exactly. Qwen3's template also wraps the
last assistant turn in a <think></think> block: not reproduced (write it into the content if wanted).

The text is the template's; the ids can differ from tokenizing that text in one piece only where a
BPE merge would cross a segment boundary (e.g. content starting with a newline), which is the
price of an exact mask.
"""
import json
import os
import warnings
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from .formats import DataError, as_messages

QWEN2_SYSTEM_PROMPT = "You are a helpful assistant."
QWEN25_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclass
class Tok:
    tokenizer: Tokenizer
    bos_id: int | None
    eos_id: int
    pad_id: int
    stop_ids: list = field(default_factory=list)  # generation stops at any of these
    chat_format: str = "plain"  # "chatml", "llama3" or "plain"
    system_prompt: str | None = None  # inserted when a conversation starts without a system message

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


def load_tokenizer(model_dir, chat_format=None, system_prompt=None) -> Tok:
    """tokenizer.json plus the special tokens of tokenizer_config.json / generation_config.json /
    config.json. The chat format is detected from the vocabulary unless given: <|im_start|> ->
    chatml, <|start_header_id|> -> llama3, else plain (with a warning if the tokenizer has another
    chat template). eos_id is tokenizer_config's eos_token (else the first eos_token_id); stop_ids
    adds every eos_token_id and the format's end-of-turn token; bos is tokenizer_config's
    bos_token or none; pad falls back to eos."""
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

    def tid(name):
        t = tcfg.get(name)
        t = t.get("content") if isinstance(t, dict) else t
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
    vocab = tk.get_vocab()
    fmt = chat_format or ("chatml" if "<|im_start|>" in vocab else "llama3" if "<|start_header_id|>" in vocab else "plain")
    if fmt == "plain" and not chat_format and (tcfg.get("chat_template") or os.path.exists(os.path.join(model_dir, "chat_template.jinja"))):
        warnings.warn(f"{model_dir}: the tokenizer's chat template is neither ChatML nor Llama-3; rendering chats in the "
                      "plain 'User: ... Assistant: ...' format (pass --chat-format plain to silence this)")
    stops = list(dict.fromkeys([eos] + eos_list))
    if fmt not in ("chatml", "llama3", "plain"):
        raise ValueError(f"chat_format {fmt!r}: expected chatml, llama3 or plain")
    end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(fmt)
    if end is not None:
        if end not in vocab:
            raise ValueError(f"{model_dir}: chat format {fmt!r} needs the token {end!r}, which the tokenizer lacks")
        stops = list(dict.fromkeys(stops + [vocab[end]]))
    return Tok(tk, bos, eos, pad, stops, fmt, system_prompt)


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


def render_chat(messages, tok: Tok, add_generation_prompt=False):
    """Token ids of a conversation and its assistant mask (1 = train on this token): ([int], [0/1])."""
    if tok.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": tok.system_prompt}] + list(messages)
    ids, mask = [], []
    for i, msg in enumerate(messages):
        for seg, train in _segments(msg, tok, i == 0):
            ids += seg
            mask += [int(train)] * len(seg)
    if add_generation_prompt:
        seg = _generation_prompt(tok, not messages)
        ids, mask = ids + seg, mask + [0] * len(seg)
    return ids, mask


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
        ids, mask = render_chat(example["messages"], tok)
    else:
        prompt = as_messages(example["prompt"], "user")
        ids, mask = render_chat(prompt + as_messages(example["completion"], "assistant"), tok)
        n = len(render_chat(prompt, tok, add_generation_prompt=True)[0])
        mask = [0] * n + mask[n:]  # assistant turns inside the prompt are context, not targets
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
    ids, _ = render_chat(as_messages(example["prompt"], "user"), tok, add_generation_prompt=True)
    return _keep_end(ids, max_prompt_length, tok)


def _completion(prompt_msgs, completion, tok):
    """Ids of the assistant completion after the prompt: content + end-of-turn token."""
    full, mask = render_chat(prompt_msgs + as_messages(completion, "assistant"), tok)
    start, _ = render_chat(prompt_msgs, tok, add_generation_prompt=True)
    assert full[:len(start)] == start, "the generation prompt must be a prefix of the rendered answer"
    ids = full[len(start):]
    last = max(i for i, m in enumerate(mask[len(start):]) if m) if any(mask[len(start):]) else -1
    return ids[:last + 1]  # drop the template's trailing separator (chatml's "\n")


def tokenize_preference(example, tok: Tok, max_length, max_prompt_length):
    """{"prompt_ids", "chosen_ids", "rejected_ids"}; completions end with the end-of-turn token.

    Truncation (TRL's rule): if prompt + longer completion exceeds max_length, the prompt keeps
    its last max_prompt_length tokens (and its BOS), then both completions are cut to
    max_length - len(prompt)."""
    prompt_msgs = as_messages(example["prompt"], "user")
    prompt, _ = render_chat(prompt_msgs, tok, add_generation_prompt=True)
    chosen, rejected = _completion(prompt_msgs, example["chosen"], tok), _completion(prompt_msgs, example["rejected"], tok)
    if len(prompt) + max(len(chosen), len(rejected)) > max_length:
        prompt = _keep_end(prompt, max_prompt_length, tok)
        keep = max_length - len(prompt)
        if keep <= 0:
            raise DataError(f"{example.get('where', 'an example')}: a prompt of {len(prompt)} tokens leaves no room "
                            f"for the answers in max_length={max_length} (max_prompt_length={max_prompt_length})")
        chosen, rejected = chosen[:keep], rejected[:keep]
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
