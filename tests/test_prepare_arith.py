"""data/prepare_arith.py: the fixed splits the SmolLM2 recipes train and evaluate on, and the reward."""

import agent
from data import formats, prepare_arith


def _question(rec):
    return rec["prompt"][-1]["content"]


def test_one_digit_split_is_fixed_and_disjoint():
    train, test = prepare_arith.split()
    assert (len(train), len(test)) == (100, 100)
    assert not {_question(r) for r in train} & {_question(r) for r in test}
    assert sum(r["op"] == "+" for r in test) == sum(r["op"] == "*" for r in test) == prepare_arith.N_TEST
    assert prepare_arith.split() == (train, test)  # no training seed reaches it


def test_reward_reads_the_first_integer():
    assert prepare_arith.reward(None, ["The answer is 8.", "3+5 = 8", "eight", "-3"], ["8", "8", "8", "-3"]) == \
        [1.0, 0.0, 0.0, 1.0]


def test_two_digit_tool_split(tmp_path):
    prepare_arith.main(str(tmp_path), tools=True)
    train, test, plain = (formats.load_prompts(str(tmp_path / f)) for f in ("train.jsonl", "test.jsonl", "plain.jsonl"))
    assert (len(train), len(test), len(plain)) == (256, 64, 64)
    asked = [_question(r) for r in train + test]
    assert len(set(asked)) == len(asked) and "What is 12+34?" not in asked  # distinct, never the example's
    for rec in train + test:
        assert rec["prompt"][:-1] == prepare_arith.TOOL_EXAMPLE
        a, b = map(int, _question(rec)[len("What is "):-1].split("+"))
        assert 10 <= a <= 99 and 10 <= b <= 99 and rec["answer"] == str(a + b)
    assert [r["prompt"] for r in plain] == [r["prompt"][-1:] for r in test]  # the same questions, alone
    assert [r["answer"] for r in plain] == [r["answer"] for r in test]


def test_the_example_is_a_call_the_tool_env_runs():
    """The in-context example's call is well-formed: the built-in ToolEnv executes it to its result."""
    env = agent.ToolEnv([agent.calculator], max_tool_calls=1, describe=False)
    env.reset({"prompt": "What is 12+34?"})
    out, done = env.step(prepare_arith.TOOL_EXAMPLE[1]["content"])
    assert not done and out == [{"role": "tool", "name": "calculator", "content": prepare_arith.TOOL_EXAMPLE[2]["content"]}]
