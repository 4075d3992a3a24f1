"""FLOP accounting: what a step spends on training, rollouts and scoring, with one formula for all three and
for `rntp plan`.

Model FLOPs of a decoder (the useful work, as in MFU; multiply-add = 2 FLOPs), for a model card with L layers,
hidden h, attention width a = heads * head_dim, vocabulary V and N_active non-embedding matmul parameters
(attention q, k, v, o with GQA, the SwiGLU MLP; for a mixture of experts the router and the top-k experts a
token goes through):

    forward over `tokens` new tokens, each attending causally to itself and `past` earlier (cached) ones,
    reading the logits at `logits` of them:
        2 N_active tokens  +  4 L a pairs  +  2 V h logits,      pairs = tokens (2 past + tokens + 1) / 2

(`pairs`: query-key pairs; q.k and the weighted sum of v are 2 a FLOPs each per pair and layer.) Training a
row is 3x its forward (the backward is twice the forward). Conventions, the same for every objective so that
branches compare at equal FLOPs: real tokens only (padding is free), logits only where a distribution is read
(the loss tokens of a training row, the sampled tokens of a rollout, the continuation of a scored row),
embeddings and norms free.

- training: each trained row of n tokens: 3 x forward(n tokens, past 0, logits at its loss tokens); with
  rl.shared_context a group's context of c tokens once, 3 x forward(c, 0, .), and each rollout's branch of b
  tokens after it, 3 x forward(b, c, .), as a rollout's prefill and decode are counted,
- rollout: each prompt of p tokens prefilled once per group (its G samples share the KV cache), then each of
  the g generated tokens of every sample decoded once against the cache: forward(p, 0, 0) + forward(g, p, g);
  each later turn of an interleaved rollout is a new engine call, so its whole prompt so far (p + s tokens,
  turn j starting at s) is prefilled again before its g_j tokens are decoded: forward(p + s, 0, 0) +
  forward(g_j, p + s, g_j),
- scoring: every forward-only pass of the trainer (likelihood rewards, reference and proxy passes, the off-policy
  anchor): rows [prefix + continuation] of rewards/scoring.continuation_logprobs, logits at the continuation.
  That function records each call here (`record_scoring`), so a new scoring pass is counted by construction;
  so does the site scorer (data/proxy.py: a chunk of n tokens is forward(n - 1, 0, n - 1), entropy or log-prob
  read at every position), with the proxy's own card when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

KINDS = ("train", "rollout", "scoring")


@dataclass
class TokenTally:
    """The token counts a FLOP count needs: new tokens, causal query-key pairs, positions whose logits are read."""

    tokens: float = 0.0
    pairs: float = 0.0
    logits: float = 0.0

    def add(self, tokens: int, past: int = 0, logits: int | None = None) -> "TokenTally":
        """Count one forward over `tokens` new tokens after `past` cached ones (logits at all of them by default)."""
        self.tokens += tokens
        self.pairs += tokens * (2 * past + tokens + 1) / 2
        self.logits += tokens if logits is None else logits
        return self

    def merge(self, other: "TokenTally") -> "TokenTally":
        self.tokens, self.pairs, self.logits = self.tokens + other.tokens, self.pairs + other.pairs, \
            self.logits + other.logits
        return self


def non_embedding_params(m: Any, active: bool = True) -> float:
    """Matmul parameters a token goes through, excluding embeddings and the output layer: per layer q, k, v, o
    (GQA) and the SwiGLU MLP (3 matrices), or with experts (m.num_moe_experts) the router h x E and the top-k
    experts of width moe_ffn_hidden_size (None: ffn_hidden_size); active=False: all E experts (what memory holds)."""
    head = m.kv_channels or m.hidden_size // m.num_attention_heads
    attn = m.hidden_size * head * (2 * m.num_attention_heads + 2 * m.num_query_groups)
    experts = getattr(m, "num_moe_experts", None)
    if experts:
        width = getattr(m, "moe_ffn_hidden_size", None) or m.ffn_hidden_size
        mlp = m.hidden_size * experts + (m.moe_router_topk if active else experts) * 3 * m.hidden_size * width
    else:
        mlp = 3 * m.hidden_size * m.ffn_hidden_size
    return float(m.num_layers * (attn + mlp))


def forward_flops(m: Any, tally: TokenTally) -> float:
    """2 N_active tokens + 4 L a pairs + 2 V h logits (module docstring) for a ModelConfig-like `m`."""
    width = (m.kv_channels or m.hidden_size // m.num_attention_heads) * m.num_attention_heads
    return (2 * non_embedding_params(m) * tally.tokens + 4 * m.num_layers * width * tally.pairs
            + 2 * m.vocab_size * m.hidden_size * tally.logits)


def training_flops(m: Any, tally: TokenTally) -> float:
    """Forward + backward of the rows in `tally`: 3 x their forward."""
    return 3 * forward_flops(m, tally)


def rollout_tally(prompt_lens: Sequence[int], generated_lens: Sequence[Sequence[int]]) -> TokenTally:
    """Prompts prefilled once each (prompt_lens[P]) and the samples of prompt i (generated_lens[i][...]) decoded
    token by token after its cache, reading one distribution per generated token."""
    tally = TokenTally()
    for p, gens in zip(prompt_lens, generated_lens):
        tally.add(p, 0, 0)
        for g in gens:
            tally.add(g, p, g)
    return tally


# ------------------------------------------------------------------------------------------------------
# Forward-only passes recorded where they happen (rewards/scoring.py), drained by the trainer once a step.

_SCORING = TokenTally()


def record_scoring(prefix_lens: Sequence[int], continuation_lens: Sequence[int]) -> None:
    """Count a forward-only pass over rows [prefix + continuation] (the last continuation token is not fed)
    reading the logits of the continuation."""
    for p, c in zip(prefix_lens, continuation_lens):
        _SCORING.add(p + c - 1, 0, c)


_SCORING_OTHER: dict[int, tuple[Any, TokenTally]] = {}  # passes of models of another card (a proxy): by id(card)


def record_scoring_with(card: Any, prefix_lens: Sequence[int], continuation_lens: Sequence[int]) -> None:
    """record_scoring for a model of another card than the policy's (data.proxy's): its FLOPs use that card."""
    tally = _SCORING_OTHER.setdefault(id(card), (card, TokenTally()))[1]
    for p, c in zip(prefix_lens, continuation_lens):
        tally.add(p + c - 1, 0, c)


def record_scoring_spans(spans: Sequence[tuple[int, int]], logits: int) -> None:
    """Count a forward-only pass over shared-context rows: (fed tokens, cached past) spans (rl/shared_context.py)
    reading `logits` distributions."""
    for tokens, past in spans:
        _SCORING.add(tokens, past, 0)
    _SCORING.logits += logits


def take_scoring() -> TokenTally:
    """The scoring passes recorded since the last call (and reset the record)."""
    global _SCORING
    out, _SCORING = _SCORING, TokenTally()
    return out


def take_scoring_flops(m: Any) -> float:
    """FLOPs of every scoring pass recorded since the last call, the policy's (card `m`) and other cards' (reset)."""
    other = [forward_flops(card, tally) for card, tally in _SCORING_OTHER.values()]
    _SCORING_OTHER.clear()
    return forward_flops(m, take_scoring()) + sum(other)


class FlopMeter:
    """A run's FLOPs by kind: this step's tallies on this rank, summed over the data-parallel group at the end of
    the step into `step_flops_<kind>` and the running totals `flops_<kind>`, `flops_total` (kept in checkpoints)."""

    def __init__(self, m: Any) -> None:
        self.m = m
        self.totals = dict.fromkeys(KINDS, 0.0)
        self.begin()

    def begin(self) -> None:
        """Start a step: forget scoring passes made outside the step (an evaluation between runs)."""
        take_scoring_flops(self.m)
        self.train, self.rollout = TokenTally(), TokenTally()

    def count_train(self, row_tokens: Sequence[int], loss_tokens: Sequence[int]) -> None:
        """Trained rows: row i feeds row_tokens[i] tokens and reads logits at loss_tokens[i] of them."""
        for n, k in zip(row_tokens, loss_tokens):
            self.train.add(n, 0, k)

    def count_train_spans(self, spans: Sequence[tuple[int, int]], logits: int) -> None:
        """Trained shared-context rows: each group's context once (past 0), each branch after it (past = the
        context), padding free; logits at `logits` positions."""
        for tokens, past in spans:
            self.train.add(tokens, past, 0)
        self.train.logits += logits

    def count_rollouts(self, rollouts: Sequence[Any]) -> None:
        """Rollouts grouped by prompt_index: each prompt prefilled once, each sample's first turn decoded after it
        against the cache, reading logits at its sampled tokens; each later turn [start, end) of an interleaved
        rollout re-prefills prompt + token_ids[:start] (a new engine call) and decodes its end - start tokens."""
        groups: dict[int, tuple[int, list[int]]] = {}
        for r in rollouts:
            p, turns = len(r.prompt_ids), r.segments or [[0, len(r.token_ids), 1]]
            groups.setdefault(r.prompt_index, (p, []))[1].append(turns[0][1])
            for start, end, _ in turns[1:]:
                self.rollout.add(p + start, 0, 0).add(end - start, p + start, end - start)
        self.rollout.merge(rollout_tally([p for p, _ in groups.values()], [g for _, g in groups.values()]))

    def end(self, group: Any = None) -> dict[str, float]:
        """This step's FLOPs summed over `group` (the DP group; None: this process only) and the running totals."""
        import torch
        import torch.distributed as dist

        from rntp_megatron.runtime import device

        local = [training_flops(self.m, self.train), forward_flops(self.m, self.rollout),
                 take_scoring_flops(self.m)]
        t = torch.tensor(local, dtype=torch.float64, device=device() if group is not None else "cpu")
        if group is not None:
            dist.all_reduce(t, group=group)
        out = {}
        for kind, value in zip(KINDS, t.tolist()):
            self.totals[kind] += value
            out[f"step_flops_{kind}"] = value
            out[f"flops_{kind}"] = self.totals[kind]
        out["flops_total"] = sum(self.totals.values())
        self.begin()
        return out

    def state_dict(self) -> dict[str, float]:
        return dict(self.totals)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.totals.update({k: float(v) for k, v in state.items() if k in self.totals})
