"""Shared by the training tests: interrupting a run after an epoch, as a kill between epochs would."""


class Interrupted(Exception):
    """Raised from ``on_epoch_end``: the run stops there with its checkpoints written."""


def stop_after(epochs: int):
    """An ``on_epoch_end`` callback that interrupts the run after epoch ``epochs``."""
    def callback(epoch, _row):
        if epoch == epochs:
            raise Interrupted
    return callback
