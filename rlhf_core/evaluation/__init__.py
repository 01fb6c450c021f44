"""Evaluation of a candidate policy: is it better, and has it gamed its reward model?

* :mod:`~rlhf_core.evaluation.metrics` - win rates with confidence intervals, diversity, repetition, lengths.
* :mod:`~rlhf_core.evaluation.likelihood` - log-probabilities of sampled responses (KL, perplexity).
* :mod:`~rlhf_core.evaluation.best_of_n` - the best-of-n frontier from the reference (Gao et al. 2022).
* :mod:`~rlhf_core.evaluation.overoptimisation` - proxy rising while gold falls.
* :mod:`~rlhf_core.evaluation.report` - one policy's responses and scores, compared with another's.
* :mod:`~rlhf_core.evaluation.gates` - the thresholds a candidate must clear before promotion.
* :mod:`~rlhf_core.evaluation.human_eval` - blind side-by-side labelling tasks and their win rates.
* :mod:`~rlhf_core.evaluation.plots` and :mod:`~rlhf_core.evaluation.model_card` - what people read.
"""
