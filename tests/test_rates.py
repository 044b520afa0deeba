"""Summary rates stay readable for slow models: seconds per item below one item per second."""

from diffcls.runtime.execution.timing import per_second, rate


def test_fast_rates_are_per_second():
    assert rate(359, 91.9, "img") == "3.91 img/s"
    assert rate(79_000, 91.9, "UNet evals", "UNet eval", digits=0) == "860 UNet evals/s"


def test_slow_rates_are_seconds_per_item():
    # a real-size model on a CPU: 10 images and 2200 evaluations in an hour
    assert rate(10, 3600.0, "img") == "360.00 s/img"
    assert rate(2200, 3600.0, "UNet evals", "UNet eval", digits=0) == "1.64 s/UNet eval"
    assert per_second(0.25, "images", "image", 3) == "4.00 s/image"


def test_nothing_done_is_zero_not_a_division_error():
    assert rate(0, 0.0, "img") == "0 img/s"
    assert per_second(0.0, "UNet evals") == "0 UNet evals/s"
