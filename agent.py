"""
Multi-turn episodes for RL: the model acts over several turns, calls tools or talks to an
environment, and each episode becomes one token sequence with a mask on the model's own tokens.

An environment (`--env module:Class`, built once per episode with no arguments) has

    reset(record) -> messages             the conversation before the model's first turn
    step(text) -> (new_messages, done)    the model's turn, decoded -> what comes back, and whether
                                          the episode is over
    reward(messages, record) -> float     optional: the episode's score (else --reward-fn's)

`ToolEnv` is the built-in one: tools are Python functions with type hints and a docstring (their
JSON schema is built as transformers' get_json_schema builds it), the model calls them as

    <tool_call>{"name": "calculator", "arguments": {"expression": "47+85"}}</tool_call>

(Qwen2.5's, Qwen3's and Hermes' format), each call runs under a time limit, and its result, or the
error's message, comes back as a {"role": "tool"} message. A turn without a call is the answer.

How an episode becomes tokens (engine.run_episodes decodes it; this module has no decoder):

    prompt                   turn 1             glue                           turn 2
    [reset() messages +      [sampled ids,      [rest of the rendered          [sampled ids,
     generation prompt]       mask 1, up to      assistant turn, tool           mask 1]
                              the stop token]    messages, generation prompt]
    mask 0                                       mask 0

The model's turns are the sampled ids themselves (never decoded and re-encoded); the glue is cut
from the chat template's rendering of the grown conversation, which must extend the rendering so
far (a template that re-renders earlier turns differently stops the run with the position).
Every episode keeps its KV cache across turns: the glue is prefilled after the cached tokens.
Security: tools run the user's code; the model's text is only ever data (the calculator parses it).
"""
import ast
import importlib
import inspect
import json
import operator
import re
import signal
import types
import typing

from data import chat

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


# ----------------------------------------------------------------------------- tools

def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression and returns the result.

    Args:
        expression: The expression, with numbers, + - * / // % ** and parentheses, e.g. "47+85"
    """
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.USub: operator.neg, ast.UAdd: operator.pos}

    def ev(node):  # the parsed expression, walked: model text is data, never code
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > 100:
                raise ValueError("exponent too large")
            return ops[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    value = ev(ast.parse(str(expression).strip(), mode="eval").body)
    return str(int(value)) if isinstance(value, float) and value.is_integer() and abs(value) < 2**53 else str(value)


JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null",
              list: "array", tuple: "array", dict: "object", typing.Any: None}


def _type_schema(hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        subs = [_type_schema(a) for a in args if a is not type(None)]
        out = subs[0] if len(subs) == 1 else {"type": sorted({s["type"] for s in subs})} \
            if all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subs) else {"anyOf": subs}
        return {**out, "nullable": True} if type(None) in args else out
    if origin is typing.Literal:
        kinds = list(dict.fromkeys(JSON_TYPES[type(a)] for a in args))
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": list(args)}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object", **({"additionalProperties": _type_schema(args[1])} if len(args) == 2 else {})}
    if hint not in JSON_TYPES:
        raise ValueError(f"type hint {hint!r}: a tool takes int, float, str, bool, list, dict, Optional, Literal")
    return {} if JSON_TYPES[hint] is None else {"type": JSON_TYPES[hint]}


def tool_schema(fn) -> dict:
    """The tool's JSON schema, as transformers.utils.get_json_schema builds it: the docstring's
    first part is the description, its Args: section each parameter's, a Returns: section the return's."""
    doc = inspect.getdoc(fn)
    if not doc:
        raise ValueError(f"tool {fn.__name__}: no docstring (its description and Args: section are the schema)")
    description = re.search(r"^(.*?)[\n\s]*(Args:|Returns:|Raises:|\Z)", doc, re.DOTALL).group(1).strip()
    args_block = re.search(r"\n\s*Args:\n(.*?)[\n\s]*(Returns:|Raises:|\Z)", doc, re.DOTALL)
    returns = re.search(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(Raises:|\Z)", doc, re.DOTALL)
    described = {}
    if args_block:
        lines = "\n".join(line for line in args_block.group(1).split("\n") if line.strip())
        for m in re.finditer(r"(?:^|\n)([ \t]*)(\w+)(?:[ \t]*\([^()\n]*\))?:\s*(.*?)\s*"
                             r"(?=\n(?!\1[ \t])[ \t]*\w+(?:[ \t]*\([^()\n]*\))?:|\Z)", lines, re.DOTALL):
            described[m.group(2)] = re.sub(r"\s*\n+\s*", " ", m.group(3).strip())
    hints, params = typing.get_type_hints(fn), inspect.signature(fn).parameters
    properties, required = {}, [n for n, p in params.items() if p.default is p.empty]
    for name in params:
        if name not in hints:
            raise ValueError(f"tool {fn.__name__}: argument {name} has no type hint")
        if name not in described:
            raise ValueError(f"tool {fn.__name__}: the docstring's Args: section does not describe {name}")
        schema, desc = _type_schema(hints[name]), described[name]
        if choices := re.search(r"\(choices:\s*(.*?)\)\s*$", desc, re.IGNORECASE):
            schema["enum"], desc = json.loads(choices.group(1)), desc[:choices.start()].strip()
        properties[name] = {**schema, "description": desc}
    parameters = {"type": "object", "properties": properties, **({"required": required} if required else {})}
    out = {"name": fn.__name__, "description": description, "parameters": parameters}
    if "return" in hints:
        try:
            out["return"] = _type_schema(hints["return"])
            if returns:
                out["return"]["description"] = returns.group(1).strip()
        except ValueError:
            pass
    return {"type": "function", "function": out}


def load_object(spec, flag):
    """module:name -> the object; a mistake is a ValueError naming the flag."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{flag} {spec!r}: expected module:name, e.g. agent:calculator")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{flag} {spec}: cannot be loaded ({e})") from None


class _Timeout(Exception):
    pass


def call_tool(fn, arguments, timeout):
    """(result text, error?) of one call. An exception or running past `timeout` seconds is the
    model's problem to read, not a crash: its message comes back as the result. The limit is a
    SIGALRM timer (the main thread only; a tool blocked inside C code is not interrupted)."""
    def expire(*_):
        raise _Timeout()
    timed = timeout > 0 and hasattr(signal, "setitimer")
    if timed:
        old = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return str(fn(**arguments)), False
    except _Timeout:
        return f"error: the tool did not finish within {timeout:g} s", True
    except Exception as e:  # the tool's own failure, reported to the model
        return f"error: {type(e).__name__}: {e}", True
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def tool_prompt(schemas):
    """The system-prompt description of the tools, for a template without a `tools` variable."""
    return ("You can call these tools:\n" + "\n".join(json.dumps(s["function"]) for s in schemas) +
            '\nTo call one, write <tool_call>{"name": <tool name>, "arguments": {<argument>: <value>}}</tool_call> '
            "and wait for its result. When you know the answer, write it without a tool call.")


class ToolEnv:
    """The built-in environment: the record's prompt, then tool calls executed until a turn has none."""

    def __init__(self, tools, max_tool_calls=4, timeout=5.0, in_template=False, describe=True):
        self.tools = {fn.__name__: fn for fn in tools}
        self.schemas = [tool_schema(fn) for fn in tools]
        self.max_tool_calls, self.timeout = max_tool_calls, timeout
        self.in_template, self.describe = in_template, describe
        self.calls = self.errors = 0
        self.answered = False

    def reset(self, record):
        prompt = record["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if self.describe and not self.in_template:  # the tools described in the system message instead
            if messages[0]["role"] == "system":
                messages[0]["content"] = messages[0]["content"] + "\n\n" + tool_prompt(self.schemas)
            else:
                messages.insert(0, {"role": "system", "content": tool_prompt(self.schemas)})
        return messages

    def step(self, text):
        calls = []
        for raw in TOOL_CALL.findall(text):  # a JSON list inside one tag is several calls (SmolLM2's form)
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw  # malformed: reported below
            calls += parsed if isinstance(parsed, list) and parsed else [parsed]
        if not calls:
            self.answered = True
            return [], True
        if self.calls + len(calls) > self.max_tool_calls:  # over --max-tool-calls: the episode ends unanswered
            return [], True
        out = []
        for call in calls:
            self.calls += 1
            try:
                if isinstance(call, str):
                    json.loads(call)  # raises: the JSON error is the message
                if not isinstance(call, dict):
                    raise TypeError(f"a call is an object {{\"name\": ..., \"arguments\": {{...}}}}, not {call!r:.40}")
                name, arguments = call["name"], call.get("arguments", {})
                if isinstance(arguments, str):
                    arguments = json.loads(arguments)
                if name not in self.tools:
                    raise KeyError(f"no tool named {name!r}; the tools are {sorted(self.tools)}")
                if not isinstance(arguments, dict):
                    raise TypeError("arguments must be a JSON object")
            except (ValueError, KeyError, TypeError) as e:  # a malformed call is a mistake to read
                self.errors += 1
                out.append({"role": "tool", "content": f"error: malformed tool call: {e}"})
                continue
            result, failed = call_tool(self.tools[name], arguments, self.timeout)
            self.errors += failed
            out.append({"role": "tool", "name": name, "content": result})
        return out, False


# ----------------------------------------------------------------------------- rendering episodes

def render(messages, tok, add_generation_prompt):
    return chat.render_chat(messages, tok, add_generation_prompt)[0]


def glue(conv, text, new_messages, stop_id, tok):
    """The tokens after a sampled turn that ended with `stop_id`: the rest of the rendered assistant
    turn, the new messages and the next generation prompt, from the template's rendering. Checks
    the rendering only grows (else ValueError naming the first differing token)."""
    before = render(conv, tok, True)
    with_turn = render(conv + [{"role": "assistant", "content": text}], tok, False)
    after = render(conv + [{"role": "assistant", "content": text}] + new_messages, tok, True)
    for a, b, what in ((before, with_turn, "the model's turn"), (with_turn, after, "the tool/environment messages")):
        if b[:len(a)] != a:
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            name = "the chat template" if tok.chat_format == "template" else f"chat format {tok.chat_format!r}"
            raise ValueError(f"{name} is not prefix-preserving: after {what} are added, the conversation renders "
                             f"differently from token {k} on ({tok.tokenizer.decode(a[k:k + 8])!r} became "
                             f"{tok.tokenizer.decode(b[k:k + 8])!r}), so the sampled tokens would not be what is trained")
    turn = with_turn[len(before):]
    end = turn.index(stop_id) + 1 if stop_id in turn else len(turn)
    return turn[end:] + after[len(with_turn):]


# ----------------------------------------------------------------------------- metrics

def episode_metrics(ep, samples) -> dict:
    """Per-episode means: turns, tool calls and errors, episodes without an answer, and the share
    of the tokens after the prompt that the model wrote."""
    after = samples.attn[:, samples.prompt_len:].sum()
    return {"turns": sum(ep.turns) / len(ep.turns),
            "tool_calls": sum(getattr(e, "calls", 0) for e in ep.envs) / len(ep.envs),
            "tool_errors": sum(getattr(e, "errors", 0) for e in ep.envs) / len(ep.envs),
            "unanswered": 1 - sum(ep.answered) / len(ep.answered),
            "model_token_share": (samples.mask.sum() / after.clamp(min=1)).item()}


def make_env_factory(tools="", env="", max_tool_calls=4, timeout=5.0, tok=None, describe=True):
    """--tools module:fn,... or --env module:Class -> a function making one environment per
    episode (None for single-turn RL); a mistake is a ValueError naming the flag."""
    if tools and env:
        raise ValueError("--tools and --env: give one (tools are an environment: agent.ToolEnv)")
    if env:
        cls = load_object(env, "--env")
        for method in ("reset", "step"):
            if not callable(getattr(cls, method, None)):
                raise ValueError(f"--env {env}: an environment needs reset(record) and step(text) methods")
        return cls
    if not tools:
        return None
    fns = [load_object(s, "--tools") for s in tools.split(",") if s]
    schemas = [tool_schema(fn) for fn in fns]  # raises on a tool without type hints or Args: lines
    in_template = tok.chat_format == "template" and "tools" in (tok.chat_template or "")
    if in_template:  # the template lays the tools out itself, in its own words
        tok.template_kwargs["tools"] = schemas
    return lambda: ToolEnv(fns, max_tool_calls, timeout, in_template, describe)
