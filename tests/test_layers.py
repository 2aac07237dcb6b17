import pytest

from steering.layers import LayerSpecError, default_capping_band, parse_layer_spec


def test_layer_spec_forms():
    assert parse_layer_spec(None, 6) == list(range(6))
    assert parse_layer_spec("", 6, default="middle") == [3]
    assert parse_layer_spec("all", 6) == list(range(6))
    assert parse_layer_spec("2", 6) == [2]
    assert parse_layer_spec("1-3", 6) == [1, 2, 3]
    assert parse_layer_spec("1:3", 6) == [1, 2]
    assert parse_layer_spec("0:6:2", 6) == [0, 2, 4]
    assert parse_layer_spec("-2:", 6) == [4, 5]
    assert parse_layer_spec("0, 2 - 3, -1", 6) == [0, 2, 3, 5]
    assert parse_layer_spec([5, -1, 0], 6) == [0, 5]


@pytest.mark.parametrize("bad, message", [("7", "outside"), ("3-1", "backwards"), ("x", "write e.g."),
                                          ("5:2", "select no layer"), ([9], "outside")])
def test_layer_spec_errors(bad, message):
    with pytest.raises(LayerSpecError, match=message):
        parse_layer_spec(bad, 6)


def test_default_capping_band_is_in_the_upper_middle():
    assert default_capping_band(30) == "21:26"
    assert parse_layer_spec(default_capping_band(4), 4)
    assert parse_layer_spec(default_capping_band(80), 80) == list(range(56, 68))
