"""The paragraph that comes before NCCL's watchdog aborts a process waiting for a hung
peer (pipeline/training/hangwatch.py). NCCL itself cannot run here; what is ours is the
watch: it speaks once when the loop stops moving for its limit, not while it moves, and
again after a beat re-arms it."""

import time

from pipeline.training.hangwatch import HangWatch, warning_margin_s


def test_the_watch_speaks_once_when_nothing_moves_and_never_while_the_loop_beats():
    said = []
    watch = HangWatch(0.2, said.append, poll_s=0.01)
    try:
        for _ in range(30):  # 0.3 s of beats every 10 ms: never quiet for 0.2 s
            watch.beat()
            time.sleep(0.01)
        assert said == []
        time.sleep(0.5)  # hung: one warning, not one per poll
        assert len(said) == 1 and said[0] >= 0.2
        watch.beat()  # the step finished after all: armed again
        time.sleep(0.4)
        assert len(said) == 2
    finally:
        watch.close()


def test_the_warning_comes_a_tenth_of_the_timeout_early_at_most_two_minutes():
    assert warning_margin_s(60) == 6
    assert warning_margin_s(30 * 60) == 120
