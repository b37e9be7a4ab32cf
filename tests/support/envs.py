"""Scripted environments for the multi-turn tests (agent.py's protocol): deterministic, whatever
the model says, so that episodes of different lengths run through every RL algorithm."""


class Countdown:
    """An episode of 1-3 model turns (by the prompt's length); each turn but the last gets a tool
    message back. The score is deterministic in what the model wrote, so it has spread."""

    def reset(self, record):
        self.left = 1 + len(record["prompt"]) % 3
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        self.left -= 1
        if self.left == 0:
            return [], True
        return [{"role": "tool", "content": f"{self.left} more"}], False

    def reward(self, messages, record):
        said = "".join(m["content"] for m in messages if m["role"] == "assistant")
        return sum(c.isdigit() for c in said) / max(len(said), 1)


def scalar_reward(prompts, completions, **_):
    """A --reward-fn that returns one number instead of one per completion (the user's mistake)."""
    return 1.0
