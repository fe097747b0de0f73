"""Evaluation during training: the eval split (eval_set), sampling an edit from its cached embeddings
(sampling), and the previews and held-out loss run at set steps (validator)."""
