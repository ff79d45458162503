"""Session configuration: KATO 3.10.1's defaults, overrides and validation (§3.2, §3.5, §5.11)."""

from __future__ import annotations

from typing import Any

# Effective configuration in KATO's key order. fuzzy_token_threshold and
# affinity_emotive are listed only when a session sets them.
DEFAULTS: dict[str, Any] = {
    "max_pattern_length": 0,
    "persistence": 5,
    "recall_threshold": 0.1,
    "indexer_type": "VI",
    "max_predictions": 100,
    "sort_symbols": True,
    "process_predictions": True,
    "use_token_matching": True,
    "fuzzy_token_threshold": None,
    "stm_mode": "CLEAR",
    "rank_sort_algo": "potential",
    "affinity_emotive": None,
    "filter_pipeline": [],
    "length_min_ratio": 0.5,
    "length_max_ratio": 2.0,
    "jaccard_threshold": 0.3,
    "jaccard_min_overlap": 2,
    "minhash_threshold": 0.7,
    "minhash_bands": 20,
    "minhash_rows": 5,
    "minhash_num_hashes": 100,
    "bloom_false_positive_rate": 0.01,
    "max_candidates_per_stage": 100000,
    "enable_filter_metrics": True,
}
_SHOWN_ONLY_WHEN_SET = frozenset({"fuzzy_token_threshold", "affinity_emotive"})
CONFIG_FIELDS = frozenset(DEFAULTS)

STM_MODES = ("CLEAR", "ROLLING")
INDEXER_TYPES = ("VI", "LSH", "ANNOY", "FAISS")
RANK_SORT_ALGORITHMS = (
    "potential", "similarity", "evidence", "confidence", "snr", "fragmentation", "frequency",
    "normalized_entropy", "global_normalized_entropy", "itfdf_similarity", "confluence",
    "predictive_information", "bayesian_posterior", "bayesian_prior", "bayesian_likelihood",
    "tfidf_score", "weighted_similarity", "weighted_evidence", "weighted_confidence", "weighted_snr",
)  # fmt: skip


def effective_config(overrides: dict[str, Any]) -> dict[str, Any]:
    """The session's configuration as KATO reports it: overrides, else defaults, in KATO's order."""
    config: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        value = overrides.get(key)
        if value is None:
            if key in _SHOWN_ONLY_WHEN_SET:
                continue
            value = default
        config[key] = value
    return config


def _ranges_hold(candidate: dict[str, Any]) -> bool:
    """KATO's ``SessionConfiguration.validate``: range checks with no type checks.

    A value of the wrong type makes a comparison raise, which KATO treats as invalid.
    """

    def within(key: str, low: float | None, high: float | None) -> bool:
        value = candidate.get(key)
        if value is None:
            return True
        return (low is None or low <= value) and (high is None or value <= high)

    try:
        if not (
            within("recall_threshold", 0.0, 1.0)
            and within("persistence", 1, 100)
            and within("max_pattern_length", 0, None)
            and within("max_predictions", 1, 10000)
            and within("fuzzy_token_threshold", 0.0, 1.0)
            and within("jaccard_threshold", 0.0, 1.0)
            and within("jaccard_min_overlap", 1, None)
            and within("minhash_threshold", 0.0, 1.0)
            and within("minhash_bands", 1, 100)
            and within("minhash_rows", 1, 20)
            and within("minhash_num_hashes", 10, 256)
            and within("bloom_false_positive_rate", 0.0001, 0.1)
            and within("max_candidates_per_stage", 100, None)
        ):
            return False
        indexer = candidate.get("indexer_type")
        if indexer is not None and indexer not in INDEXER_TYPES:
            return False
        algorithm = candidate.get("rank_sort_algo")
        if algorithm is not None and algorithm not in RANK_SORT_ALGORITHMS:
            return False
        pipeline = candidate.get("filter_pipeline")
        if pipeline is not None and any(name not in ("length", "jaccard", "minhash", "bloom") for name in pipeline):
            return False
    except TypeError:
        return False
    return True


def apply_config(overrides: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any] | None:
    """Overrides after applying ``updates`` as KATO's ``SessionConfiguration.update`` does.

    Keys that are not config fields are ignored; an unknown ``stm_mode`` becomes
    CLEAR. Returns ``None`` when the result fails the range checks (KATO then
    keeps the previous values).
    """
    candidate = dict(overrides)
    for key, value in updates.items():
        if key in CONFIG_FIELDS:
            candidate[key] = value
    mode = candidate.get("stm_mode")
    if mode is not None and mode not in STM_MODES:
        candidate["stm_mode"] = "CLEAR"
    return candidate if _ranges_hold(candidate) else None


def validate_update(updates: dict[str, Any]) -> dict[str, str]:
    """KATO's ``validate_configuration_update``: per-key error messages (empty when valid).

    Also normalises an unknown ``stm_mode`` string to CLEAR in ``updates``.
    """
    errors: dict[str, str] = {}
    # key: (accepted types, lowest, highest, message)
    checks: dict[str, tuple[type | tuple[type, ...], float, float, str]] = {
        "recall_threshold": ((int, float), 0.0, 1.0, "Must be a number between 0.0 and 1.0"),
        "persistence": (int, 1, 100, "Must be an integer between 1 and 100"),
        "max_pattern_length": (int, 0, float("inf"), "Must be a non-negative integer"),
        "max_predictions": (int, 1, 10000, "Must be an integer between 1 and 10000"),
    }
    for key, (kinds, lowest, highest, message) in checks.items():
        if key in updates:
            value = updates[key]
            if not isinstance(value, kinds) or not lowest <= value <= highest:
                errors[key] = message
    if "indexer_type" in updates:
        value = updates["indexer_type"]
        if not isinstance(value, str) or value not in INDEXER_TYPES:
            errors["indexer_type"] = "Must be one of: " + ", ".join(INDEXER_TYPES)
    if "stm_mode" in updates:
        value = updates["stm_mode"]
        if not isinstance(value, str):
            errors["stm_mode"] = "Must be a string"
        elif value not in STM_MODES:
            updates["stm_mode"] = "CLEAR"
    for key in ("process_predictions", "use_token_matching"):
        if key in updates and not isinstance(updates[key], bool):
            errors[key] = "Must be a boolean (true/false)"
    if "rank_sort_algo" in updates:
        value = updates["rank_sort_algo"]
        if not isinstance(value, str) or value not in RANK_SORT_ALGORITHMS:
            errors["rank_sort_algo"] = "Must be one of: " + ", ".join(RANK_SORT_ALGORITHMS)
    return errors
