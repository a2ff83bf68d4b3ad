"""
Guards: an agent's edit takes effect, or the run stops with one line. DO NOT MODIFY.

RunError (a problem found before training: `FAIL: ...`, exit 1, no traceback), the
batch-size and model-size checks, the optimizer-group check, the check that every trainable parameter gets a gradient in
step 0, and the loss check that stops a diverged run. train.py and the package's
attention module import it; it imports nothing of the project.
"""

import math
import sys


class RunError(SystemExit):
    """A problem found before training: one line, exit code 1, no traceback."""

    def __init__(self, message):
        super().__init__(f"FAIL: {message}")


def _positive(value, whole):
    """A positive number (a whole one when whole), finite; never a bool."""
    kinds = int if whole else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_batch_size(total_batch_size, device_batch_size, seq_len):
    """The step's tokens split into whole micro-batches: TOTAL_BATCH_SIZE is a positive
    multiple of DEVICE_BATCH_SIZE rows of seq_len tokens."""
    if not (_positive(total_batch_size, True) and _positive(device_batch_size, True)) \
            or total_batch_size % (device_batch_size * seq_len):
        raise RunError(f"TOTAL_BATCH_SIZE ({total_batch_size}) must be a multiple of "
                       f"DEVICE_BATCH_SIZE * MAX_SEQ_LEN ({device_batch_size} * {seq_len}), both whole and positive")


def check_model_settings(depth, aspect_ratio, head_dim):
    """DEPTH and HEAD_DIM are positive whole numbers, ASPECT_RATIO a positive number: a zero
    or negative one builds no model (or divides by zero) deep inside the setup."""
    settings = [("DEPTH", depth, True), ("ASPECT_RATIO", aspect_ratio, False), ("HEAD_DIM", head_dim, True)]
    bad = [f"{name}={value!r}" for name, value, whole in settings if not _positive(value, whole)]
    if bad:
        raise RunError(f"{', '.join(bad)}: DEPTH and HEAD_DIM must be positive whole numbers, ASPECT_RATIO a "
                       f"positive number")


def check_param_groups(model, groups):
    """Every trainable parameter of the model is in exactly one optimizer group, and the
    groups hold nothing else: a parameter left out would silently never train.
    `groups`: the param-group dicts, or an optimizer."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    seen = {}
    for group in getattr(groups, "param_groups", groups):
        for p in group["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    missing = [name for key, name in trainable.items() if key not in seen]
    twice = [names.get(key, "a tensor not in the model") for key, n in seen.items() if n > 1]
    foreign = [key for key in seen if key not in names]
    if missing:
        raise RunError(f"parameter(s) in no optimizer group, they would never train: {', '.join(missing)} "
                       f"(add them to a group in setup_optimizer)")
    if twice:
        raise RunError(f"parameter(s) in more than one optimizer group: {', '.join(twice)}")
    if foreign:
        raise RunError(f"{len(foreign)} optimizer parameter(s) are not parameters of the model")


class GradientTracker:
    """Notes which trainable parameters receive a gradient (a hook each, removed by check())."""

    def __init__(self, model):
        self.model, self.seen = model, set()
        self.hooks = [p.register_post_accumulate_grad_hook(lambda p: self.seen.add(id(p)))
                      for p in model.parameters() if p.requires_grad]

    def check(self):
        for hook in self.hooks:
            hook.remove()
        missing = [name for name, p in self.model.named_parameters() if p.requires_grad and id(p) not in self.seen]
        if missing:
            raise RunError(f"parameter(s) that got no gradient in step 0, they would never train: "
                           f"{', '.join(missing)} (unused in the forward pass? freeze them with requires_grad_(False))")


def track_gradients(model):
    """Call before step 0, and .check() after it: every trainable parameter must get a gradient."""
    return GradientTracker(model)


def check_loss(loss, step):
    """A diverged run stops: loss NaN or above 100 prints FAIL and exits 1."""
    if not math.isfinite(loss) or loss > 100:
        print(f"\nFAIL: loss {loss} at step {step}", flush=True)
        sys.exit(1)
