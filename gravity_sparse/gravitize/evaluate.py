"""What gravitize measures on the models it converts: held-out losses on the same tokens, greedy samples.

Losses are nats/token of the source's own tokenizer, on texts no stage trains, calibrates or distils on
(by default the pydoc "heldout" split and the stdlib "docstrings"), so the dot-product original and the
gravity model are compared on identical tokens. Samples are greedy continuations of instruct prompts,
through the tokenizer's chat template when it has one.
"""

from __future__ import annotations

from typing import Any

import torch

PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Explain what a Python list is in two sentences.",
)


def eval_text_names(spec: str) -> list[str]:
    """The comma-separated text names of `eval_texts` (corpus splits, "docstrings" or files)."""
    return [name.strip() for name in spec.split(",") if name.strip()]


def heldout_losses(
    models: dict[str, torch.nn.Module], tokenizer, texts: list[str], seq_len: int, max_tokens: int
) -> dict[str, dict[str, Any]]:
    """{text: {"tokens": n, <model name>: nats/token}} for every model on the same windows of each text."""
    from ..model.data import encode_text, eval_loss, resolve_text

    out: dict[str, dict[str, Any]] = {}
    for text in texts:
        ids = encode_text(tokenizer, resolve_text(text))
        row: dict[str, Any] = {}
        for name, model in models.items():
            row[name], row["tokens"] = eval_loss(model, ids, seq_len, 2, max_tokens)
        out[text] = row
    return out


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, n) ids of an instruct prompt: the chat template with the assistant turn opened, if any."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=False
        )
        return torch.tensor([list(ids)], dtype=torch.long)
    return torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def greedy_samples(
    models: dict[str, torch.nn.Module], tokenizer, prompts=PROMPTS, max_new_tokens: int = 40
) -> list[dict[str, str]]:
    """[{"prompt", <model name>: continuation}] — greedy, with the cache, stopping at end of sequence."""
    rows = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        row = {"prompt": prompt}
        for name, model in models.items():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            row[name] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        rows.append(row)
    return rows
