import gc

from pypto_serving.startup import freeze_startup_objects


class Thing:
    pass


def test_objects_alive_at_startup_are_frozen_and_later_ones_are_collected():
    loaded = Thing()
    try:
        freeze_startup_objects()
        assert not any(o is loaded for o in gc.get_objects())  # out of every generation
        later = Thing()
        assert any(o is later for o in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(o is loaded for o in gc.get_objects())
