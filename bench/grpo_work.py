"""The work both GRPO benchmarks do (bench/grpo_step.py: ours; bench/grpo_step_trl.py: TRL): the
same prompts, the same reward function and the same settings. The dtype follows the device as the
training scripts' --dtype auto does: fp32 on a CPU, bf16 autocast on a GPU (TRL's bench runs on the
CPU only, in fp32)."""

PROMPTS = [  # one user turn each; the chat template adds SmolLM2's default system prompt
    "What is the capital of France?", "Name three fruits.", "Write a haiku about the sea.",
    "Why is the sky blue?", "Give me a word that rhymes with cat.", "What is 12 times 7?",
    "Describe a cat in one sentence.", "Tell me a fun fact about space.",
]
SETTINGS = dict(prompts_per_step=8, group_size=8, max_new_tokens=24, beta=0.0, ppo_epochs=1, minibatches=1,
                temperature=1.0, lr=1e-6, clip_eps=0.2, loss_agg="dapo", grad_ckpt=False, dtype="auto",
                every_completion_max_new_tokens=True)  # EOS suppressed: 64 x 24 completion tokens on both sides


def reward(prompts, completions, **_):
    """Distinct words / 10: a stand-in for a verifier, cheap next to the model. A completion is a
    string (ours) or a list of messages (TRL's conversational format)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [len(set(t.split())) / 10 for t in texts]
