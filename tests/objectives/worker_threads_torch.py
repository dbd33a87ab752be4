"""Thread-count test: records the torch intra-op thread count the worker got."""


def objective(trial):
    import torch

    trial.set_user_attr("torch_threads", torch.get_num_threads())
    return trial.suggest_float("x", -1.0, 1.0)
