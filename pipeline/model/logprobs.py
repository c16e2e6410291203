"""Per-sequence log-probs of responses given prompts.

Only response tokens count (prompt tokens and padding are masked out). The language-model head
runs only on the hidden states that predict a response token, so the full ``[B, T, V]`` logits
tensor over prompt and padding positions is never materialised.

Training, the reference stage and evaluation's held-out log-probs all compute under
:func:`autocast`, so ``lp − ref`` measures learning, not a difference of precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import polars as pl


# Devices on which ``train.bf16`` turns bf16 autocast on. Not CPUs: most have no native bf16 and run
# it slower than fp32 (README "Sampling"); tests add "cpu" to run the bf16 path there.
BF16_AUTOCAST_DEVICES = frozenset({"cuda"})


def uses_bf16_autocast(device, bf16: bool) -> bool:
    """Whether log-probs on ``device`` are computed under bf16 autocast with ``train.bf16 = bf16``."""
    return bool(bf16) and torch.device(device).type in BF16_AUTOCAST_DEVICES


def autocast(device, bf16: bool):
    """The precision of the policy's and the reference's log-probs: bf16 autocast when
    :func:`uses_bf16_autocast`, else none (the model's own dtype, fp32 by default). One choice for
    training, the reference stage and evaluation: SmolLM2-135M's bf16 and fp32 log-probs differ by
    0.2 nats per sequence on average (up to 0.86), which would read as learning before any step."""
    if uses_bf16_autocast(device, bf16):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a user turn plus the assistant header, via the model's chat template."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                            add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt + "\n", add_special_tokens=True)["input_ids"]


def encode_response(tokenizer, text: str) -> list[int]:
    """Token ids of a response written as text (e.g. a gold solution), ending with EOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
            max_length: int | None = None):
    """Right-padded ``input_ids``, ``attention_mask`` and a mask of response-token positions.

    Sequences longer than ``max_length`` lose prompt tokens from the left first (the response is
    what the loss is about), then response tokens from the right.
    """
    seqs, resp_lens = [], []
    for p, r in zip(prompts, responses):
        p, r = list(p), list(r)
        if max_length is not None and len(p) + len(r) > max_length:
            keep_p = max(max_length - len(r), min(len(p), max_length // 4))
            p = p[len(p) - keep_p:] if keep_p else []
            r = r[: max_length - len(p)]
        seqs.append(p + r)
        resp_lens.append(len(r))
    T = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    response = torch.zeros((B, T), dtype=torch.bool)
    for i, (s, rl) in enumerate(zip(seqs, resp_lens)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
        response[i, len(s) - rl: len(s)] = True
    return input_ids, attention, response


def _head(model):
    return model.get_output_embeddings()


def _body(model):
    return model.get_decoder()


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the response tokens of each row, and the number of response tokens.

    Differentiable (used by training) and batched; returns float32 tensors of shape ``[B]``.
    """
    hidden = _body(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return logprobs_from_hidden(model, hidden, input_ids, response_mask, chunk)


def logprobs_from_hidden(model, hidden: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                         chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logprobs` from the last-layer hidden states ``[B, T, d]`` of the same batch."""
    # Position t predicts token t+1: a response token at t+1 is scored from hidden state t.
    target_mask = response_mask[:, 1:]
    rows = target_mask.nonzero(as_tuple=True)[0]
    h = hidden[:, :-1][target_mask]
    targets = input_ids[:, 1:][target_mask]
    head = _head(model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    token_lp = []
    for s in range(0, h.shape[0], chunk):  # bound the [N, V] logits the head produces at once
        logits = head(h[s: s + chunk]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        lp = logits.gather(-1, targets[s: s + chunk, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        token_lp.append(lp)
    token_lp = torch.cat(token_lp) if token_lp else hidden.new_zeros(0, dtype=torch.float32)
    B = input_ids.shape[0]
    sums = torch.zeros(B, dtype=torch.float32, device=input_ids.device).index_add(0, rows, token_lp)
    counts = target_mask.sum(-1).to(torch.float32)
    return sums, counts


@torch.no_grad()
def batched_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                     pad_id: int, batch_size: int, max_length: int | None = None,
                     progress: str | None = None, *, bf16: bool | None = None) -> tuple[list[float], list[int]]:
    """Summed response log-probs for many (prompt, response) pairs, batched by similar length, under
    :func:`autocast` with ``bf16`` (``train.bf16`` where they are compared with training's; None: no
    autocast, the model's own dtype)."""
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    sums = [0.0] * len(prompts)
    counts = [0] * len(prompts)
    device = next(model.parameters()).device
    batches = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=progress, disable=progress is None, unit="batch"):
        ids, att, resp = collate([prompts[i] for i in idx], [responses[i] for i in idx], pad_id, max_length)
        with autocast(device, bf16):
            s, c = sequence_logprobs(model, ids.to(device), att.to(device), resp.to(device))
        for j, i in enumerate(idx):
            sums[i] = float(s[j])
            counts[i] = int(c[j])
    return sums, counts


@torch.no_grad()
def response_logprobs_and_hidden(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                                 pad_id: int, batch_size: int, max_length: int | None = None,
                                 progress: str | None = None) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Per (prompt, response), from one forward (batched by similar length): the summed response log-prob
    (as :func:`batched_logprobs` without autocast); the sum over the response's tokens of the last-layer
    hidden state at the position that predicts each token (the LM head's input), ``[N, d]`` float32 on
    the CPU; and the token counts ``[N]``. The hidden sums are the ``h_y`` of CHES (Razin et al. 2025,
    arXiv 2410.08847)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    lps = [0.0] * len(prompts)
    hidden_sums: list[torch.Tensor | None] = [None] * len(prompts)
    counts = torch.zeros(len(prompts), dtype=torch.long)
    batches = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=progress, disable=progress is None, unit="batch"):
        ids, att, resp = collate([prompts[i] for i in idx], [responses[i] for i in idx], pad_id, max_length)
        ids, att, resp = ids.to(device), att.to(device), resp.to(device)
        hidden = _body(model)(input_ids=ids, attention_mask=att).last_hidden_state
        lp = logprobs_from_hidden(model, hidden, ids, resp)[0]
        target = resp[:, 1:]  # position t predicts token t + 1, as in sequence_logprobs
        h = (hidden.float()[:, :-1] * target[..., None]).sum(1).cpu()
        for j, i in enumerate(idx):
            lps[i], hidden_sums[i], counts[i] = float(lp[j]), h[j], int(target[j].sum())
    d = model.config.hidden_size
    return lps, torch.stack(hidden_sums) if hidden_sums else torch.zeros(0, d), counts


def reference_check(model, input_ids, attention_mask, response_mask) -> torch.Tensor:
    """Plain full-logits computation of the same quantity, for tests of :func:`sequence_logprobs`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    lp = F.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (lp * response_mask[:, 1:]).sum(-1)


class ResponseLogprobs(torch.nn.Module):
    """``forward(input_ids, attention_mask, response_mask) -> (sums, counts)`` as a module, so DDP
    can wrap the whole computation (its gradient hooks need the work to run inside ``forward``)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, response_mask):
        return sequence_logprobs(self.lm, input_ids, attention_mask, response_mask)


def sequence_logprobs_via_forward(model, input_ids, attention_mask, response_mask):
    """Same as :func:`sequence_logprobs` through the model's own ``forward`` (needed by FSDP2,
    whose all-gathers hang on the root module's forward). ``logits_to_keep`` skips every column
    before the earliest response token, so most prompt positions never reach the LM head."""
    first = int(response_mask.float().argmax(-1).min())
    start = max(first - 1, 0)
    T = input_ids.shape[1]
    keep = torch.arange(start, T - 1, device=input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits.float()
    targets = input_ids[:, start + 1:]
    mask = response_mask[:, start + 1:]
    lp = logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
    return (lp * mask).sum(-1), mask.sum(-1).to(torch.float32)


def pair_logprobs(model, pairs: pl.DataFrame, pad_id: int, batch_size: int, max_length: int,
                  progress: str | None = None, *, bf16: bool) -> tuple[list[float], list[float], list[int], list[int]]:
    """Summed log-probs of chosen and rejected of every pair under ``model`` (the reference stage's and
    evaluation's one code path), and the response lengths in tokens. ``max_length`` and ``bf16`` are
    training's (``train.max_length``, ``train.bf16``), so both sides are truncated and rounded alike."""
    prompts = pairs["prompt_ids"].to_list()
    lw, nw = batched_logprobs(model, prompts, pairs["chosen_ids"].to_list(), pad_id, batch_size, max_length,
                              progress=progress and f"{progress} (chosen)", bf16=bf16)
    ll, nl = batched_logprobs(model, prompts, pairs["rejected_ids"].to_list(), pad_id, batch_size, max_length,
                              progress=progress and f"{progress} (rejected)", bf16=bf16)
    return lw, ll, nw, nl
