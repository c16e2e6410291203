"""The transformers sampling backend (``backend: transformers``): runs anywhere torch runs."""

from __future__ import annotations

import torch

from pipeline.generation.types import Candidate, GenerationSettings
from pipeline.model.encoding import encode_prompt


class TransformersSampler:
    """Batched ``generate`` with left padding; deterministic for a given seed and batch size.

    ``batch_size`` is sequences per ``generate`` call (prompts per call: ``batch_size // n``)."""

    def __init__(
        self, model_path: str, *, batch_size: int, dtype: str, device: str = "auto", model_id: str | None = None
    ):
        from pipeline.model import loading

        self.device = loading.device_for(device)
        self.model, self.tokenizer = loading.load_policy(model_path, dtype, self.device)
        self.batch_size = batch_size
        self.model_id = model_id or loading.fingerprint(model_path)

    @classmethod
    def from_model(cls, model, tokenizer, model_id: str, batch_size: int) -> TransformersSampler:
        """Wrap a model already in memory (e.g. right after training) without reloading it."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.model_id, self.batch_size = model, tokenizer, model_id, batch_size
        self.device = next(model.parameters()).device
        return self

    def close(self) -> None:
        self.model = None

    @torch.no_grad()
    def generate(self, prompts, settings: GenerationSettings, progress: str | None = "sampling"):
        from tqdm.auto import tqdm

        tok, model = self.tokenizer, self.model
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        encoded = [encode_prompt(tok, p) for p in prompts]
        # Sort by length so each batch pads little; results are put back in prompt order.
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        per_batch = max(1, self.batch_size // max(1, settings.n))
        batches = [order[s : s + per_batch] for s in range(0, len(order), per_batch)]
        results: list[list[Candidate] | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc=progress, disable=progress is None, unit="prompt")
        for b, idx in enumerate(batches):
            L = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), L), pad, dtype=torch.long)
            att = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, L - len(encoded[i]) :] = torch.tensor(encoded[i])
                att[r, L - len(encoded[i]) :] = 1
            greedy = settings.temperature == 0
            torch.manual_seed(settings.seed * 1_000_003 + b)
            out = model.generate(
                input_ids=ids.to(self.device),
                attention_mask=att.to(self.device),
                do_sample=not greedy,
                temperature=None if greedy else settings.temperature,
                top_p=None if greedy else settings.top_p,
                top_k=None if greedy else 0,
                num_return_sequences=settings.n,
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                return_dict_in_generate=True,
                output_logits=True,
            )
            gen = out.sequences[:, L:].cpu()
            # Raw logits (before temperature / top-p): the policy's own log-prob of each token.
            logits = torch.stack(out.logits, 1).float().cpu()
            lps = torch.log_softmax(logits, -1).gather(-1, gen[..., None]).squeeze(-1)
            for r, i in enumerate(idx):
                cands = []
                for k in range(settings.n):
                    row = r * settings.n + k
                    toks = gen[row].tolist()
                    stop = eos in toks
                    n_tok = toks.index(eos) + 1 if stop else len(toks)
                    toks = toks[:n_tok]
                    cands.append(
                        Candidate(
                            text=tok.decode(toks, skip_special_tokens=True).strip(),
                            token_ids=tuple(toks),
                            logprob_sum=float(lps[row, :n_tok].sum()),
                            finish_reason="stop" if stop else "length",
                        )
                    )
                results[i] = cands
            bar.update(len(idx))
        bar.close()
        return results
