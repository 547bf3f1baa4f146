"""The pretrain stage: the in-domain diffusion teacher trained on unlabeled crops."""
