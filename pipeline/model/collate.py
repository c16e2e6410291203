"""Batches of token ids to score: (prompt, response) rows cut to ``max_length`` and padded, and the
:class:`ScoreBatch` that says which hidden state predicts each scored token and whose sum it joins.

A pair's two responses can share one copy of its prompt (:func:`collate_pairs`,
``train.shared_prompt``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _truncate(p: Sequence[int], r: Sequence[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """A (prompt, response) cut to ``max_length`` tokens: prompt tokens go from the left first (the
    response is what the loss is about), keeping at least a quarter of ``max_length`` of them, then
    response tokens from the right."""
    p, r = list(p), list(r)
    if max_length is not None and len(p) + len(r) > max_length:
        keep_p = max(max_length - len(r), min(len(p), max_length // 4))
        p = p[len(p) - keep_p :] if keep_p else []
        r = r[: max_length - len(p)]
    return p, r


def collate(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, max_length: int | None = None
):
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
        response[i, len(s) - rl : len(s)] = True
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
        return ScoreBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            None if self.position_ids is None else self.position_ids.to(device),
            self.predictors.to(device),
            self.targets.to(device),
            self.rows.to(device),
            self.n_out,
        )

    def args(self) -> tuple:
        """Positional arguments of :class:`~pipeline.model.logprobs.ResponseLogprobs` (tensors, so DDP
        moves them)."""
        return (
            self.input_ids,
            self.attention_mask,
            self.position_ids,
            self.predictors,
            self.targets,
            self.rows,
            self.n_out,
        )


def padded_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> ScoreBatch:
    """The :func:`collate` layout as a :class:`ScoreBatch`: one output per row, its response tokens."""
    # Position t predicts token t+1: a response token at t+1 is scored from hidden state t.
    rows, t = response_mask[:, 1:].nonzero(as_tuple=True)
    T = input_ids.shape[1]
    return ScoreBatch(input_ids, attention_mask, None, rows * T + t, input_ids[rows, t + 1], rows, input_ids.shape[0])


def collate_pairs(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    pad_id: int,
    max_length: int | None = None,
    *,
    shared_prompt: bool,
) -> ScoreBatch:
    """A batch of k pairs scoring chosen (outputs 0..k-1) then rejected (k..2k-1) responses.

    ``shared_prompt`` False: 2k padded rows, each response after its own copy of the prompt
    (:func:`collate`). True: one row per pair, ``prompt + chosen + rejected``, with a mask that
    lets the rejected tokens see the prompt but not the chosen ones and positions that restart
    after the prompt, so each response is scored exactly as after its own prompt, and the prompt runs
    through the model once instead of twice. Each pair keeps the prompt tokens its longer response
    leaves (:func:`_truncate`), the same for both sides; without truncation both layouts score the
    same sequences.
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
        segment[i, :P], segment[i, P : P + W], segment[i, P + W : P + W + L] = 0, 1, 2
        positions[i, : P + W] = torch.arange(P + W)
        positions[i, P + W : P + W + L] = torch.arange(P, P + L)
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
