"""Multi-turn episodes (agent.py): tool schemas as transformers builds them, the calculator, tool
errors and limits, token-exact assembly (the model's sampled ids, the template's glue, the mask
on the model's tokens only), a template that is not prefix-preserving, the KV cache kept across
turns, rollout log-probs against a fresh forward, and GAE over the model's tokens."""
import json
import os
import time
import typing

import pytest
import torch

import agent
import engine
import forward
import losses
import hf_io
from data import chat
from helpers import ROOT, run_script, series, tiny_model_dir

# a random model's turns end early on these (and long episodes need no trained model)
STOPS = "@,},0,1,2,3,4,5,6,7,8,9,a,e,i,o,u"
SHARED_SMOLLM = os.path.join(os.path.dirname(ROOT), "shared", "models", "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("agent") / "model"))


def get_weather(location: str, unit: typing.Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """Gets the current weather.

    Args:
        location: The city, e.g. "Paris"
        unit: The unit of the temperature

    Returns:
        The weather, in words
    """
    return f"sunny in {location}"


def search(query: str, limit: typing.Optional[int] = None, tags: list[str] = (), mode: str = "fast") -> dict:
    """Searches the notes.

    Args:
        query: What to look for,
            over several lines
        limit: At most this many results
        tags: Only notes with these tags
        mode: How hard to look (choices: ["fast", "thorough"])
    """
    return {}


@pytest.mark.parametrize("fn", [agent.calculator, get_weather, search])
def test_tool_schemas_equal_transformers(fn):
    transformers_utils = pytest.importorskip("transformers.utils")
    assert agent.tool_schema(fn) == transformers_utils.get_json_schema(fn)


def test_the_calculator_evaluates_arithmetic_and_never_runs_code():
    assert agent.calculator("47+85") == "132"
    assert agent.calculator(" (3 + 4) * 2 - 1 ") == "13"
    assert agent.calculator("7/2") == "3.5" and agent.calculator("8/2") == "4" and agent.calculator("-2**3") == "-8"
    for bad in ("__import__('os').system('echo hi')", "open('x')", "[1, 2]", "2**1000", "x + 1"):
        with pytest.raises((ValueError, SyntaxError)):
            agent.calculator(bad)


def fail(x: int) -> int:
    """Always fails.

    Args:
        x: Anything
    """
    raise RuntimeError(f"no luck with {x}")


def slow(x: int) -> int:
    """Takes too long.

    Args:
        x: Anything
    """
    time.sleep(30)
    return x


def call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_tool_errors_timeouts_and_malformed_calls_come_back_as_tool_messages():
    env = agent.ToolEnv([agent.calculator, fail, slow], max_tool_calls=10, timeout=0.2)
    env.reset({"prompt": "Hi"})
    assert env.step(call("calculator", expression="2*21")) == ([{"role": "tool", "name": "calculator", "content": "42"}],
                                                               False)
    t = time.time()
    cases = {call("fail", x=3): "error: RuntimeError: no luck with 3",
             call("slow", x=1): "error: the tool did not finish within 0.2 s",
             call("calculator", expression="import os"): "error: SyntaxError",
             "<tool_call>{not json</tool_call>": "error: malformed tool call",
             call("nope"): "error: malformed tool call: \"no tool named 'nope'",
             call("fail", y=1): "error: TypeError"}
    for text, message in cases.items():
        (out,), done = env.step(text)
        assert out["role"] == "tool" and out["content"].startswith(message) and not done, (text, out)
    assert time.time() - t < 5  # the sleeping tool was cut off
    assert (env.calls, env.errors) == (7, 6) and not env.answered
    assert env.step("The answer is 42.") == ([], True) and env.answered


def test_a_list_of_calls_in_one_tag_is_several_calls():
    env = agent.ToolEnv([agent.calculator])
    env.reset({"prompt": "Hi"})
    two = [{"name": "calculator", "arguments": {"expression": e}} for e in ("1+2", "3*3")]
    out, done = env.step(f"<tool_call>{json.dumps(two)}</tool_call>")
    assert [m["content"] for m in out] == ["3", "9"] and not done and env.calls == 2
    (out,), _ = env.step("<tool_call>[1]</tool_call>")
    assert out["content"].startswith("error: malformed tool call: a call is an object") and env.errors == 1


def test_max_tool_calls_is_respected():
    env = agent.ToolEnv([agent.calculator], max_tool_calls=2)
    env.reset({"prompt": "Hi"})
    assert not env.step(call("calculator", expression="1+1"))[1]
    assert not env.step(call("calculator", expression="2+2"))[1]
    assert env.step(call("calculator", expression="3+3")) == ([], True)  # a third call ends the episode...
    assert env.calls == 2 and not env.answered  # ...unanswered, and is not executed


def test_tools_are_described_in_the_system_message_unless_the_template_takes_them():
    schema = agent.tool_schema(agent.calculator)
    described = agent.ToolEnv([agent.calculator]).reset({"prompt": "What is 2+3?"})
    assert described[0]["role"] == "system" and json.dumps(schema["function"]) in described[0]["content"]
    assert "<tool_call>" in described[0]["content"] and described[1] == {"role": "user", "content": "What is 2+3?"}
    merged = agent.ToolEnv([agent.calculator]).reset({"prompt": [{"role": "system", "content": "Be brief."},
                                                                 {"role": "user", "content": "Hi"}]})
    assert len(merged) == 2 and merged[0]["content"].startswith("Be brief.\n\nYou can call these tools:")
    for env in (agent.ToolEnv([agent.calculator], in_template=True), agent.ToolEnv([agent.calculator], describe=False)):
        assert env.reset({"prompt": "Hi"}) == [{"role": "user", "content": "Hi"}]


def test_a_template_with_a_tools_variable_lays_out_the_schemas():
    qwen3 = os.path.join(os.path.dirname(ROOT), "shared", "tokenizers", "qwen3")
    if not os.path.exists(os.path.join(qwen3, "tokenizer.json")):
        pytest.skip(f"{qwen3} not present")
    tok = chat.load_tokenizer(qwen3)
    conv = agent.make_env_factory("agent:calculator", tok=tok)().reset({"prompt": "What is 2+3?"})
    assert conv == [{"role": "user", "content": "What is 2+3?"}]  # no system message of ours: the template's
    text = tok.tokenizer.decode(agent.render(conv, tok, True))
    assert "<tools>" in text and json.dumps(agent.tool_schema(agent.calculator), ensure_ascii=False) in text, text


def assemble(tok, conv, turns, results):
    """A hand-built episode as engine.run_episodes assembles it: the prompt's rendering, each turn's ids
    as sampled (its text's ids and the stop token), the glue between them."""
    seq = agent.render(conv, tok, True)
    mask = [0] * len(seq)
    for text, result in zip(turns, results):
        sampled = tok.encode(text) + [tok.stop_ids[0] if tok.chat_format != "template" else tok.eos_id]
        seq, mask = seq + sampled, mask + [1] * len(sampled)
        if result is None:
            break
        glue = agent.glue(conv, text, result, sampled[-1], tok)
        conv = conv + [{"role": "assistant", "content": text}] + result
        seq, mask = seq + glue, mask + [0] * len(glue)
    return seq, mask


def tokenizers(tiny):
    yield chat.load_tokenizer(tiny)  # the built-in "plain" format
    if os.path.exists(os.path.join(SHARED_SMOLLM, "tokenizer.json")):
        yield chat.load_tokenizer(SHARED_SMOLLM)  # SmolLM2's ChatML template with its default system prompt


def test_a_hand_built_episode_trains_exactly_the_model_tokens(tiny):
    user = [{"role": "user", "content": "What is 47+85?"}]
    tool = [{"role": "tool", "name": "calculator", "content": "132"}]
    turns = [call("calculator", expression="47+85"), "132"]
    for tok in tokenizers(tiny):
        seq, mask = assemble(tok, user, turns, [tool, None])
        # the whole conversation as the template renders it, and its assistant mask (data/chat.py's SFT rule)
        full = user + [{"role": "assistant", "content": turns[0]}] + tool + [{"role": "assistant", "content": turns[1]}]
        ids, want = chat.render_chat(full, tok)
        assert seq == ids[:len(seq)] and ids[len(seq):] in ([], tok.encode("\n")), tok.chat_format
        assert mask == want[:len(seq)], tok.chat_format
        assert tok.tokenizer.decode([t for t, m in zip(seq, mask) if m], skip_special_tokens=True) == "".join(turns)


def test_a_template_that_is_not_prefix_preserving_is_detected(tiny, tmp_path):
    # earlier assistant turns rendered without their content: re-rendering changes sampled tokens
    template = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}{{ 'Assistant: ...' + eos_token }}"
                "{% elif m.role == 'assistant' %}{{ 'Assistant: ' + m.content + eos_token }}"
                "{% else %}{{ m.role + ': ' + m.content + '\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")
    d = tmp_path / "m"
    os.makedirs(d)
    for name in ("tokenizer.json", "config.json"):
        (d / name).write_bytes(open(os.path.join(tiny, name), "rb").read())
    conf = json.load(open(os.path.join(tiny, "tokenizer_config.json")))
    (d / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": template}))
    tok = chat.load_tokenizer(str(d))
    user = [{"role": "user", "content": "What is 1+2?"}]
    with pytest.raises(ValueError, match=r"the chat template is not prefix-preserving: .* differently from token 30 "
                                         r"on \('3' became '\.\.\.tool'\)"):
        assemble(tok, user, ["3", "3"], [[{"role": "tool", "content": "ok"}], None])


class Countdown:
    def __init__(self):
        self.left = None

    def reset(self, record):
        self.left = record["turns"]
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        self.left -= 1
        return ([], True) if self.left == 0 else ([{"role": "tool", "content": f"{self.left} to go"}], False)


def test_rollout_logps_equal_a_fresh_forward_and_each_token_is_fed_once(tiny):
    """Episodes of 1-3 turns, some cut at the length cap, batched: the log-probs sampled during the
    rollout equal a fresh forward over the assembled sequences (fp32; the rollout attends over a
    cache with holes, the fresh forward over compact rows: ~1e-6 apart, 1e-4 would catch a token
    shifted by one or a wrong position), and the model reads each token once (the cache is kept:
    a re-prefill of the history at each turn would read the prompt again)."""
    net = hf_io.from_pretrained(tiny).eval()
    tok = chat.load_tokenizer(tiny)
    tok.stop_ids = sorted(set(tok.stop_ids + [tok.tokenizer.token_to_id(c) for c in "0123456789"]))  # turns end early
    fed = []
    real_forward = net.forward
    net.forward = lambda ids, mask, **kw: fed.append(int(mask[:, -ids.shape[1]:].sum())) or real_forward(ids, mask, **kw)
    records = [{"prompt": f"What is {i}+{i}?", "turns": 1 + i % 3} for i in range(8)]
    ep = engine.run_episodes(net, tok, records, Countdown, engine.Sampling(12), 4, torch.Generator().manual_seed(0))
    assert sorted(set(ep.turns)) == [1, 2, 3] and not all(ep.answered) and any(ep.answered)
    # each token read once, but an episode's very last token, unless others still sampled after it
    # (a re-prefill of the history would read every prompt, 30+ tokens, again)
    total = sum(len(s) for s in ep.seqs)
    assert total - len(records) <= sum(fed) <= total
    for s, m, p, conv in zip(ep.seqs, ep.mask, ep.prompt_len, ep.messages):
        assert s[:p] == agent.render(conv[:1], tok, True) and not any(m[:p])
    net.forward = real_forward
    samples = engine.episode_samples(ep, tok.pad_id, "cpu")

    class Dist:
        device, autocast_dtype, world = torch.device("cpu"), None, 1
    fresh = forward.completion_logps(net, samples, Dist, 256)
    assert samples.mask.sum() == sum(sum(m) for m in ep.mask)
    assert ((fresh - samples.logps) * samples.mask).abs().max() < 1e-4
    assert (samples.logps * (1 - samples.mask)).abs().max() == 0


def test_gae_steps_over_the_holes_of_a_multi_turn_mask():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 9), torch.randn(3, 9)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0, 0], [1, 0, 1, 0, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]]).float()
    adv, ret = losses.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    back = losses.discounted_returns(rewards, mask, gamma=0.9)
    for i in range(3):  # each row against its model tokens alone, compacted
        keep = mask[i].bool()
        r_, v_, ones = rewards[i, keep][None], values[i, keep][None], torch.ones(1, int(keep.sum()))
        a, r = losses.gae(r_, v_, ones, 0.9, 0.8)
        assert torch.allclose(adv[i, keep], a[0]) and torch.allclose(ret[i, keep], r[0])
        assert torch.allclose(back[i, keep], losses.discounted_returns(r_, ones, 0.9)[0])
        assert (adv[i, ~keep] == 0).all() and (back[i, ~keep] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "ppo", "rloo", "reinforce_pp", "online_dpo"])
def test_a_scripted_environment_runs_through_every_algorithm(tiny, tmp_path, algo):
    data = tmp_path / "rl.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+{i % 7}?", "answer": "0"}) + "\n" for i in range(16)))
    run_script("train_ppo.py", ["--model", tiny, "--data", data, "--env", "tests.support.envs:Countdown", "--algo", algo,
                                "--out", "o", "--max-steps", "2", "--prompts-per-step", "2", "--group-size", "4",
                                "--max-new-tokens", "8", "--beta", "0.1", "--stop-tokens", STOPS], tmp_path)
    turns, share = series(tmp_path / "o", "turns"), series(tmp_path / "o", "model_token_share")
    assert turns.keys() == {1, 2} and max(turns.values()) > 1 and 0 < min(share.values()) < 1


@pytest.mark.slow
def test_tools_run_through_train_ppo(tiny, tmp_path):
    """--tools on the built-in task (a random model: its calls are rare, but the path runs, the
    held-out evaluation runs episodes too, and the metrics are there)."""
    run_script("train_ppo.py", ["--model", tiny, "--tools", "agent:calculator", "--describe-tools", "false", "--out", "o",
                                "--max-steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8",
                                "--eval-samples", "4"], tmp_path)
    last = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert {"turns", "tool_calls", "tool_errors", "unanswered", "model_token_share"} <= set(last[1])
    assert "eval/tool_call_rate" in last[0]
