"""alignjax.fs: the one file layer for local folders, file:// URLs and buckets (gs://)."""

import os
import subprocess
import sys

from alignjax import fs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exercise(base: str) -> dict:
    """The operations the trainer uses, on folder `base`; what they leave, as a dict."""
    fs.write_text(fs.join(base, "a", "config.json"), "{}")
    fs.append_text(fs.join(base, "metrics.jsonl"), "1\n")
    fs.append_text(fs.join(base, "metrics.jsonl"), "2\n")
    fs.write_bytes(fs.join(base, "a", "b", "x.bin"), b"\x00\x01")
    fs.rename(fs.join(base, "a"), fs.join(base, "a.damaged"))
    return {"names": fs.listdir(base), "moved": fs.listdir(fs.join(base, "a.damaged")),
            "nested": fs.as_path(fs.join(base, "a.damaged", "b", "x.bin")).read_bytes(),
            "metrics": fs.read_text(fs.join(base, "metrics.jsonl")),
            "missing": fs.listdir(fs.join(base, "none")), "gone": fs.exists(fs.join(base, "a"))}


EXPECTED = {"names": ["a.damaged", "metrics.jsonl"], "moved": ["b", "config.json"],
            "nested": b"\x00\x01", "metrics": "1\n2\n", "missing": [], "gone": False}


def test_local_path_and_file_url(tmp_path):
    assert _exercise(str(tmp_path / "plain")) == EXPECTED
    assert _exercise(f"file://{tmp_path}/url") == EXPECTED
    assert sorted(os.listdir(tmp_path / "url")) == ["a.damaged", "metrics.jsonl"]  # no temp files


def test_bucket_url_keeps_its_scheme_and_round_trips(tmp_path):
    assert fs.join("gs://b/run", "tb") == "gs://b/run/tb"
    assert fs.is_remote("gs://b/run") and not fs.is_remote("file:///tmp") and not fs.is_remote("x")
    assert fs.join("rel", "x") == os.path.abspath(os.path.join("rel", "x"))
    script = ("import sys; sys.path.insert(0, 'tests'); import fake_bucket, test_fs; "
              f"fake_bucket.install({str(tmp_path)!r}); "
              "print(test_fs._exercise('gs://b/run') == test_fs.EXPECTED)")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.stdout.strip() == "True", r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "b" / "run")) == ["a.damaged", "metrics.jsonl"]


def test_local_copy_of_a_bucket_folder(tmp_path):
    src = tmp_path / "src"
    fs.put_dir(str(_tree(src)), f"file://{tmp_path}/copy")
    assert fs.get_dir(f"file://{tmp_path}/copy", str(tmp_path / "back")) == str(tmp_path / "back")
    assert (tmp_path / "back" / "d" / "f.txt").read_text() == "f"
    assert (tmp_path / "back" / "top.txt").read_text() == "t"


def _tree(root):
    (root / "d").mkdir(parents=True)
    (root / "d" / "f.txt").write_text("f")
    (root / "top.txt").write_text("t")
    return root


def test_bucket_tokenizer_download_is_removed_at_exit(tmp_path):
    """A bucket's tokenizer is read from a local download (fs.temp_dir) that is gone when the
    process ends: runs that load from buckets leave nothing in /tmp."""
    script = ("import os, sys; sys.path.insert(0, 'tests'); import fake_bucket; "
              f"fake_bucket.install({str(tmp_path)!r}); "
              "from alignjax import fs; from alignjax.data.tokenizer import train_bpe_tokenizer, load_tokenizer; "
              f"train_bpe_tokenizer().save_pretrained({str(tmp_path / 'tok')!r}); "
              f"fs.put_dir({str(tmp_path / 'tok')!r}, 'gs://b/tok'); "
              "local = load_tokenizer('gs://b/tok').name_or_path; "
              "print(local, os.path.isdir(local))")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    local, existed = r.stdout.split()
    assert existed == "True" and "alignjax-tokenizer-" in local, r.stderr[-3000:]
    assert not os.path.exists(local)
