"""Token sampling for rollouts (temperature, nucleus, greedy, per-row seeded randomness) and stop-string detection.

Sampling uses the exponential race (equivalently Gumbel-max): with E_k ~ Exp(1) i.i.d., argmax_k p_k / E_k is a
draw from p. Each row (one prompt sample) owns a generator seeded from (seed, row id) that supplies its E vector at
every step, so a row's sample does not depend on which rows share its batch, on chunking, or on compaction. Unlike
an inverse-CDF pick, the race is also robust to the ~1e-6 rounding differences that different batch shapes cause in
the logits: the pick only changes if the two best scores are that close, instead of whenever any of the 49k CDF
boundaries moves past the uniform. At top_p = 1 the race runs in two stages (`_top_first_race`): first among a
row's 64 most likely tokens, and over the rest only when a first uniform says the draw falls there, so a step costs
65 random numbers per row instead of V, with the same distribution (at 32 rows x 49k: 3.0 instead of 8.4 ms when no
row falls in the tail; SmolLM2 rambling on with EOS suppressed falls there 21% of the time).

Shapes: R = rows in the batch, V = vocabulary size.
"""
from __future__ import annotations

import torch

_MASK63 = (1 << 63) - 1
# How many of a row's most likely tokens the first stage of `_top_first_race` races among.
TOP_CANDIDATES = 64


def row_seed(seed: int, row: int) -> int:
    """A 63-bit generator seed for one row, distinct for distinct (seed, row) pairs in practice."""
    return (seed * 0x9E3779B97F4A7C15 + row * 0xBF58476D1CE4E5B9 + 1) & _MASK63


def row_generators(seed: int, rows: list[int]) -> list[torch.Generator]:
    """One CPU generator per row; row i's stream depends only on (seed, rows[i])."""
    return [torch.Generator(device="cpu").manual_seed(row_seed(seed, row)) for row in rows]


def exponential_noise(generators: list[torch.Generator], vocab_size: int, device: torch.device | str = "cpu"
                      ) -> torch.Tensor:
    """(len(generators), V) fp32 Exp(1) draws on ``device``, row i from generators[i] (advancing it).

    Drawn as -log(U) with U ~ [0, 1) from torch.rand: about 6x faster than Tensor.exponential_ per row. U < 1 keeps
    every draw > 0, so a zero-mass token scores 0 / E = 0, never NaN; U = 0 gives E = inf (that token loses).
    The generators are CPU ones, so a seed gives the same samples on every device; the draws are then copied.
    """
    noise = torch.empty(len(generators), vocab_size, device="cpu")
    for row, gen in zip(noise, generators):
        torch.rand(vocab_size, generator=gen, out=row, device="cpu")
    return noise.log_().neg_().to(device)


def sample_next_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                       generators: list[torch.Generator] | None, candidates: int = TOP_CANDIDATES
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return (tokens (R,) int64, logprobs (R,) fp32).

    logits: (R, V) raw next-token logits; generators: one per row, the row's only source of randomness (unused when
    temperature == 0). The returned log-prob is log softmax(logits / T) at the token, before top-p truncation,
    because that is the quantity the trainer recomputes with a teacher-forced forward pass. temperature == 0 means
    greedy, scored at T=1.
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, logprobs
    logp = torch.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)
    if top_p < 1.0:
        tokens = _nucleus_race(logp.exp(), top_p, exponential_noise(generators, logp.shape[-1], logp.device))
    else:
        tokens = _top_first_race(logp, generators, candidates)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _nucleus_race(probs: torch.Tensor, top_p: float, noise: torch.Tensor) -> torch.Tensor:
    """(R, V) probabilities, (R, V) Exp(1) noise -> (R,) tokens drawn from the nucleus: the most likely tokens until
    their mass reaches top_p. A token is kept when the mass strictly before it is < top_p; the most likely token is
    always kept, so top_p -> 0 degenerates to greedy."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return probs.masked_fill_(drop, 0.0).div_(noise).argmax(dim=-1)  # dropped tokens score 0, never win


def _top_first_race(logp: torch.Tensor, generators: list[torch.Generator], candidates: int) -> torch.Tensor:
    """(R, V) log-probabilities -> (R,) tokens, each an exact draw from its row's distribution.

    The exponential race over all V tokens costs V random numbers per row and step, most of them spent on tokens
    with no chance. Split the draw instead: with S a row's `candidates` most likely tokens and m their mass, the
    winner lies in S with probability m. So each row draws U first: if U < m, race among S alone (given that the
    winner is in S it is distributed as p restricted to S); else race over the tokens outside S. Both branches are
    exact, so the mixture is p. Noise goes to S by rank, so logits that move by rounding (another batch shape) only
    change a pick when two candidates are near-tied and one of them wins, about as rarely as with the full race;
    the tail branch pays for V draws.
    """
    rows, vocab = logp.shape
    k = min(candidates, vocab)
    top_logp, top_ids = logp.topk(k, dim=-1)                                    # (R, k), most likely first
    top_probs = top_logp.exp()
    draws = torch.empty(rows, k + 1)
    for row, gen in zip(draws, generators):
        torch.rand(k + 1, generator=gen, out=row)
    in_top = draws[:, 0] < top_probs.sum(-1).cpu()                              # U < m
    race = top_probs.div_(draws[:, 1:].log_().neg_().to(logp.device)).argmax(dim=-1)
    tokens = top_ids.gather(-1, race[:, None]).squeeze(-1)
    tail_rows = (~in_top).nonzero().flatten().tolist()
    if tail_rows:
        index = torch.tensor(tail_rows, device=logp.device)
        tail = logp[index].exp_().scatter_(-1, top_ids[index], 0.0)
        tail.div_(exponential_noise([generators[row] for row in tail_rows], vocab, logp.device))
        best, pick = tail.max(dim=-1)
        # The tail's mass may have underflowed to nothing (every score 0): then keep the first stage's pick.
        tokens[index] = torch.where(best > 0, pick, tokens[index])
    return tokens


class StopStrings:
    """Incremental stop-string detection on the decoded tail of each completion.

    Every token decodes to at least one byte, so a stop string that ends at the newest token lies within the last
    len(stop.encode()) tokens; one more token of left context keeps a multi-byte character split at the window edge
    from hiding it. Decoding only that tail keeps the check O(window) per row and step.
    """

    def __init__(self, tokenizer, stop: list[str] | None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.window = max((len(s.encode("utf-8")) for s in self.stop), default=0) + 1

    def __bool__(self) -> bool:
        return bool(self.stop)

    def hits(self, completions: list[list[int]]) -> list[bool]:
        tails = self.tokenizer.batch_decode([ids[-self.window:] for ids in completions], skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)
        return [any(s in tail for s in self.stop) for tail in tails]
