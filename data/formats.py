"""
JSONL readers for TRL's dataset field names. Every record is validated; a bad one raises
DataError naming the file, the line and the field. Nothing is dropped silently.

  SFT         {"messages": [{"role", "content"}, ...]}  |  {"prompt", "completion"}  |  {"text"}
  preference  {"prompt", "chosen", "rejected"}  |  {"chosen", "rejected"} sharing a prefix (implicit prompt)
  unpaired    {"prompt", "completion", "label": bool}   (KTO)
  prompts     {"prompt", ...extra fields}               (RL; extra fields go to the reward function)

prompt/completion/chosen/rejected are strings or lists of messages (TRL's conversational form).
"""
import gzip
import json
import warnings
import zlib

ROLES = ("system", "user", "assistant", "tool")  # tool: a tool call's result (agent.py)


class DataError(ValueError):
    """Malformed data; the message says where (file:line), which field, what was expected and found."""


def read_jsonl(path):
    """The records (dicts) of a .jsonl or .jsonl.gz file; blank lines are skipped."""
    return [rec for _, rec in iter_jsonl(path)]


def numbered_jsonl(path):
    """[(line_number, record)] of a .jsonl or .jsonl.gz file, for error messages that name the line."""
    return list(iter_jsonl(path))


def iter_jsonl(path):
    """(line_number, record) of a .jsonl or .jsonl.gz file, one at a time (never the whole file)."""
    for n, line in numbered_lines(path):
        yield n, parse_line(line, f"{path}:{n}")


def numbered_lines(path):
    """(line_number, text) of the non-blank lines of a .jsonl or .jsonl.gz file, streamed; a file
    with none raises DataError (after the last line)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    found, n = False, 0
    # bytes, decoded line by line: a non-UTF-8 byte is reported at its line
    with opener(path, "rb") as f:
        try:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{n}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                    "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
                if line.strip():
                    found = True
                    yield n, line
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: truncated or corrupt gzip data {f'after line {n}' if n else 'at its start'} ({e}); "
                            "write or download the file again (gzip -t checks it)") from None
    if not found:
        raise DataError(f"{path}: no records")


def parse_line(line, where):
    """One JSONL line as a dict (DataError naming `where` otherwise)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def _field(rec, key, where, kinds=(str, list)):
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r}")
    v = rec[key]
    if isinstance(v, list):
        if list not in kinds:
            raise DataError(f"{where}: field {key!r}: expected a string, got a list")
        _check_messages(v, f"{where}: field {key!r}")
    elif not isinstance(v, tuple(k for k in kinds if k is not list)):
        want = " or ".join({str: "a string", list: "a list of messages", bool: "a boolean"}[k] for k in kinds)
        raise DataError(f"{where}: field {key!r}: expected {want}, got {type(v).__name__}")
    return v


def _check_messages(msgs, where):
    """Messages are numbered from 0, as in the JSON list."""
    if not msgs:
        raise DataError(f"{where}: empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i}: expected {{'role': ..., 'content': <string>}}, got {m!r:.80}")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i}: role {m.get('role')!r} is not one of {'/'.join(ROLES)}")


def _completion(rec, key, where):
    """A completion: a string, or messages ending with the assistant turn to learn from."""
    v = _field(rec, key, where)
    if isinstance(v, list) and v[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {key!r}: the last message must be the assistant's, got {v[-1]['role']!r}")
    return v


def _prompt(rec, where):
    """A prompt: a string, or messages that the completion can follow (not ending with the assistant)."""
    v = _field(rec, "prompt", where)
    if isinstance(v, list) and v[-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'prompt': ends with an assistant message; the answer must follow a user turn")
    return v


def as_messages(x, role):
    """A string becomes one message of `role`; a message list is returned as is."""
    return [{"role": role, "content": x}] if isinstance(x, str) else list(x)


def load_sft(path):
    """SFT examples: {"messages": [...]} (learn every assistant turn), {"prompt", "completion"}
    (message lists; learn the completion only) or {"text"}; each with "where" (file:line)."""
    return [sft_example(rec, f"{path}:{n}") for n, rec in iter_jsonl(path)]


def sft_example(rec, where):
    if "messages" in rec:
        msgs = _field(rec, "messages", where, (list,))
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: field 'messages': no assistant message to train on")
        return {"messages": msgs, "where": where}
    if "text" in rec:
        return {"text": _field(rec, "text", where, (str,)), "where": where}
    if "prompt" in rec or "completion" in rec:
        prompt, completion = _prompt(rec, where), _completion(rec, "completion", where)
        return {"prompt": as_messages(prompt, "user"), "completion": as_messages(completion, "assistant"), "where": where}
    raise DataError(f"{where}: expected field 'messages', 'text' or 'prompt'+'completion'; found {sorted(rec)}")


def load_preference(path):
    """Pairs as {"prompt": [messages], "chosen": [messages], "rejected": [messages], "where",
    ...extra fields}; an optional "margin" (train_rm.py --use-margin) must be a number."""
    out = [preference_example(rec, f"{path}:{n}") for n, rec in iter_jsonl(path)]
    same = [ex["where"].rsplit(":", 1)[1] for ex in out if ex["chosen"] == ex["rejected"]]
    warn_identical(path, len(same), same[:6], len(out))
    return out


def warn_identical(path, count, first_lines, total):
    """Pairs whose two answers are the same carry no preference (DPO's loss is constant on them):
    not an error, but worth a word, with where to look."""
    if count:
        shown = ", ".join(str(n) for n in first_lines[:5]) + (", ..." if count > 5 else "")
        warnings.warn(f"{path}: {count} of {total} pairs have identical chosen and rejected answers (lines {shown}): "
                      "they carry no preference")


def preference_example(rec, where):
    chosen, rejected = _completion(rec, "chosen", where), _completion(rec, "rejected", where)
    if "prompt" in rec:
        prompt = as_messages(_prompt(rec, where), "user")
        chosen, rejected = as_messages(chosen, "assistant"), as_messages(rejected, "assistant")
    else:  # implicit prompt: two whole conversations sharing their first turns
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise DataError(f"{where}: without a 'prompt' field, 'chosen' and 'rejected' must be message lists")
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k == 0 or k == len(chosen) or k == len(rejected):
            raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt prefix, or one contains the other")
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if prompt[-1]["role"] == "assistant":
            raise DataError(f"{where}: 'chosen' and 'rejected' first differ at a {chosen[0]['role']} message; "
                            "they must share every message before the answers")
    if "margin" in rec and (isinstance(rec["margin"], bool) or not isinstance(rec["margin"], (int, float))):
        raise DataError(f"{where}: field 'margin': expected a number, got {type(rec['margin']).__name__}")
    extras = {k: v for k, v in rec.items() if k not in ("prompt", "chosen", "rejected")}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extras, "where": where}


def load_unpaired(path):
    """KTO examples as {"prompt": [messages], "completion": [messages], "label": bool, "where"}."""
    return [unpaired_example(rec, f"{path}:{n}") for n, rec in iter_jsonl(path)]


def unpaired_example(rec, where):
    return {"prompt": as_messages(_prompt(rec, where), "user"),
            "completion": as_messages(_completion(rec, "completion", where), "assistant"),
            "label": _field(rec, "label", where, (bool,)), "where": where}


def load_prompts(path, required=()):
    """RL / evaluation prompts: {"prompt": str or [messages], ...extra fields kept as they are};
    `required`: fields every record must have (train_ppo.py: the reward function's arguments)."""
    return [prompt_example(rec, f"{path}:{n}", required) for n, rec in iter_jsonl(path)]


def prompt_example(rec, where, required=()):
    _prompt(rec, where)
    for k in required:
        if k not in rec:
            raise DataError(f"{where}: missing field {k!r}, which the reward function requires "
                            f"(it takes {', '.join(required)})")
    return rec
