"""The embedding/latent cache: a rerun does no encoder work, bad entries are never trusted."""

from __future__ import annotations

import pytest
import torch

from diffcls.runtime.data.cache import DiskCache
from diffcls.runtime.execution.classifier import Classifier
from diffcls.runtime.algorithm.schedule import Schedule

PROMPTS = ["a photo of a cat.", "a photo of a dog.", "a photo of a car."]
SCHEDULE = Schedule(n_samples=(2, 4), to_keep=(2, 1))


@pytest.fixture
def images(image_folder):
    return sorted(str(p) for p in image_folder.rglob("*.png"))[:3]


def _run(engines, cache_dir, images, prompts=PROMPTS, **kw):
    clf = Classifier(engines, cache=DiskCache(cache_dir))
    before = (engines.text_encoder.calls, engines.vae_encoder.calls)
    results = clf.classify(images, prompts, SCHEDULE, batch_size=4, **kw)
    work = (engines.text_encoder.calls - before[0], engines.vae_encoder.calls - before[1])
    return results, work, clf.cache


def _same(a, b):
    """Bit-identical: every latent and embedding came from the cache or the same computation."""
    assert [r.prediction for r in a] == [r.prediction for r in b]
    assert [r.errors for r in a] == [r.errors for r in b]


def _close(a, b):
    """A recomputed entry is encoded in a smaller VAE/text batch than the first time, which may
    change the last bits of a float32 convolution; the errors agree to float32 rounding."""
    assert [r.prediction for r in a] == [r.prediction for r in b]
    for ra, rb in zip(a, b):
        assert [e[:3] for e in ra.errors] == [e[:3] for e in rb.errors]
        assert max(abs(x[3] - y[3]) for x, y in zip(ra.errors, rb.errors)) < 1e-5


def _files(root, kind):
    return sorted((root / kind).rglob("*.safetensors"))


def test_second_run_does_no_encoder_work(tiny_engines, tmp_path, images):
    first, work1, c1 = _run(tiny_engines, tmp_path, images)
    assert work1[0] >= 1 and work1[1] >= 1
    assert c1.hits == 0 and c1.misses == len(PROMPTS) + len(images)
    second, work2, c2 = _run(tiny_engines, tmp_path, images)
    assert work2 == (0, 0)
    assert c2.hits == len(PROMPTS) + len(images) and c2.misses == 0
    _same(first, second)


def test_corrupt_entries_are_recomputed(tiny_engines, tmp_path, images):
    first, _, _ = _run(tiny_engines, tmp_path, images)
    latent = _files(tmp_path, "latent")[0]
    text = _files(tmp_path, "text")[0]
    latent.write_bytes(b"not a safetensors file")
    text.write_bytes(latent.read_bytes()[:5])  # truncated
    second, work, cache = _run(tiny_engines, tmp_path, images)
    assert work[0] >= 1 and work[1] >= 1  # both encoders ran again for the bad entries
    assert cache.rejected == 2
    _close(first, second)
    third, work3, _ = _run(tiny_engines, tmp_path, images)  # and the rewritten entries are good
    assert work3 == (0, 0)
    _close(first, third)


def test_mismatched_entry_is_not_trusted(tiny_engines, tmp_path, images):
    first, _, _ = _run(tiny_engines, tmp_path, images)
    # put one latent entry's file where another image's entry lives: valid file, wrong key
    a, b = _files(tmp_path, "latent")[:2]
    b.write_bytes(a.read_bytes())
    t1, t2 = _files(tmp_path, "text")[:2]
    t2.write_bytes(t1.read_bytes())
    second, work, cache = _run(tiny_engines, tmp_path, images)
    assert cache.rejected == 2
    assert work[0] >= 1 and work[1] >= 1
    _close(first, second)


def test_non_finite_entry_is_recomputed(tiny_engines, tmp_path, images):
    first, _, _ = _run(tiny_engines, tmp_path, images)
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = _files(tmp_path, "latent")[0]
    with safe_open(str(path), framework="pt") as f:
        meta, value = f.metadata(), f.get_tensor("value")
    save_file({"value": torch.full_like(value, float("nan"))}, str(path), metadata=meta)
    second, work, cache = _run(tiny_engines, tmp_path, images)
    assert cache.rejected == 1 and work[1] >= 1
    _close(first, second)


def test_interpolation_is_part_of_the_latent_key(tiny_engines, tmp_path, images):
    _run(tiny_engines, tmp_path, images, interpolation="bicubic")
    _, work, cache = _run(tiny_engines, tmp_path, images, interpolation="bilinear")
    assert work[0] == 0  # prompts unchanged: embeddings come from the cache
    assert work[1] >= 1 and cache.misses == len(images)
    assert len(_files(tmp_path, "latent")) == 2 * len(images)


def test_image_size_is_part_of_the_latent_key(tiny, tiny_engines, tmp_path, images):
    from diffcls.engines import open_engines

    _run(tiny_engines, tmp_path, images)
    bigger = open_engines("torch", model=tiny, device="cpu", image_size=24)
    _, work, cache = _run(bigger, tmp_path, images)
    assert work[0] == 0 and work[1] >= 1
    assert cache.misses == len(images)


def test_changed_prompt_is_a_miss_only_for_that_prompt(tiny_engines, tmp_path, images):
    _run(tiny_engines, tmp_path, images)
    changed = PROMPTS[:2] + ["a photo of a truck."]
    _, work, cache = _run(tiny_engines, tmp_path, images, prompts=changed)
    assert work == (1, 0)
    assert cache.misses == 1 and cache.hits == 2 + len(images)


def test_keys_differ_by_every_field(tmp_path):
    cache = DiskCache(tmp_path)
    base = {"model": "m", "backend": "torch", "precision": "fp32", "image": "abc", "size": 512, "interpolation": "bicubic"}
    variants = [base, {**base, "size": 256}, {**base, "interpolation": "lanczos"}, {**base, "image": "abd"}, {**base, "model": "n"}, {**base, "precision": "fp16"}]
    paths = {cache._path("latent", cache._canonical(v)) for v in variants}
    assert len(paths) == len(variants)
    t = {"model": "m", "backend": "torch", "precision": "fp32"}
    assert cache._path("text", cache._canonical({**t, "prompt": "a cat"})) != cache._path("text", cache._canonical({**t, "prompt": "a cat "}))


COMPILE_SCRIPT = """
import json, torch
torch.set_num_threads(1)
from torch._dynamo.utils import counters
from diffcls.engines.torch_backend import compile_module
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
f = compile_module(m, torch.device("cpu"))
with torch.inference_mode():
    y = f(torch.ones(3, 8))
import os
print(json.dumps({"inductor": dict(counters["inductor"]), "dir": os.environ["TORCHINDUCTOR_CACHE_DIR"], "y": y.tolist()}))
"""


@pytest.mark.slow
def test_compiled_graphs_persist_across_processes(tmp_path):
    """torch.compile's FX-graph cache lives under the diffcls cache dir: a second run does not recompile."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")}
    env["DIFFCLS_CACHE"] = str(tmp_path)

    def run():
        p = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["dir"] == second["dir"] == str(tmp_path / "inductor")
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1 and second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert first["y"] == second["y"]


def test_cache_command_reports_and_clears(tmp_path):
    from typer.testing import CliRunner

    from diffcls.cli.app import app

    c = DiskCache(tmp_path)
    c.put("text", {"prompt": "a"}, torch.zeros(2, 3))
    c.put("latent", {"image": "b"}, torch.zeros(4, 2, 2))
    r = CliRunner().invoke(app, ["cache", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 0 and "2 entries" in r.output
    r = CliRunner().invoke(app, ["cache", "--cache-dir", str(tmp_path), "--clear"])
    assert r.exit_code == 0 and "removed 2 cached entries" in r.output
    assert c.get("text", {"prompt": "a"}) is None


def _flip_exponent_bit(path):
    """Flip the top exponent bit of one float32 in the entry's data, header untouched.

    The element is one with 0 < |x| < 1, so the flipped value is huge but finite (a NaN or inf
    would already be caught by the finiteness check; this must be caught by the checksum).
    """
    import json
    import struct

    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    start, end = header["value"]["data_offsets"]
    base = 8 + n + start
    for off in range(base, 8 + n + end, 4):
        (x,) = struct.unpack_from("<f", raw, off)
        if 0 < abs(x) < 1:
            raw[off + 3] ^= 0x40  # bit 30: the exponent's most significant bit
            (y,) = struct.unpack_from("<f", raw, off)
            assert abs(y) > 1e30 and y == y and abs(y) != float("inf")
            path.write_bytes(bytes(raw))
            return
    raise AssertionError("no element to flip")


def test_flipped_exponent_bit_in_a_latent_is_recomputed(tiny_engines, tmp_path, images):
    clean, _, _ = _run(tiny_engines, tmp_path / "clean", images)
    _run(tiny_engines, tmp_path / "c", images)
    for path in _files(tmp_path / "c", "latent"):
        _flip_exponent_bit(path)
    second, work, cache = _run(tiny_engines, tmp_path / "c", images)
    assert cache.rejected == len(images)  # every flipped entry caught by its checksum
    assert work == (0, 1)  # the latents were encoded again (one VAE batch), the prompts were not
    _close(clean, second)
    third, work3, cache3 = _run(tiny_engines, tmp_path / "c", images)  # and replaced by good ones
    assert work3 == (0, 0) and cache3.rejected == 0
    _close(clean, third)


def test_wrong_shape_entry_with_a_valid_key_is_recomputed_and_replaced(tiny_engines, tmp_path, images):
    import json

    from safetensors import safe_open

    first, _, _ = _run(tiny_engines, tmp_path, images)
    cache = DiskCache(tmp_path)
    for kind in ("latent", "text"):
        with safe_open(str(_files(tmp_path, kind)[0]), framework="pt") as f:
            fields = json.loads(f.metadata()["key"])
        cache.put(kind, fields, torch.ones(2, 3))  # a well-formed entry (checksum and all), wrong shape
    second, work, c2 = _run(tiny_engines, tmp_path, images)
    assert c2.rejected == 2
    assert work[0] >= 1 and work[1] >= 1
    _close(first, second)
    third, work3, c3 = _run(tiny_engines, tmp_path, images)  # replaced: not rejected again
    assert work3 == (0, 0) and c3.rejected == 0
    _close(first, third)


def test_entry_without_checksum_is_not_trusted(tmp_path):
    """An entry from an older diffcls (key metadata, no checksum) is recomputed, not trusted."""
    from safetensors.torch import save_file

    cache = DiskCache(tmp_path)
    fields = {"image": "abc"}
    path = cache._path("latent", cache._canonical(fields))
    path.parent.mkdir(parents=True)
    save_file({"value": torch.ones(4, 2, 2)}, str(path), metadata={"key": cache._canonical(fields)})
    assert cache.get("latent", fields, (4, 2, 2)) is None and cache.rejected == 1
    assert not path.exists()
    cache.put("latent", fields, torch.ones(4, 2, 2))
    assert torch.equal(cache.get("latent", fields, (4, 2, 2)), torch.ones(4, 2, 2))


def test_cache_clear_deletes_only_what_diffcls_wrote(tmp_path):
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from diffcls.cli.app import app

    root = tmp_path / "x"
    notes = root / "text" / "notes" / "thesis.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("four years of work")
    mine = root / "latent" / "my_tensors.safetensors"  # a user's file where diffcls keeps latents
    mine.parent.mkdir(parents=True)
    save_file({"value": torch.ones(2)}, str(mine), metadata={"key": "{}"})
    # a user's safetensors file at an entry-shaped path whose key does not hash to its name
    lookalike = root / "latent" / "ab" / ("ab" + "0" * 62 + ".safetensors")
    lookalike.parent.mkdir(parents=True)
    save_file({"value": torch.ones(2)}, str(lookalike), metadata={"key": '{"image":"x"}'})
    c = DiskCache(root)
    c.put("text", {"prompt": "a"}, torch.zeros(2, 3))
    c.put("latent", {"image": "b"}, torch.zeros(4, 2, 2))
    r = CliRunner().invoke(app, ["cache", "--cache-dir", str(root), "--clear"])
    assert r.exit_code == 0
    assert notes.read_text() == "four years of work"
    assert mine.is_file() and lookalike.is_file()
    assert "removed 2 cached entries" in r.output
    assert c.get("text", {"prompt": "a"}) is None and c.get("latent", {"image": "b"}) is None
    # the two-hex directories diffcls created are gone once empty; the user's stay
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "latent", "latent/ab", lookalike.relative_to(root).as_posix(), "latent/my_tensors.safetensors",
        "text", "text/notes", "text/notes/thesis.txt",
    ]


def test_cache_size_counts_only_its_entries(tmp_path):
    c = DiskCache(tmp_path)
    c.put("text", {"prompt": "a"}, torch.zeros(2, 3))
    (tmp_path / "latent" / "ab").mkdir(parents=True)
    (tmp_path / "latent" / "ab" / ("ab" + "1" * 62 + ".safetensors")).write_bytes(b"not ours")
    assert c.size()[0] == 1


def test_cache_clear_removes_its_own_directories(tmp_path):
    c = DiskCache(tmp_path / "c")
    c.put("text", {"prompt": "a"}, torch.zeros(2, 3))
    c.put("latent", {"image": "b"}, torch.zeros(4, 2, 2))
    (tmp_path / "c" / "inductor").mkdir()  # torch.compile's cache lives beside ours: not ours to clear
    assert c.clear() == 2
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["inductor"]
