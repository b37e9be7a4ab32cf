"""The one generation engine (engine.py): the same tokens as the two decoders it replaced (a
fixture recorded with them, commit 0620b05), and sampling log-probs equal to a fresh forward over
the same tokens, single-turn and multi-turn."""
import json
import os

import pytest
import torch

import agent
import engine
import forward
import hf_io
from data import chat, task
from envs import Countdown
from helpers import ROOT, tiny_model_dir

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "episodes_before_engine.json")


class Dist:
    device, autocast_dtype, world, rank = torch.device("cpu"), None, 1, 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("engine") / "model"), seed=0, layers=2)


def tokenizer(tiny, stops=""):
    tok = chat.load_tokenizer(tiny)
    if stops:  # a random model's turns end early on these
        tok.stop_ids = sorted(set(tok.stop_ids + [tok.tokenizer.token_to_id(c) for c in stops]))
    return tok


def episodes(net, tok, name, seed):
    """The fixture's episodes: 12 records of the built-in task, through a scripted environment of
    1-3 turns (Countdown) or the calculator's ToolEnv, 10 new tokens a turn, at temperature 1."""
    make = Countdown if name == "countdown" else agent.make_env_factory("agent:calculator", tok=tok)
    records = [dict(r) for r in task.examples(64, 8)[0][seed * 12:(seed + 1) * 12]]
    return engine.Engine(net, tok, Dist).episodes(records, make, engine.Sampling(10), 4,
                                                  torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,seed", [("countdown", 0), ("countdown", 1), ("calculator", 0), ("calculator", 1)])
def test_episodes_are_the_tokens_and_masks_the_old_decoder_sampled(tiny, name, seed):
    want = json.load(open(FIXTURE))[f"{name}/{seed}"]
    net = hf_io.from_pretrained(tiny).eval()
    ep = episodes(net, tokenizer(tiny, "0123456789" if name == "countdown" else ""), name, seed).episodes
    assert ep.seqs == want["seqs"] and ep.mask == want["mask"] and ep.turns == want["turns"]
    assert ep.answered == want["answered"]
    if name == "countdown":
        assert max(ep.turns) > 1  # several turns: the glue was prefilled into the kept cache


@pytest.mark.parametrize("seed", [0, 1])
def test_single_turn_samples_are_the_tokens_the_old_decoder_sampled(tiny, seed):
    want = json.load(open(FIXTURE))[f"single/{seed}"]
    net, tok = hf_io.from_pretrained(tiny).eval(), chat.load_tokenizer(tiny)
    prompts = [chat.tokenize_prompt(r, tok, 10**9) for r in task.examples(64, 8)[0][:8] for _ in range(2)]
    s = engine.Engine(net, tok, Dist).generate(prompts, engine.Sampling(12), torch.Generator().manual_seed(seed), 2)
    assert s.seqs.tolist() == want["seqs"] and s.mask.tolist() == want["mask"]


def test_sampling_logps_equal_a_fresh_forward(tiny):
    """fp32: the engine's log-probs (a cache with holes, packed prefill, last position only)
    against completion_logps over the assembled rows. ~1e-6 apart; 1e-5 would catch a token off
    by one position, a wrong position id or a temperature applied twice."""
    net = hf_io.from_pretrained(tiny).eval()
    tok = tokenizer(tiny, "0123456789")
    prompts = [chat.tokenize_prompt(r, tok, 10**9) for r in task.examples(64, 8)[0][:8] for _ in range(2)]
    for temperature, group in ((1.0, 1), (0.7, 2), (0.0, 1)):
        s = engine.Engine(net, tok, Dist).generate(prompts, engine.Sampling(12, temperature, top_k=20),
                                                   torch.Generator().manual_seed(1), group)
        fresh = forward.completion_logps(net, s, Dist, 256, temperature)
        assert s.mask.sum() > 8 and (s.logps * (1 - s.mask)).abs().max() == 0
        assert ((fresh - s.logps) * s.mask).abs().max() < 1e-5, temperature
    for seed in (0, 1):
        s = episodes(net, tok, "countdown", seed)
        fresh = forward.completion_logps(net, s, Dist, 256, 1.0)
        assert max(s.episodes.turns) > 1 and (s.logps * (1 - s.mask)).abs().max() == 0
        assert ((fresh - s.logps) * s.mask).abs().max() < 1e-5


@pytest.mark.parametrize("every", [1, 4])
def test_reading_done_less_often_gives_the_same_samples(tiny, monkeypatch, every):
    """On a GPU the sampling loop reads `done` every DONE_CHECK_EVERY tokens (a read waits for the
    device); the steps it runs past the last live one are holes, dropped: single-turn samples are
    the same tokens, masks and log-probs."""
    net, tok = hf_io.from_pretrained(tiny).eval(), tokenizer(tiny, "0123456789")
    prompts = [chat.tokenize_prompt(r, tok, 10**9) for r in task.examples(64, 8)[0][:6]]
    runs = []
    for n in (1, every):
        monkeypatch.setitem(engine.DONE_CHECK_EVERY, "cpu", n)
        runs.append(engine.Engine(net, tok, Dist).generate(prompts, engine.Sampling(12), torch.Generator().manual_seed(2)))
    a, b = runs
    assert a.seqs.shape[1] < 12 + a.prompt_len  # every row stopped early: the loop ended before the cap
    assert torch.equal(a.seqs, b.seqs) and torch.equal(a.mask, b.mask) and torch.equal(a.logps, b.logps)
