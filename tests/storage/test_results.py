"""The local result store: keyed by job id, atomic writes, no way out of its root."""
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genserve.storage import IMAGE_TYPES, OUTPUT_TYPES, LocalResultStore, ResultRef, output_name, output_type


@pytest.fixture
def store(tmp_path):
    return LocalResultStore(tmp_path / "results")  # created on construction


def files_under(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_root_is_created(tmp_path):
    root = tmp_path / "a" / "b"
    LocalResultStore(root)
    assert root.is_dir()


def test_put_exists_local_path(store):
    ref = store.put("job_1", "output.png", b"\x89PNG fake", "image/png")
    assert ref == ResultRef("job_1/output.png", "image/png", 9)
    assert ref.to_dict() == {"key": "job_1/output.png", "content_type": "image/png", "bytes": 9}
    path = store.local_path(ref.key)
    assert path == store.root / "job_1" / "output.png"
    assert path.read_bytes() == b"\x89PNG fake"
    assert store.exists("job_1/output.png")
    assert not store.exists("job_1/output.mp4")
    assert not store.exists("job_2/output.png")
    assert not store.exists("job_1")  # a directory is not a result


def test_put_is_atomic_and_overwrites(store):
    store.put("j", "output.png", b"first version, longer", "image/png")
    ref = store.put("j", "output.png", b"second", "image/png")
    assert ref.bytes == 6
    assert store.local_path(ref.key).read_bytes() == b"second"  # replaced, not appended/truncated-in-place
    assert files_under(store.root) == ["j/output.png"]  # no .tmp-* file left behind
    store.put("j", "output.mp4", b"", "video/mp4")  # empty outputs are files too
    assert store.exists("j/output.mp4") and store.local_path("j/output.mp4").stat().st_size == 0
    assert files_under(store.root) == ["j/output.mp4", "j/output.png"]


def test_failed_write_leaves_nothing_behind(store, monkeypatch):
    store.put("j", "output.png", b"good", "image/png")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.put("j", "output.png", b"half-written", "image/png")
    monkeypatch.undo()
    assert store.local_path("j/output.png").read_bytes() == b"good"  # the old output is intact
    assert files_under(store.root) == ["j/output.png"]  # and the temp file was removed


def test_replacing_an_output_keeps_its_inode_stable_for_readers(store):
    """A reader holding the old file keeps reading the old bytes (rename, not rewrite in place)."""
    store.put("j", "output.png", b"old bytes", "image/png")
    with open(store.local_path("j/output.png"), "rb") as reader:
        store.put("j", "output.png", b"new bytes!", "image/png")
        assert reader.read() == b"old bytes"
    assert store.local_path("j/output.png").read_bytes() == b"new bytes!"


BAD_KEYS = [
    ("..", "x"),
    ("../x", "output.png"),
    ("j", "../x"),
    ("j", ".."),
    ("j", "."),
    ("j", ".hidden"),
    ("j", ".tmp-abc"),  # the store's own temp files are never addressable
    ("j", "a/b"),
    ("j/k", "output.png"),
    ("", "output.png"),
    ("j", ""),
    ("j k", "output.png"),
    ("j", "out put.png"),
    ("j", "out\\put.png"),
    ("j\x00", "output.png"),
    ("jöb", "output.png"),
    ("j" * 129, "output.png"),
    ("j", "n" * 65),
    ("j.1", "output.png"),  # dots are allowed in names, not in job ids
]


@pytest.mark.parametrize("job_id,name", BAD_KEYS)
def test_invalid_keys_are_rejected(store, job_id, name):
    with pytest.raises(ValueError):
        store.put(job_id, name, b"x", "image/png")
    with pytest.raises(ValueError):
        store.local_path(f"{job_id}/{name}")
    assert not store.exists(f"{job_id}/{name}")
    assert files_under(store.root) == []
    assert not any(store.root.parent.glob("x"))  # nothing escaped the root


def test_key_forms_that_escape_are_rejected(store, tmp_path):
    (tmp_path / "secret").write_text("s")
    for key in ("../secret", "/etc/passwd", "results/../../secret", "j/../../secret", "j/output.png/x", "", "j"):
        with pytest.raises(ValueError):
            store.local_path(key)
        assert store.exists(key) is False


def test_longest_valid_ids_and_names_work(store):
    jid, name = "J-_9" * 32, "n._-" * 16  # 128 and 64 chars, every allowed character class
    ref = store.put(jid, name, b"ok", "image/png")
    assert store.exists(ref.key) and store.local_path(ref.key).read_bytes() == b"ok"


def test_trailing_newline_is_rejected(store):
    # Regression: the patterns once ended in `$`, which also matches before a trailing newline.
    with pytest.raises(ValueError):
        store.put("j\n", "output.png", b"x", "image/png")
    with pytest.raises(ValueError):
        store.put("j", "output.png\n", b"x", "image/png")


@settings(max_examples=150, deadline=None)
@given(job_id=st.text(max_size=12), name=st.text(max_size=12))
def test_any_accepted_key_stays_inside_the_root(tmp_path_factory, job_id, name):
    store = LocalResultStore(tmp_path_factory.mktemp("prop"))
    try:
        path = store.local_path(f"{job_id}/{name}")
    except ValueError:
        assert store.exists(f"{job_id}/{name}") is False
        return
    root = store.root.resolve()
    assert path.resolve().parent.parent == root  # exactly root/<job_id>/<name>
    assert not name.startswith(".")


def test_output_names_and_types():
    assert output_name("image") == "output.png"
    assert output_name("video") == "output.mp4"
    assert OUTPUT_TYPES == {"image": "image/png", "video": "video/mp4"}
    # every output name is a valid key name, and its extension matches the content type
    for kind, ctype in OUTPUT_TYPES.items():
        assert output_name(kind).rsplit(".", 1)[1] == ctype.split("/")[1]
    # image formats (a job's output_format): the same rule; None is the default (png)
    for fmt, ctype in IMAGE_TYPES.items():
        assert output_type("image", fmt) == ctype and output_name("image", fmt) == f"output.{ctype.split('/')[1]}"
    assert (output_name("image", None), output_type("image", None)) == ("output.png", "image/png")
    assert (output_name("video", None), output_type("video", None)) == ("output.mp4", "video/mp4")


def test_rerun_overwrites_the_single_output(store):
    for data in (b"attempt 1", b"attempt 2"):
        store.put("job", output_name("image"), data, OUTPUT_TYPES["image"])
    assert files_under(store.root) == ["job/output.png"]
    assert store.local_path("job/output.png").read_bytes() == b"attempt 2"
