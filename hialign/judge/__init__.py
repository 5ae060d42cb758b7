"""Judge stage: pairwise, four-dimension, position-debiased verdicts from an LLM judge.

``build_judge`` returns a judge backed by an OpenAI-compatible endpoint (``url``) or by a local
Hugging Face model scored through next-token log-probabilities; both cache every call in SQLite.
"""

from hialign.judge.base import Judge
from hialign.judge.combine import invalid_counts, position_stats, win_loss_tie
from hialign.judge.factory import build_judge
from hialign.judge.items import DIMENSIONS, JudgeItem, JudgeResult, read_pairs

__all__ = [
    "DIMENSIONS",
    "Judge",
    "JudgeItem",
    "JudgeResult",
    "build_judge",
    "invalid_counts",
    "position_stats",
    "read_pairs",
    "win_loss_tie",
]
