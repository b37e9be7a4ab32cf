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
from dataclasses import dataclass, replace

import torch

import common
import config
import engine
import hf_io
from data import chat, task


@dataclass
class GenerateConfig:
    """Generate from, or chat with, a checkpoint through its chat template."""
    model: str = config.arg("", "HF model directory; empty = the built-in task's SFT model (runs/sft/model)")
    prompt: str = config.arg("", "the user's message; empty = stdin (at a terminal: a chat, one message per line)")
    system_prompt: str = config.arg("", "a system message first (empty = the template's own default, if it has one)")
    chat_format: str = config.arg("", "empty = the tokenizer's chat template, else a built-in format")
    chat_template_kwargs: str = config.arg("", "JSON object of chat template variables, e.g. '{\"enable_thinking\": "
                                               "false}'")
    raw: bool = config.arg(False, "the prompt as plain text: no chat template, no generation prompt")
    max_new_tokens: int = config.arg(0, "length cap of each answer; 0 = 256, or what the prompt leaves of the model's "
                                        "positions")
    temperature: float = config.arg(0.7, "0 = greedy")
    top_k: int = config.arg(0, "sample from the k most likely tokens; 0 = all")
    top_p: float = config.arg(1.0, "nucleus sampling: the smallest set of tokens with this much probability")
    seed: int = config.arg(0, "sampling seed")
    device: str = config.arg("auto", "auto = the first GPU if there is one, else the CPU; or a torch device (cuda:1, cpu)")
    dtype: str = config.arg("auto", "the weights' and KV cache's dtype: auto = bf16 on a GPU, fp32 on a CPU")
    RANGES = {"top_p": "(0, 1]"}
    CHOICES = {"chat_format": config.TrainConfig.CHOICES["chat_format"], "dtype": ("auto", "bf16", "fp32")}
    MULTI, NOT_USED, REAL_MODEL = (), {}, {}


def answer(net, tok, ids, cfg: GenerateConfig, generator):
    """The model's reply to prompt token ids, decoded up to its stop token."""
    positions = net.cfg.max_position_embeddings
    room = positions - len(ids)
    if room < 1:
        raise common.UsageError(f"the prompt's {len(ids)} tokens fill the model's {positions} positions")
    if cfg.max_new_tokens > room:
        raise common.UsageError(f"the prompt's {len(ids)} tokens + --max-new-tokens {cfg.max_new_tokens} exceed the "
                                f"model's {positions} positions")
    # the default shrinks to fit: the built-in task's model has 256 positions in all, prompt included
    cfg = replace(cfg, max_new_tokens=cfg.max_new_tokens or min(256, room))
    sampling = engine.Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    dev = generator.device
    out, mask, _ = engine.generate_ids(net, torch.tensor([ids], device=dev), torch.ones(1, len(ids), dtype=torch.long,
                                       device=dev), sampling, tok.stop_ids, tok.pad_id, generator)
    new = [t for t, keep in zip(out[0, len(ids):].tolist(), mask[0].tolist()) if keep]
    return tok.tokenizer.decode(new, skip_special_tokens=True).strip()


def main(cfg: GenerateConfig):
    model_dir = cfg.model or task.stage(task.SFT_MODEL, "model to talk to (--model)")
    if not os.path.isdir(model_dir):
        raise common.UsageError(f"--model {model_dir}: no such directory")
    tok = common.load_tokenizer(model_dir, cfg)
    try:
        device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise common.UsageError(f"--device {cfg.device}: {str(e).splitlines()[0]}") from None
    # bf16 on a CPU without native bf16 is ~70x slower than fp32 (config.TrainConfig's dtype): auto is fp32 there
    dtype = torch.bfloat16 if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda") else torch.float32
    net = hf_io.from_pretrained(model_dir, dtype=dtype, device=device).eval()
    g = torch.Generator(device).manual_seed(cfg.seed)
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
