"""Per-sequence log-probs of responses given prompts.

Only response tokens count (prompt tokens and padding are masked out). The language-model head
runs only on the hidden states that predict a response token, so the full ``[B, T, V]`` logits
tensor over prompt and padding positions is never materialised. A pair's two responses can share one
copy of its prompt (:func:`collate_pairs`, ``train.shared_prompt``).

Training, the reference stage and evaluation's held-out log-probs all compute under
:func:`autocast`, so ``lp − ref`` measures learning, not a difference of precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import polars as pl


# Devices on which ``train.bf16`` always turns bf16 autocast on; CPUs only with native bf16
# (:func:`cpu_has_native_bf16`). Tests add "cpu" to run the bf16 path on any CPU.
BF16_AUTOCAST_DEVICES = frozenset({"cuda"})


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX): there bf16 autocast is
    faster than fp32 (SmolLM2-135M on a 2-core EPYC with AVX512-BF16: a training step 1.7x, a scoring
    forward 1.7x); elsewhere bf16 is emulated and slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own feature probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def uses_bf16_autocast(device, bf16: bool) -> bool:
    """Whether log-probs on ``device`` are computed under bf16 autocast with ``train.bf16 = bf16``."""
    kind = torch.device(device).type
    return bool(bf16) and (kind in BF16_AUTOCAST_DEVICES or (kind == "cpu" and cpu_has_native_bf16()))


@contextlib.contextmanager
def autocast(device, bf16: bool):
    """The precision of the policy's and the reference's log-probs: bf16 autocast when
    :func:`uses_bf16_autocast`, else none (the model's own dtype, fp32 by default). One choice for
    training, the reference stage and evaluation: SmolLM2-135M's bf16 and fp32 log-probs differ by
    0.2 nats per sequence on average (up to 0.86), which would read as learning before any step.

    On a CPU it also selects the math attention kernel: the CPU flash kernel splits the keys into
    blocks that depend on the batch's padded length, so in bf16 a pair's log-probs depended on which
    pairs shared its batch (the default's 160 pairs batched two ways: mean 0.04, max 0.52 nats per
    sequence apart; the study's first training batches 0.065 and 0.67 from the reference). The math
    kernel gives the same log-probs in any batch (0.0 apart), at the same speed here."""
    with contextlib.ExitStack() as stack:
        if uses_bf16_autocast(device, bf16):
            kind = torch.device(device).type
            stack.enter_context(torch.autocast(kind, dtype=torch.bfloat16))
            if kind == "cpu":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


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


def _truncate(p: Sequence[int], r: Sequence[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """A (prompt, response) cut to ``max_length`` tokens: prompt tokens go from the left first (the
    response is what the loss is about), keeping at least a quarter of ``max_length`` of them, then
    response tokens from the right."""
    p, r = list(p), list(r)
    if max_length is not None and len(p) + len(r) > max_length:
        keep_p = max(max_length - len(r), min(len(p), max_length // 4))
        p = p[len(p) - keep_p:] if keep_p else []
        r = r[: max_length - len(p)]
    return p, r


def collate(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
            max_length: int | None = None):
    """Right-padded ``input_ids``, ``attention_mask`` and a mask of response-token positions, one row
    per (prompt, response), each cut to ``max_length`` by :func:`_truncate`."""
    seqs, resp_lens = [], []
    for p, r in zip(prompts, responses):
        p, r = _truncate(p, r, max_length)
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


@dataclass(frozen=True)
class ScoreBatch:
    """Model inputs and, for every token to score, where its prediction is read and whose sum it joins.

    ``attention_mask`` is a ``[B, T]`` padding mask, or a ``[B, 1, T, T]`` boolean mask (True: may
    attend) with ``position_ids`` for the shared-prompt layout. ``predictors`` are flat indices
    ``b * T + t`` of the hidden state that predicts each scored token, ``targets`` its token id and
    ``rows`` the output sum (of ``n_out``) it adds to.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None
    predictors: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    n_out: int

    def to(self, device) -> ScoreBatch:
        return ScoreBatch(*(t if t is None else t.to(device) for t in self.args()[:-1]), self.n_out)

    def args(self) -> tuple:
        """Positional arguments of :class:`ResponseLogprobs` (tensors, so DDP moves them)."""
        return (self.input_ids, self.attention_mask, self.position_ids, self.predictors, self.targets,
                self.rows, self.n_out)


def padded_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> ScoreBatch:
    """The :func:`collate` layout as a :class:`ScoreBatch`: one output per row, its response tokens."""
    # Position t predicts token t+1: a response token at t+1 is scored from hidden state t.
    rows, t = response_mask[:, 1:].nonzero(as_tuple=True)
    T = input_ids.shape[1]
    return ScoreBatch(input_ids, attention_mask, None, rows * T + t, input_ids[rows, t + 1], rows,
                      input_ids.shape[0])


def collate_pairs(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                  rejected: Sequence[Sequence[int]], pad_id: int, max_length: int | None = None, *,
                  shared_prompt: bool) -> ScoreBatch:
    """A batch of k pairs scoring chosen (outputs 0..k-1) then rejected (k..2k-1) responses.

    ``shared_prompt`` False: 2k padded rows, each response after its own copy of the prompt
    (:func:`collate`). True: one row per pair, ``prompt + chosen + rejected``, with a mask that
    lets the rejected tokens see the prompt but not the chosen ones and positions that restart
    after the prompt, so each response is scored exactly as after its own prompt; the prompt is run
    once (the default's ~58-token prompts and ~17-token responses: 92 tokens per pair instead of
    150). Each pair keeps the prompt tokens its longer response leaves (:func:`_truncate`), the same
    for both sides; without truncation both layouts score the same sequences.
    """
    if not shared_prompt:
        return padded_batch(*collate(list(prompts) * 2, list(chosen) + list(rejected), pad_id, max_length))
    k = len(prompts)
    rows = []
    for p, w, l_ in zip(prompts, chosen, rejected):
        p, _ = _truncate(p, w if len(w) >= len(l_) else l_, max_length)
        cut = None if max_length is None else max_length - len(p)
        rows.append((p, list(w)[:cut], list(l_)[:cut]))
    T = max(len(p) + len(w) + len(l_) for p, w, l_ in rows)
    input_ids = torch.full((k, T), pad_id, dtype=torch.long)
    segment = torch.full((k, T), 3, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
    positions = torch.zeros((k, T), dtype=torch.long)
    pred, targ, out = [], [], []
    for i, (p, w, l_) in enumerate(rows):
        P, W, L = len(p), len(w), len(l_)
        input_ids[i, : P + W + L] = torch.tensor(p + w + l_, dtype=torch.long)
        segment[i, :P], segment[i, P: P + W], segment[i, P + W: P + W + L] = 0, 1, 2
        positions[i, : P + W] = torch.arange(P + W)
        positions[i, P + W: P + W + L] = torch.arange(P, P + L)
        # Token j of a response is predicted by the state before it; the first by the prompt's last
        # (an empty prompt leaves the first token unscored, as in collate).
        skip = 0 if P else 1
        for side, start, resp in ((i, P, w), (k + i, P + W, l_)):
            if resp:
                ats = [P - 1, *range(start, start + len(resp) - 1)]
                pred += [i * T + a for a in ats[skip:]]
                targ += resp[skip:]
                out += [side] * (len(resp) - skip)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    q, kv = segment[:, :, None], segment[:, None, :]
    mask = (causal & ((kv == 0) | (kv == q)))[:, None]  # padding sees prompt and padding: no empty row
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return ScoreBatch(input_ids, mask, positions, as_long(pred), as_long(targ), as_long(out), 2 * k)


def _head(model):
    return model.get_output_embeddings()


def _body(model):
    return model.get_decoder()


def _model_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """A ``[B, 1, T, T]`` boolean mask in the form the model's attention takes (SDPA: as is; eager: additive)."""
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl == "sdpa":
        return mask
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(f"train.shared_prompt needs the model's attention to take a 4D mask (sdpa or eager), not "
                     f"{impl!r}; set train.shared_prompt: false")


def _model_inputs(model, batch: ScoreBatch) -> dict:
    att = batch.attention_mask
    kw = {"input_ids": batch.input_ids, "attention_mask": _model_mask(model, att) if att.dim() == 4 else att}
    if batch.position_ids is not None:
        kw["position_ids"] = batch.position_ids
    return kw


def score_batch(model, batch: ScoreBatch, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the scored tokens of each output of ``batch``, and their number.

    Differentiable (used by training); float32 tensors of shape ``[n_out]``. The language-model head
    runs only on the hidden states that predict a scored token.
    """
    hidden = _body(model)(**_model_inputs(model, batch)).last_hidden_state
    return logprobs_from_hidden(model, hidden, batch, chunk)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the response tokens of each row of a :func:`collate` batch, and their number."""
    return score_batch(model, padded_batch(input_ids, attention_mask, response_mask), chunk)


def _token_logprobs(model, h: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    head = _head(model)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    token_lp = []
    for s in range(0, h.shape[0], chunk):  # bound the [N, V] logits the head produces at once
        logits = head(h[s: s + chunk]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        token_lp.append(logits.gather(-1, targets[s: s + chunk, None]).squeeze(-1) - torch.logsumexp(logits, -1))
    return torch.cat(token_lp) if token_lp else h.new_zeros(0, dtype=torch.float32)


def _sums(batch: ScoreBatch, token_lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    device = batch.input_ids.device
    sums = torch.zeros(batch.n_out, dtype=torch.float32, device=device).index_add(0, batch.rows, token_lp)
    counts = torch.bincount(batch.rows, minlength=batch.n_out).to(torch.float32)
    return sums, counts


def logprobs_from_hidden(model, hidden: torch.Tensor, batch: ScoreBatch,
                         chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_batch` from the last-layer hidden states ``[B, T, d]`` of the same batch."""
    h = hidden.reshape(-1, hidden.shape[-1])[batch.predictors]
    return _sums(batch, _token_logprobs(model, h, batch.targets, chunk))


def _batches(n: int, length, batch_size: int, progress: str | None):
    """Index lists of ``batch_size`` items of similar ``length(i)``, with a progress bar."""
    from tqdm.auto import tqdm

    order = sorted(range(n), key=length)
    batches = [order[s: s + batch_size] for s in range(0, n, batch_size)]
    return tqdm(batches, desc=progress, disable=progress is None, unit="batch")


@torch.no_grad()
def batched_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                     pad_id: int, batch_size: int, max_length: int | None = None,
                     progress: str | None = None, *, bf16: bool | None = None) -> tuple[list[float], list[int]]:
    """Summed response log-probs for many (prompt, response) pairs, batched by similar length, under
    :func:`autocast` with ``bf16`` (``train.bf16`` where they are compared with training's; None: no
    autocast, the model's own dtype)."""
    sums = [0.0] * len(prompts)
    counts = [0] * len(prompts)
    device = next(model.parameters()).device
    for idx in _batches(len(prompts), lambda i: len(prompts[i]) + len(responses[i]), batch_size, progress):
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
    device = next(model.parameters()).device
    lps = [0.0] * len(prompts)
    hidden_sums: list[torch.Tensor | None] = [None] * len(prompts)
    counts = torch.zeros(len(prompts), dtype=torch.long)
    for idx in _batches(len(prompts), lambda i: len(prompts[i]) + len(responses[i]), batch_size, progress):
        batch = padded_batch(*collate([prompts[i] for i in idx], [responses[i] for i in idx], pad_id,
                                      max_length)).to(device)
        hidden = _body(model)(**_model_inputs(model, batch)).last_hidden_state
        lp, n = logprobs_from_hidden(model, hidden, batch)
        picked = hidden.float().reshape(-1, hidden.shape[-1])[batch.predictors]
        h = torch.zeros(len(idx), picked.shape[-1], device=device).index_add(0, batch.rows, picked).cpu()
        for j, i in enumerate(idx):
            lps[i], hidden_sums[i], counts[i] = float(lp[j]), h[j], int(n[j])
    d = model.config.hidden_size
    return lps, torch.stack(hidden_sums) if hidden_sums else torch.zeros(0, d), counts


def reference_check(model, input_ids, attention_mask, response_mask) -> torch.Tensor:
    """Plain full-logits computation of the same quantity, for tests of :func:`sequence_logprobs`."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    lp = F.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (lp * response_mask[:, 1:]).sum(-1)


class ResponseLogprobs(torch.nn.Module):
    """``forward(*ScoreBatch.args()) -> (sums, counts)`` (:func:`score_batch`) as a module, so DDP can
    wrap the whole computation (its gradient hooks need the work to run inside ``forward``)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, *args):
        return score_batch(self.lm, ScoreBatch(*args))


def score_batch_via_forward(model, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_batch` through the model's own ``forward`` (needed by FSDP2, whose all-gathers
    hang on the root module's forward). ``logits_to_keep`` keeps only the positions that predict a
    scored token, so most prompt positions never reach the LM head."""
    batch = ScoreBatch(*args)
    T = batch.input_ids.shape[1]
    keep = torch.unique(batch.predictors % T)  # sorted
    logits = model(**_model_inputs(model, batch), logits_to_keep=keep).logits.float()  # [B, K, V]
    at = torch.searchsorted(keep, batch.predictors % T)
    picked = logits[batch.predictors // T, at]  # the model's forward has applied any logit softcapping
    lp = picked.gather(-1, batch.targets[:, None]).squeeze(-1) - torch.logsumexp(picked, -1)
    return _sums(batch, lp)


@torch.no_grad()
def pair_logprobs(model, pairs: pl.DataFrame, pad_id: int, batch_size: int, max_length: int,
                  progress: str | None = None, *, bf16: bool,
                  shared_prompt: bool) -> tuple[list[float], list[float], list[int], list[int]]:
    """Summed log-probs of chosen and rejected of every pair under ``model`` (the reference stage's and
    evaluation's one code path), and the response lengths in tokens. ``max_length``, ``bf16`` and
    ``shared_prompt`` are training's (``train.*``), so both sides are laid out, truncated and rounded
    as training scores them; ``batch_size`` counts pairs."""
    prompts, chosen, rejected = (pairs[c].to_list() for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    device = next(model.parameters()).device
    n = len(prompts)
    lw, ll, nw, nl = [0.0] * n, [0.0] * n, [0] * n, [0] * n
    length = lambda i: len(prompts[i]) + len(chosen[i]) + len(rejected[i])  # noqa: E731
    for idx in _batches(n, length, batch_size, progress):
        batch = collate_pairs([prompts[i] for i in idx], [chosen[i] for i in idx], [rejected[i] for i in idx],
                              pad_id, max_length, shared_prompt=shared_prompt).to(device)
        with autocast(device, bf16):
            s, c = score_batch(model, batch)
        k = len(idx)
        for j, i in enumerate(idx):
            lw[i], ll[i], nw[i], nl[i] = float(s[j]), float(s[k + j]), int(c[j]), int(c[k + j])
    return lw, ll, nw, nl
