"""Generate with and without the KV cache on a Gravity-2-layout architecture (9 query / 3 KV heads,
head_dim 64): in-process, and through a plain-transformers reload of a pruned export.

The model is scaled so that attention is sharp: a cache that is never updated (what the model did when
transformers renamed the attention module's cache argument) changes the greedy tokens, and the tests check
that first, so they can see the bug they guard against.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import tiny_model
from transformers import DynamicCache

from gravity_sparse import save_model
from gravity_sparse.model.masks import Masks
from gravity_sparse.model.modeling_gravity import cache_kwarg
from gravity_sparse.model.tokenizer import build_tokenizer
from gravity_sparse.stages.s5_export.export import prune_model

PROMPT_LEN, NEW_TOKENS = 9, 14


class ForgetfulCache(DynamicCache):
    """A cache that stores nothing: every step sees only its own keys (the bug these tests catch)."""

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states


def gqa_model():
    """Random gravity model, Gravity-2 layout: 9 q / 3 kv heads, head_dim 64, sharp attention."""
    model = tiny_model(
        seed=11,
        hidden_size=96,
        intermediate_size=192,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(
            4.0
        )  # confident next-token choices: greedy runs are not all one token
    return model


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy(model, x: torch.Tensor, steps: int, cache) -> torch.Tensor:
    """Greedy decoding step by step through `cache` (one forward per new token)."""
    out = model(x, use_cache=True, **cache_kwarg(cache))
    seq = x
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        seq = torch.cat([seq, nxt], dim=1)
        out = model(nxt, use_cache=True, **cache_kwarg(cache))
    return seq


@torch.no_grad()
def generate(model, x: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(
        x, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=use_cache, pad_token_id=258
    )


def test_model_is_sharp_enough_that_a_forgetful_cache_changes_the_tokens():
    model = gqa_model()
    x = prompt()
    uncached = generate(model, x, use_cache=False)
    assert len(set(uncached[:, PROMPT_LEN:].flatten().tolist())) > 3  # not one repeated token
    forgetful = greedy(model, x, NEW_TOKENS, ForgetfulCache(config=model.config))
    assert not torch.equal(forgetful, uncached)


def test_cached_generate_equals_uncached_gqa():
    model = gqa_model()
    x = prompt(1)
    uncached = generate(model, x, use_cache=False)
    assert torch.equal(generate(model, x, use_cache=True), uncached)
    assert torch.equal(greedy(model, x, NEW_TOKENS, DynamicCache(config=model.config)), uncached)


def test_cached_step_logits_equal_full_forward_gqa():
    model = gqa_model()
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(x).logits
        model(x[:, :12], use_cache=True, **cache_kwarg(cache))
        steps = [
            model(x[:, i : i + 1], use_cache=True, **cache_kwarg(cache)).logits
            for i in range(12, 20)
        ]
    assert cache.get_seq_length() == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 12:], rtol=1e-4, atol=1e-4)


def _gqa_masks() -> Masks:
    """Head 4 of layer 0 and heads 0–2 (one whole KV group) of layer 1 dropped; some far blocks dropped."""
    layers, heads, nb, block = 2, 9, 4, 8
    head_keep = torch.ones(layers, heads, dtype=torch.bool)
    head_keep[0, 4] = False
    head_keep[1, :3] = False
    grid = torch.ones(layers, heads, nb, nb, dtype=torch.bool).tril()
    grid[:, ::2, 3, 0] = False
    grid[:, 1::3, 2, 0] = False
    return Masks(head_keep, grid & head_keep[..., None, None], block, nb * block)


PLAIN = textwrap.dedent("""
    import json, sys
    sys.modules["gravity_sparse"] = None  # plain transformers only
    import inspect, torch
    from transformers import AutoModelForCausalLM, DynamicCache
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    x = torch.tensor(json.loads(sys.argv[2]))
    kw = dict(max_new_tokens=int(sys.argv[3]), do_sample=False, pad_token_id=258)
    name = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = m.generate(x, use_cache=True, return_dict_in_generate=True, **kw)
        cached = out.sequences
        cache_type = type(out.get("cache", out.get("past_key_values"))).__name__
        uncached = m.generate(x, use_cache=False, **kw)
        full = m(cached).logits
        cache = DynamicCache(config=m.config)
        m(cached[:, :12], use_cache=True, **{name: cache})
        steps = torch.cat([m(cached[:, i:i + 1], use_cache=True, **{name: cache}).logits
                           for i in range(12, cached.shape[1])], dim=1)
    print(json.dumps({"cached": cached.tolist(), "uncached": uncached.tolist(),
                      "step_diff": (steps - full[:, 12:]).abs().max().item(),
                      "heads": [a.self_attn.num_heads for a in m.model.layers],
                      "cache": cache_type}))
""")


@pytest.mark.slow
def test_export_reloaded_in_plain_transformers_generates_the_same_with_and_without_cache(tmp_path):
    model = gqa_model()
    masks = _gqa_masks()
    pruned = prune_model(model, masks)
    out = save_model(pruned, build_tokenizer(), tmp_path / "export")
    x = prompt(3)
    in_process = generate(pruned, x, use_cache=False)
    assert torch.equal(generate(pruned, x, use_cache=True), in_process)
    # the pruning is visible: the dense model writes something else
    assert not torch.equal(generate(model, x, use_cache=False), in_process)
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN, str(out), json.dumps(x.tolist()), str(NEW_TOKENS)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["heads"] == [8, 6]
    assert res["cache"] == "GravityBlockCache"  # the export frees the blocks no query reads
    assert res["cached"] == res["uncached"] == in_process.tolist()
    assert res["step_diff"] < 1e-4
