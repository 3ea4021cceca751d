"""Evaluation: retrieval Recall@K, ITM re-ranking and zero-shot classification."""

from xmodal.evaluate.retrieval import (
    PairScorer,
    recall_at_k,
    rerank_metrics,
    rerank_ranks,
    retrieval_metrics,
    retrieval_ranks,
)
from xmodal.evaluate.zeroshot import DEFAULT_TEMPLATES, build_classifier, zeroshot_metrics

__all__ = [
    "DEFAULT_TEMPLATES",
    "PairScorer",
    "build_classifier",
    "recall_at_k",
    "rerank_metrics",
    "rerank_ranks",
    "retrieval_metrics",
    "retrieval_ranks",
    "zeroshot_metrics",
]
