"""
Talk to a checkpoint: any nanotrl output or Hugging Face model directory, through its chat template.

    python generate.py --model runs/sft/model --prompt "What is 47+85?"      # one answer
    echo "Name a colour." | python generate.py --model DIR                   # the whole of stdin as one message
    python generate.py --model DIR                                           # at a terminal: a chat, one line per turn

--temperature 0 is greedy; --raw sends the prompt as plain text, without the chat template.
Needs torch and the tokenizer files in the model directory; nothing else (no transformers).
"""
import os
import sys
from dataclasses import dataclass

import torch

import common
import config
import model as M
from data import chat, task


@dataclass
class GenerateConfig:
    """Generate from, or chat with, a checkpoint through its chat template."""
    model: str = ""             # HF model directory; empty = the built-in task's SFT model (runs/sft/model)
    prompt: str = ""            # the user's message; empty = stdin (at a terminal: a chat, one message per line)
    system_prompt: str = ""     # a system message first (empty = the template's own default, if it has one)
    chat_format: str = ""       # empty = the tokenizer's chat template, else a built-in format
    chat_template_kwargs: str = ""  # JSON object of chat template variables, e.g. '{"enable_thinking": false}'
    raw: bool = False           # the prompt as plain text: no chat template, no generation prompt
    max_new_tokens: int = 256   # length cap of each answer
    temperature: float = 0.7    # 0 = greedy
    top_k: int = 0              # sample from the k most likely tokens; 0 = all
    top_p: float = 1.0          # nucleus sampling: the smallest set of tokens with this much probability
    seed: int = 0
    RANGES = {"max_new_tokens": "[1, inf)", "top_p": "(0, 1]"}
    CHOICES = {"chat_format": config.TrainConfig.CHOICES["chat_format"]}
    MULTI, NOT_USED, REAL_MODEL = (), {}, {}


def answer(net, tok, ids, cfg: GenerateConfig, generator):
    """The model's reply to prompt token ids, decoded up to its stop token."""
    positions = net.cfg.max_position_embeddings
    if len(ids) + cfg.max_new_tokens > positions:
        raise common.UsageError(f"the prompt's {len(ids)} tokens + --max-new-tokens {cfg.max_new_tokens} exceed the "
                                f"model's {positions} positions")
    out, mask = M.generate(net, torch.tensor([ids]), max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           top_k=cfg.top_k or None, top_p=cfg.top_p, eos_ids=tok.stop_ids, pad_id=tok.pad_id,
                           generator=generator)
    new = [t for t, keep in zip(out[0, len(ids):].tolist(), mask[0].tolist()) if keep]
    return tok.tokenizer.decode(new, skip_special_tokens=True).strip()


def main(cfg: GenerateConfig):
    model_dir = cfg.model or task.stage(task.SFT_MODEL, "model to talk to (--model)")
    if not os.path.isdir(model_dir):
        raise common.UsageError(f"--model {model_dir}: no such directory")
    tok = common.load_tokenizer(model_dir, cfg)
    net = M.from_pretrained(model_dir).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    history = []

    def reply(text):
        if cfg.raw:
            return answer(net, tok, ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(text), cfg, g)
        history.append({"role": "user", "content": text})
        ids = chat.tokenize_prompt({"prompt": history, "where": "the chat"}, tok, 10**9)
        history.append({"role": "assistant", "content": answer(net, tok, ids, cfg, g)})
        return history[-1]["content"]

    if cfg.prompt or not sys.stdin.isatty():
        print(reply(cfg.prompt or sys.stdin.read().strip()))
        return
    print(f"chatting with {model_dir} (an empty line or Ctrl-D ends)", file=sys.stderr)
    try:
        for line in iter(lambda: input("> "), ""):
            print(reply(line), flush=True)
    except EOFError:
        print(file=sys.stderr)


if __name__ == "__main__":
    common.run(main, GenerateConfig)
