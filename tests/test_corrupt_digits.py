"""`diffcls digits --corrupt S`: a seeded, harder version of the held-out digits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffcls.errors import DiffclsError

pytest.importorskip("sklearn")


def _pixels(paths):
    out = {}
    for p in paths:
        with Image.open(p) as im:
            out[p.relative_to(p.parent.parent).as_posix()] = np.asarray(im).copy()
    return out


def test_corruption_is_seeded_and_independent_of_limit(tmp_path):
    from diffcls.models.digits import write_digits

    a = _pixels(write_digits(tmp_path / "a", "heldout", limit=20, severity=3))
    b = _pixels(write_digits(tmp_path / "b", "heldout", limit=20, severity=3))
    c = _pixels(write_digits(tmp_path / "c", "heldout", limit=10, severity=3))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(a[k], c[k]) for k in c)  # an image's corruption depends only on itself


def test_severity_zero_or_absent_is_the_clean_set(tmp_path):
    from diffcls.models.digits import write_digits

    clean = _pixels(write_digits(tmp_path / "clean", "heldout", limit=10))
    zero = _pixels(write_digits(tmp_path / "zero", "heldout", limit=10, severity=0))
    assert clean.keys() == zero.keys() and all(np.array_equal(clean[k], zero[k]) for k in clean)


def test_corruption_grows_with_severity(tmp_path):
    from diffcls.models.digits import write_digits

    clean = _pixels(write_digits(tmp_path / "clean", "heldout", limit=20))
    dist = []
    for s in (1, 3, 5):
        bad = _pixels(write_digits(tmp_path / f"s{s}", "heldout", limit=20, severity=s))
        assert bad.keys() == clean.keys()
        dist.append(np.mean([np.abs(bad[k].astype(float) - clean[k]).mean() for k in clean]))
        assert all(bad[k].shape == (32, 32) and bad[k].dtype == np.uint8 for k in bad)
    assert 0 < dist[0] < dist[1] < dist[2]
    with pytest.raises(DiffclsError, match="--corrupt 6"):
        write_digits(tmp_path / "x", "heldout", limit=1, severity=6)


def test_digits_cli_corrupt(tmp_path):
    from diffcls.cli.app import app
    from diffcls.models.digits import write_digits

    result = CliRunner().invoke(app, ["digits", str(tmp_path / "d"), "--limit", "10", "--corrupt", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "severity 2" in result.output
    got = _pixels(sorted((tmp_path / "d").rglob("*.png")))
    want = _pixels(write_digits(tmp_path / "w", "heldout", limit=10, severity=2))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    bad = CliRunner().invoke(app, ["digits", str(tmp_path / "e"), "--corrupt", "9"])
    assert bad.exit_code == 2 and "--corrupt 9" in bad.output
