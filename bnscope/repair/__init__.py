"""Graph repairs that are not folds: training-mode BN made an inference BN (:mod:`.inference_mode`)."""
