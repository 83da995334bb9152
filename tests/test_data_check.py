"""The data check (jaxclf.data.check): a folder written to hold each kind of problem, checked by the real
command; the fast form; near-duplicate search against brute force; TFDS; and `train` failing at start."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from jaxclf import config as config_lib, train
from jaxclf.data import check, findings, headers, load_splits, scan
from jaxclf.config import base_config
from tests.big_png import big_png
from limits import SUBPROCESS_S  # tests/ is on sys.path

CROP = 64
PP_TRAIN = f"--config.data.pp_train=decode|inception_crop({CROP})"
ENV = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}


def _photo(name: str, side: int = 128) -> Image.Image:
    """A scikit-image sample photo, its longer side resized to `side`."""
    image = Image.fromarray(getattr(skimage.data, name)())
    scale = side / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)


def _blobs(seed: int, size=(96, 80)) -> Image.Image:
    """Smooth random colour blobs: each seed a different picture."""
    cells = np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.BICUBIC)


def _save(image: Image.Image, path, **kwargs) -> bytes:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, **kwargs)
    with open(path, "rb") as f:
        return f.read()


def _write_bytes(path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_folder(root, problems: bool) -> dict:
    """An image folder of varied clean images (photos in RGB and L, CMYK, RGBA, blobs, a small one, a JPEG with
    data after its end), plus with `problems` one of each kind the check looks for. Returns what is where."""
    r = lambda *parts: os.path.join(root, *parts)  # noqa: E731
    _save(_photo("astronaut"), r("train", "a", "astronaut.jpg"), quality=90)
    _save(_photo("coffee"), r("train", "a", "coffee.jpg"), quality=90)
    _save(_photo("camera"), r("train", "a", "camera.png"))  # grayscale: mode L
    _save(_blobs(0), r("train", "a", "blobs0.png"))
    blobs1 = _save(_blobs(1), r("train", "a", "blobs1.png"))
    _save(_photo("chelsea"), r("train", "b", "chelsea.jpg"), quality=90)
    _save(_photo("rocket"), r("train", "b", "rocket.jpg"), quality=90)
    blobs2 = _save(_blobs(2), r("train", "b", "blobs2.png"))
    _save(_photo("hubble_deep_field").convert("CMYK"), r("train", "b", "cmyk.jpg"), quality=90)
    trailer = _save(_photo("immunohistochemistry"), r("train", "b", "trailer.jpg"), quality=90)
    _write_bytes(r("train", "b", "trailer.jpg"), trailer + b"camera maker's data after the EOI marker" * 4)
    _save(_photo("coins"), r("val", "a", "coins.png"))
    rgba = _blobs(4).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    _save(rgba, r("val", "a", "rgba.png"))
    _save(_blobs(5), r("val", "b", "blobs5.png"))
    _save(_blobs(8, size=(40, 50)), r("val", "b", "small.png"))  # smaller than the crop
    _save(_photo("moon"), r("test", "a", "moon.png"))
    _save(_blobs(6), r("test", "b", "blobs6.png"))
    if problems:
        coffee = io.BytesIO()
        _photo("coffee", 200).save(coffee, "JPEG", quality=90)
        _write_bytes(r("train", "a", "truncated.jpg"), coffee.getvalue()[: len(coffee.getvalue()) // 2])
        blobs7 = io.BytesIO()
        _blobs(7, size=(300, 300)).save(blobs7, "PNG")
        _write_bytes(r("train", "b", "truncated.png"), blobs7.getvalue()[: len(blobs7.getvalue()) * 3 // 5])
        _write_bytes(r("val", "a", "empty.jpg"), b"")
        _write_bytes(r("train", "b", "notes.png"), b"not an image, whatever the name says\n")
        _write_bytes(r("train", "b", "blobs1_copy.png"), blobs1)  # same file, other class: duplicate inside train
        _write_bytes(r("val", "b", "leak.png"), blobs2)  # the same file in train and val
        near = _photo("astronaut", 80)  # resized and re-encoded: a near-duplicate in test
        _save(near, r("test", "a", "near.jpg"), quality=70)
    return {
        "unreadable": {r("train", "a", "truncated.jpg"), r("train", "b", "truncated.png"), r("val", "a", "empty.jpg"),
                       r("train", "b", "notes.png")},
        "within": [{r("train", "a", "blobs1.png"), r("train", "b", "blobs1_copy.png")}],
        "across": [{r("train", "b", "blobs2.png"), r("val", "b", "leak.png")}],
        "near": [(r("train", "a", "astronaut.jpg"), r("test", "a", "near.jpg"))],
        "small": {r("val", "b", "small.png")},
        "trailer": r("train", "b", "trailer.jpg"),
    }


@pytest.fixture(scope="module")
def problem_folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("check") / "data")
    return root, write_folder(root, problems=True)


def test_the_check_command_finds_every_problem(problem_folder, tmp_path):
    root, expected = problem_folder
    out = tmp_path / "out"
    # The documented command, with its process pool (2 workers).
    result = subprocess.run([sys.executable, "-m", "jaxclf.data.check", root, PP_TRAIN, "--workers", "2",
                             "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert {u["file"] for u in report["unreadable"]} == expected["unreadable"]
    reasons = {os.path.basename(u["file"]): u["reason"] for u in report["unreadable"]}
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert "truncated" in reasons["truncated.jpg"] and "FFD9" in reasons["truncated.jpg"]
    assert "IEND" in reasons["truncated.png"]
    assert "cannot identify image file" in reasons["notes.png"]

    exact = report["exact_duplicates"]
    assert [{f["file"] for f in g["files"]} for g in exact["within_split"]] == expected["within"]
    assert exact["within_split"][0]["labels_differ"]
    assert [{f["file"] for f in g["files"]} for g in exact["across_splits"]] == expected["across"]
    near = report["near_duplicates"]
    assert [(p["a"]["file"], p["b"]["file"]) for p in near["pairs"]] == expected["near"]
    assert near["pairs"][0]["distance"] <= check.NEAR_DISTANCE
    assert report["problems"] == 4 + 1 + 1 + 1

    assert report["crop_size"] == CROP
    assert {s["file"] for s in report["smaller_than_crop"]["files"]} == expected["small"]
    assert report["modes"]["train"]["L"] == 1 and report["modes"]["train"]["CMYK"] == 1
    assert report["modes"]["val"] == {"RGB": 3, "L": 1, "RGBA": 1}  # blobs5, small, leak; coins; rgba
    # Data after a JPEG's end marker is a note (training reads the file), not a problem.
    assert [n["file"] for n in report["notes"]] == [expected["trailer"]]
    for split in ("train", "val", "test"):
        on_disk = {c: len(os.listdir(os.path.join(root, split, c))) for c in ("a", "b")}
        assert report["class_counts"][split] == on_disk
    counts = report["class_counts"]["train"]
    assert report["imbalance"]["train"]["ratio"] == round(max(counts.values()) / min(counts.values()), 3)
    summary = (out / "report.md").read_text()
    assert "train: train/b/notes.png: UnidentifiedImageError" in summary
    assert "files shared by several splits (leakage)" in summary and "leak.png" in result.stdout


def test_fast_check_finds_the_unreadable_files_without_decoding_the_rest(problem_folder, tmp_path, monkeypatch):
    root, expected = problem_folder
    decoded = []
    real_map = scan.Decode.map
    monkeypatch.setattr(scan.Decode, "map", lambda self, example: decoded.append(example["path"]) or real_map(self, example))
    assert check.main([root, PP_TRAIN, "--fast", "--workers", "0", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["check"] == "fast"
    assert {u["file"] for u in report["unreadable"]} == expected["unreadable"]
    assert [n["file"] for n in report["notes"]] == [expected["trailer"]]
    assert {s["file"] for s in report["smaller_than_crop"]["files"]} == expected["small"]
    assert "exact_duplicates" not in report and report["problems"] == 4
    # Only the files lacking their end marker were decoded, to tell truncation from trailing data.
    assert set(decoded) == {os.path.join(root, "train", "a", "truncated.jpg"),
                            os.path.join(root, "train", "b", "truncated.png"), expected["trailer"]}


def test_a_clean_folder_passes(tmp_path):
    root = str(tmp_path / "data")
    write_folder(root, problems=False)
    assert check.main([root, PP_TRAIN, "--workers", "0", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["problems"] == 0 and not report["unreadable"]
    assert report["near_duplicates"]["pairs_found"] == 0
    # The near-duplicate threshold has a margin: the closest distinct clean images are far apart.
    config = base_config()
    config.data.root = root
    splits = load_splits(config.data)
    scans = scan.scan(splits, check.decode_ops(config.data, list(splits)), full=True, workers=0)
    hashes = np.concatenate([s.records["phash"] for s in scans.values()])
    distances = np.bitwise_count(hashes[:, None] ^ hashes[None, :])[np.triu_indices(len(hashes), 1)]
    assert distances.min() > 2 * check.NEAR_DISTANCE


def test_usage_and_data_mistakes_exit_2(tmp_path, problem_folder, capsys):
    root, _ = problem_folder
    with pytest.raises(SystemExit) as e:
        check.main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        check.main([root, "--config", "tests/tiny_config.py"])
    assert e.value.code == 2
    assert check.main([str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert check.main([root, "--config.data.pp_trian=decode", "--out", str(tmp_path)]) == 2
    assert "Did you mean config.data.pp_train?" in capsys.readouterr().err


def test_default_output_folder_is_in_the_runs_workdir():
    args, config, out = check.parse_args(["--config", "tests/tiny_config.py:/data/x", "--fast"])
    assert out == os.path.join(config_lib.default_workdir("tests/tiny_config.py:/data/x"), "data_check")
    assert config.data.root == "/data/x" and args.workers == check.FAST_THREADS
    assert check.parse_args(["/data/pets/"])[2] == os.path.join("runs", "data_check_pets")


@pytest.mark.parametrize("name, fmt, cut", [
    ("a.jpg", "JPEG", 0.5), ("a.png", "PNG", 0.9), ("a.gif", "GIF", 0.7), ("a.webp", "WEBP", 0.7), ("a.bmp", "BMP", 0.7),
])
def test_headers_see_a_file_cut_short(tmp_path, name, fmt, cut):
    data = _save(_blobs(3, size=(70, 50)), tmp_path / name)
    whole = headers.read_header(str(tmp_path / name))
    assert (whole.format, whole.width, whole.height, whole.suspect, whole.problem) == (fmt, 70, 50, None, None)
    _write_bytes(tmp_path / name, data[: int(len(data) * cut)])
    cut_short = headers.read_header(str(tmp_path / name))
    # Pillow's WebP plugin already demuxes the file when it opens it: there a short file is a problem outright.
    assert (bool(cut_short.problem), bool(cut_short.suspect)) == ((True, False) if fmt == "WEBP" else (False, True))


@pytest.mark.parametrize("max_distance", [0, 3, 5])
def test_near_pairs_match_brute_force(max_distance):
    rng = np.random.default_rng(max_distance)
    a = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, 300).astype(np.uint64)
    b = rng.integers(0, 2**63, 200, dtype=np.int64).astype(np.uint64)
    # Plant copies of a's hashes in b with 0..8 bits flipped.
    for k, j in enumerate(range(0, 200, 5)):
        flips = rng.choice(64, k % 9, replace=False)
        b[j] = a[k] ^ np.uint64(sum(1 << int(f) for f in flips))
    b[-3:] = a[:3]  # repeated keys too
    i, j, d = findings.near_pairs(a, b, max_distance)
    dist = np.bitwise_count(a[:, None] ^ b[None, :])
    want_i, want_j = np.nonzero(dist <= max_distance)
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(want_i.tolist(), want_j.tolist()))
    assert (d == dist[i, j]).all() and len(i) >= 3


def test_tfds_full_check_reads_records_and_finds_overlapping_slices(tfds_data_dir):
    import tfds_on_disk

    config = base_config()
    config.data.source, config.data.tfds_name, config.data.root = "tfds", "jaxclf_test_images", tfds_data_dir
    config.data.train_split, config.data.val_split = "train[:75%]", "train[50%:]"  # 6 records in both
    config.data.pp_train = "decode|random_crop(32)"
    splits = load_splits(config.data)
    report = check.check_splits(splits, config.data, full=True, workers=0)
    assert report["images"] == {"train": 18, "val": 12, "test": 8}
    assert not report["unreadable"] and report["modes"]["train"] == {"RGB": 18}
    assert report["exact_duplicates"]["across_splits_groups"] == 6
    assert report["exact_duplicates"]["within_split_groups"] == 0
    assert report["near_duplicates"]["pairs_found"] == 0
    assert report["class_counts"]["test"] == {name: sum(tfds_on_disk.label_of(k) == c for k in range(8))
                                              for c, name in enumerate(tfds_on_disk.CLASS_NAMES)}
    fast = check.check_splits(splits, config.data, full=False, workers=0)
    assert set(fast["skipped_splits"]) == {"train", "val", "test"} and not fast["unreadable"]


def _digits_with(digits_root, tmp_path, relative: str, data: bytes) -> str:
    """A copy of the digits folder with `data` written at `relative`."""
    root = str(tmp_path / "digits")
    shutil.copytree(digits_root, root)
    _write_bytes(os.path.join(root, relative), data)
    return root


def _truncated_png() -> bytes:
    png = io.BytesIO()
    _blobs(9, size=(16, 16)).save(png, "PNG")
    return png.getvalue()[: len(png.getvalue()) // 2]


@pytest.mark.parametrize("relative, data, reason", [
    ("train/9/zzz_last.png", _truncated_png(), "IEND"),
    ("val/9/zzz_last.png", b"", "empty file"),
    ("train/9/zzz_last.png", big_png(12000), "12000x12000 = 144,000,000 pixels, over the limit of 89,478,485"),
])
def test_train_fails_at_start_on_an_unreadable_file_placed_last(digits_root, tmp_path, capsys, relative, data, reason):
    root = _digits_with(digits_root, tmp_path, relative, data)
    assert sorted(load_splits(_config_data(root))[relative.split("/")[0]].paths)[-1].endswith(relative)
    workdir = tmp_path / "run"
    assert train.main(["--config", f"tests/tiny_config.py:{root}", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "error: the data check (fast) found 1 unreadable images" in err
    assert os.path.join(root, relative) in err and reason in err
    # It stopped before any training step: nothing compiled, no metrics, no checkpoint.
    assert "compiling" not in err
    assert not (workdir / "metrics.jsonl").exists() and not (workdir / "checkpoints").exists()
    report = json.loads((workdir / check.TRAINING_REPORT).read_text())
    assert [u["file"] for u in report["unreadable"]] == [os.path.join(root, relative)]


def _config_data(root):
    config = base_config()
    config.data.root = root
    return config.data


def test_train_with_skip_reports_and_runs(digits_root, tmp_path, capsys):
    root = _digits_with(digits_root, tmp_path, "train/9/zzz_last.png", b"")
    workdir = tmp_path / "run"
    assert train.main(["--config", f"tests/tiny_config.py:{root}", "--workdir", str(workdir),
                       "--config.data.bad_images=skip", "--config.total_steps=2"]) == 0
    assert "data check (fast): 1,798 images; 1 unreadable" in capsys.readouterr().err
    report = json.loads((workdir / check.TRAINING_REPORT).read_text())
    assert [u["file"] for u in report["unreadable"]] == [os.path.join(root, "train/9/zzz_last.png")]


def test_every_process_of_a_run_fails_alike_and_only_process_0_reports(digits_root, tmp_path):
    from test_distributed import _env, _free_port

    relative = "train/9/zzz_last.png"
    root = _digits_with(digits_root, tmp_path, relative, b"")
    paths = load_splits(_config_data(root))["train"].paths
    assert paths.index(os.path.join(root, relative)) % 2 == 1  # in process 1's shard: only gathering shows it to 0
    port = _free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "jaxclf.train", "--config", f"tests/tiny_config.py:{root}", "--workdir",
             str(tmp_path / "run"), "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
             "--process_id", str(i)],
            env={**_env(2), "PYTHONPATH": ENV["PYTHONPATH"]}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    errors = [p.communicate(timeout=SUBPROCESS_S)[1] for p in processes]
    failure = f"error: the data check (fast) found 1 unreadable images: {os.path.join(root, relative)}: empty file"
    for p, err in zip(processes, errors):
        assert p.returncode == 2 and failure in err, err
    assert "data check (fast): 1,798 images; 1 unreadable" in errors[0]
    assert "data check (fast)" not in errors[1].replace(failure, "")
    assert "compiling" not in errors[0] + errors[1]
