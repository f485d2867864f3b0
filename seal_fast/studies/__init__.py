"""The studies of trained checkpoints: features (the shared loader and cache), depth, transfer, fewshot, hessian, pof."""
