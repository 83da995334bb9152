"""A Hugging Face cache laid out on disk as huggingface_hub writes it, so hub names resolve offline.

    models--ORG--NAME/refs/main                    the revision the main branch points to
    models--ORG--NAME/blobs/<sha256>               each file's content, named by its hash
    models--ORG--NAME/snapshots/<rev>/<file>  ->   ../../blobs/<sha256>
"""

import hashlib
import os
import shutil

import pytest

REVISION = "0123456789abcdef0123456789abcdef01234567"


def add_repo(cache_dir: str, repo_id: str, folder: str) -> None:
    """Put every file of `folder` into `cache_dir` as the main snapshot of hub repository `repo_id`."""
    repo_dir = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo_dir, "snapshots", REVISION)
    os.makedirs(os.path.join(repo_dir, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        shutil.copyfile(os.path.join(folder, name), os.path.join(repo_dir, "blobs", digest))
        os.symlink(os.path.join("..", "..", "blobs", digest), os.path.join(snapshot, name))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(REVISION)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> str:
    """An empty Hugging Face cache read offline (and an empty jaxclf cache) for this test; returns its path."""
    from huggingface_hub import constants

    cache_dir = str(tmp_path / "hf_cache")
    os.makedirs(cache_dir)
    for name, value in (("HF_HUB_CACHE", cache_dir), ("HF_HUB_OFFLINE", "1"),
                        ("JAXCLF_CACHE", str(tmp_path / "jaxclf_cache"))):
        monkeypatch.setenv(name, value)
    # huggingface_hub reads its environment once, at import.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache_dir)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache_dir
