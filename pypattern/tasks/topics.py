"""Topics: sequences whose tokens come from one concept's (topic's) own sub-vocabulary plus shared tokens.

The concept of a sequence is readable from its prefix (any topic token reveals it) and determines which tokens
come next, so a model that predicts well has to carry the concept along the residual stream, which is what
:mod:`pypattern.flags` trains into a few named dimensions. A *switch* variant changes the topic at a random
position; after the switch the continuation follows the new topic.
"""

from __future__ import annotations

import torch

from .base import IGNORE, Task, TaskBatch, count_arg, fraction_arg, generator

__all__ = ["TopicTask"]


class TopicTask(Task):
    """``[BOS, x_1 .. x_{n}]``: each ``x_i`` is a shared token with probability ``shared_prob``, otherwise a
    token drawn uniformly from the sequence's topic's sub-vocabulary.

    Vocabulary: topic ``c`` owns tokens ``c * tokens_per_topic .. (c + 1) * tokens_per_topic - 1``; then
    ``num_shared`` shared tokens; the last token (``d_vocab - 1``) is BOS. Targets are the next token at every
    position (language modelling). The best possible next-token loss is reached by a model that knows the
    topic; one that does not pays about ``log(num_topics)`` nats on topic tokens.

    ``extra`` holds, per sample:

    - ``"concept"`` ``(num_samples,)``: the topic the sequence starts in;
    - ``"next_concept"`` ``(num_samples,)``: the topic after the switch (equal to ``"concept"`` without one);
    - ``"switch_pos"`` ``(num_samples,)``: the first position drawn from ``next_concept`` (``seq_len`` when
      the sequence does not switch);
    - ``"concept_pos"`` ``(num_samples, seq_len)``: the concept readable from the prefix at each position, the
      topic of the most recent topic token at or before it; -1 before the first topic token;
    - ``"target_concept"`` ``(num_samples, seq_len)``: the topic that generates the *next* token (position
      ``t`` predicts token ``t + 1``); the last position repeats the one before.

    Parameters
    ----------
    num_topics : int
        Number of concepts (at least 2).
    tokens_per_topic : int
        Size of each topic's own sub-vocabulary.
    num_shared : int
        Tokens that any topic emits (they carry no concept information).
    seq_len : int
        Positions including BOS: at least ``min_prefix + 3`` (5 with the default ``min_prefix``).
    shared_prob : float
        Probability that a position holds a shared token, in ``[0, 1)``.
    switch_prob : float
        Probability that a sequence switches topic (the *switch* variant; 0 gives the plain task). A switching
        sequence draws a new topic different from the first one and a switch position uniform in
        ``min_prefix + 1 .. seq_len - 2``; it can be overridden per call of :meth:`sample`.
    min_prefix : int
        Number of tokens after BOS that always follow the first topic in a switching sequence, ``1 .. seq_len -
        3``.

    Examples
    --------
    >>> task = TopicTask(num_topics=2, tokens_per_topic=6, num_shared=2, seq_len=12)
    >>> batch = task.sample(4, seed=0)
    >>> batch.tokens.shape, batch.extra["concept"].shape
    (torch.Size([4, 12]), torch.Size([4]))
    """

    name = "topics"
    default_lr = 3e-3
    default_batch_size = 64

    def __init__(
        self,
        num_topics: int = 2,
        tokens_per_topic: int = 8,
        num_shared: int = 4,
        seq_len: int = 16,
        shared_prob: float = 0.25,
        switch_prob: float = 0.0,
        min_prefix: int = 2,
    ) -> None:
        for name, v, lo in (
            ("num_topics", num_topics, 2),
            ("tokens_per_topic", tokens_per_topic, 1),
            ("num_shared", num_shared, 0),
            ("seq_len", seq_len, 4),  # BOS, min_prefix >= 1 token, the switch and one token after it
            ("min_prefix", min_prefix, 1),
        ):
            count_arg(v, name, lo)
        num_topics, tokens_per_topic, num_shared = int(num_topics), int(tokens_per_topic), int(num_shared)
        seq_len, min_prefix = int(seq_len), int(min_prefix)
        shared_prob = fraction_arg(shared_prob, "shared_prob", upper_open=True)
        if num_shared == 0 and shared_prob > 0:
            raise ValueError(f"shared_prob={shared_prob!r} needs num_shared >= 1 (got num_shared=0)")
        switch_prob = self._check_switch_prob(switch_prob)
        if min_prefix + 1 > seq_len - 2:
            raise ValueError(
                f"min_prefix={min_prefix} is too large for seq_len={seq_len}; give at most {seq_len - 3}, or "
                f"seq_len >= {min_prefix + 3}"
            )
        self.num_topics, self.tokens_per_topic, self.num_shared = num_topics, tokens_per_topic, num_shared
        self.shared_prob, self.switch_prob, self.min_prefix = shared_prob, switch_prob, min_prefix
        self.n_ctx = seq_len
        self.d_vocab = num_topics * tokens_per_topic + num_shared + 1
        self.bos = self.d_vocab - 1
        self.shared_start = num_topics * tokens_per_topic
        tc = torch.full((self.d_vocab,), -1, dtype=torch.long)
        tc[: self.shared_start] = torch.arange(self.shared_start) // tokens_per_topic
        #: ``(d_vocab,)``: the topic of every token, -1 for shared tokens and BOS.
        self.token_concepts = tc

    @staticmethod
    def _check_switch_prob(p: float) -> float:
        return fraction_arg(p, "switch_prob")

    @property
    def num_concepts(self) -> int:
        return self.num_topics

    def concept_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """The topic of every token (-1 for shared tokens and BOS); same shape as ``tokens``."""
        return self.token_concepts.to(tokens.device)[tokens]

    def sample(
        self, num_samples: int, seed: int | None = None, switch_prob: float | None = None
    ) -> TaskBatch:
        """Draw ``num_samples`` sequences (see the class docstring); ``switch_prob`` overrides the task's."""
        p_switch = self._check_switch_prob(self.switch_prob if switch_prob is None else switch_prob)
        g = generator(seed)
        n, T, K, C = count_arg(num_samples, "num_samples"), self.n_ctx, self.tokens_per_topic, self.num_topics
        concept = torch.randint(0, C, (n,), generator=g)
        other = (concept + torch.randint(1, C, (n,), generator=g)) % C
        switches = torch.rand(n, generator=g) < p_switch
        switch_pos = torch.randint(self.min_prefix + 1, T - 1, (n,), generator=g)
        switch_pos = torch.where(switches, switch_pos, torch.full_like(switch_pos, T))
        next_concept = torch.where(switches, other, concept)
        pos = torch.arange(T)
        topic_at = torch.where(pos[None, :] >= switch_pos[:, None], next_concept[:, None], concept[:, None])
        topic_tok = topic_at * K + torch.randint(0, K, (n, T), generator=g)
        shared_tok = self.shared_start + torch.randint(0, max(self.num_shared, 1), (n, T), generator=g)
        is_shared = torch.rand(n, T, generator=g) < self.shared_prob
        tokens = torch.where(is_shared, shared_tok, topic_tok)
        tokens[:, 0] = self.bos
        # readable concept: topic of the most recent topic token at or before each position
        tc = self.concept_of(tokens)
        idx = torch.where(tc >= 0, pos.expand(n, T), torch.full_like(tokens, -1)).cummax(1).values
        concept_pos = torch.where(idx >= 0, tc.gather(1, idx.clamp_min(0)), torch.full_like(tokens, -1))
        target_concept = torch.cat([topic_at[:, 1:], topic_at[:, -1:]], 1)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, :-1] = tokens[:, 1:]
        extra = {
            "concept": concept,
            "next_concept": next_concept,
            "switch_pos": switch_pos,
            "concept_pos": concept_pos,
            "target_concept": target_concept,
        }
        return TaskBatch(tokens, targets, extra)

    def model_config(self, **overrides):
        from ..models.transformer import TransformerConfig

        cfg = dict(n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=self.d_vocab, n_ctx=self.n_ctx)
        cfg.update(overrides)
        return TransformerConfig(**cfg)

    def optimal_loss(self) -> float:
        """Mean next-token loss (nats) of the ideal predictor that knows the current topic, switches excluded.

        Positions 1.. are each shared with probability ``shared_prob`` (uniform over ``num_shared``) or a
        topic token (uniform over ``tokens_per_topic``); this is that distribution's entropy.
        """
        import math

        p, S, K = self.shared_prob, self.num_shared, self.tokens_per_topic
        h = -(1 - p) * math.log((1 - p) / K)
        if p > 0:
            h -= p * math.log(p / S)
        return h
