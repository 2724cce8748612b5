"""Validation loss / perplexity / bits per byte, and expert routing by domain.

Bits per byte. The val split is tokenized as one stream with an EOS after every document (the loader's
format), and evaluated in windows of seq_len+1 at stride seq_len. The mean cross-entropy per predicted
token (nats) times the stream's tokens per byte, len(val_tokens) / val_bytes, divided by ln 2 gives bits per
UTF-8 byte of text. The EOS tokens are counted on both sides consistently: they are predicted (their cost is
in the loss) and counted in len(val_tokens), while the byte count is the text's alone, so the EOS cost is
charged to the text, as it must be (a model has to say where a document ends). When `max_batches` limits
the evaluation to a prefix of the windows, the ratio tokens/bytes of the whole split is still used.

Rejected: bpb from the tokenizer's average bytes per token on a sample (drifts with the sample); excluding
EOS targets (the loss would no longer be the stream's cross-entropy).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data import eval_batches


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None,
             device: torch.device, num_bytes: int, autocast=None) -> dict:
    """{"val_loss", "val_ppl", "val_bpb", "val_tokens"} of `model` on the token stream `tokens`."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for x, y in eval_batches(tokens, seq_len, batch_size, max_batches, device=device):
        with autocast or contextlib.nullcontext():
            logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        total += loss.double().cpu()
        count += y.numel()
    model.train(was_training)
    val_loss = float(total / count)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)),
            "val_bpb": val_loss * len(tokens) / (math.log(2) * num_bytes), "val_tokens": count}


@torch.no_grad()
def expert_routing_by_domain(model, corpus, tokenizer, seq_len: int, max_tokens_per_domain: int,
                             device: torch.device, split: str = "val") -> dict:
    """{domain: (n_moe_layers, E) fraction of routed (token, slot) pairs per expert} over `split` documents.

    Each domain's documents are tokenized as a stream (EOS after each) and fed in windows of seq_len,
    at most max_tokens_per_domain tokens per domain. Only the main model's MoE layers are counted.
    """
    model.eval()
    by_domain: dict[str, list[str]] = {}
    for doc in corpus.docs(split):
        by_domain.setdefault(doc.domain, []).append(doc.text)
    out = {}
    for domain, texts in sorted(by_domain.items()):
        ids: list[int] = []
        for enc in tokenizer.encode_batch(texts):
            ids.extend(enc + [tokenizer.eos_id])
            if len(ids) >= max_tokens_per_domain:
                break
        ids = ids[:max_tokens_per_domain]
        n = len(ids) // seq_len
        if n == 0:
            continue
        x = torch.tensor(ids[: n * seq_len], device=device).view(n, seq_len)  # (n, T)
        load = None
        for chunk in x.split(8):
            out_ = model(chunk, return_output=True)
            if out_.expert_load is None:
                raise ValueError("this model has no MoE layers: nothing to plot")
            load = out_.expert_load if load is None else load + out_.expert_load  # (n_moe, E)
        out[domain] = (load / load.sum(-1, keepdim=True)).cpu()
    return out
