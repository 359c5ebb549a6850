"""`ftlab serve` as a real process on a free port, called over HTTP: the answers are `ftlab predict`'s, concurrent
requests are batched, every bad request gets its 4xx and the next is served, SIGTERM drains and exits 143."""

from __future__ import annotations

import base64
import contextlib
import csv
import http.client
import json
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lightning_modules.cli.main import cli_main
from lightning_modules.cli.serve import serve_main
from lightning_modules.serving import client
from lightning_modules.serving.client import ServerProcess
from tests.helpers import REPO
from tests.helpers.data import image_exif, photo, write_class_folders
from tests.helpers.runs import folder_args
from tests.helpers.serving import jpeg_bytes, png_header

CLASSES = ["cat", "Dog", "fox"]


def write_inbox(inbox: Path) -> None:
    """New photos in the formats a server gets: JPEG (TorchCodec), PNG, grayscale, and EXIF-rotated (PIL)."""
    inbox.mkdir(parents=True)
    for seed in range(4):
        photo(100 + seed, (48, 36)).save(inbox / f"plain_{seed}.jpg")
    photo(110, (30, 44)).save(inbox / "tall.png")
    photo(111, (40, 30), "L").save(inbox / "gray.jpg")
    photo(112, (50, 30)).save(inbox / "rotated.jpg", exif=image_exif(6))
    photo(113, (40, 40), "RGBA").save(inbox / "alpha.png")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 3-class folder model (28 px, a tiny timm backbone), its timm folder, new photos and `ftlab predict`'s
    probabilities for them, by file name."""
    root = tmp_path_factory.mktemp("serve")
    (root / "experiments").symlink_to(REPO / "experiments")
    write_class_folders(root / "imgs", dict.fromkeys(CLASSES, 5))
    write_inbox(root / "inbox" / "new")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        args = [*folder_args(root / "imgs", batch_size=4), "--model.image_size=28", "--trainer.max_epochs=1"]
        fit = cli_main(["fit", *args])
        ckpt = Path(fit.trainer.checkpoint_callback.best_model_path).resolve()  # type: ignore[union-attr]
        predicted = cli_main(["predict", "--ckpt_path", str(ckpt), f"--data.init_args.predict_root={root / 'inbox'}"])
        csv_path = Path(str(predicted.trainer.log_dir)) / "predictions.csv"
    with csv_path.open() as f:
        expected = {Path(r["path"]).name: [float(r[f"prob_{c}"]) for c in CLASSES] for r in csv.DictReader(f)}
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from export import export_timm, load_model
    finally:
        sys.path.pop(0)
    export_timm(load_model(ckpt), root / "timm", ckpt.parent.parent, "me/tiny")
    shutil.rmtree(root / "imgs")  # the server has the model alone
    return {"root": root, "ckpt": ckpt, "timm": root / "timm", "inbox": root / "inbox" / "new", "expected": expected}


@pytest.fixture(scope="module")
def servers(model: dict[str, Any]) -> Iterator[dict[str, ServerProcess]]:
    """One server of the checkpoint (one worker, batches that wait 50 ms for more), one of the timm folder (the
    defaults: a worker per core), started together: most of a start is imports."""
    root = model["root"]
    started: dict[str, ServerProcess] = {}
    try:
        options = ("--max_batch_size=8", "--batch_timeout=0.05", "--workers_per_device=1")
        started["ckpt"] = client.start_server(model["ckpt"], root / "ckpt.log", *options, cwd=root)
        started["timm"] = client.start_server(model["timm"], root / "timm.log", cwd=root)
        yield {kind: server.wait_ready() for kind, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ckpt", "timm"])
def test_answers_equal_ftlab_predict(model: dict[str, Any], servers: dict[str, ServerProcess], kind: str) -> None:
    server = servers[kind]
    for name, expected in model["expected"].items():
        for as_json in (False, True):
            answer = client.predict(server.url, model["inbox"] / name, as_json=as_json)
            assert answer["classes"] == CLASSES
            assert answer["probabilities"] == pytest.approx(expected, abs=1e-5), name
            assert answer["top"] == CLASSES[max(range(3), key=expected.__getitem__)]
            assert answer["model"] and len(answer["version"]) == 12
    with client.urllib.request.urlopen(f"{server.url}/info") as response:
        info = json.loads(response.read())["model"]
    assert info["classes"] == CLASSES and info["backbone"].startswith("timm/") and info["engine"] == "torch"
    assert info["preprocessing"]["size"] == [28, 28] and len(info["preprocessing"]["mean"]) == 3


@pytest.mark.slow
def test_32_concurrent_requests_are_answered_in_batches(
    model: dict[str, Any], servers: dict[str, ServerProcess]
) -> None:
    server = servers["ckpt"]
    files = sorted(model["expected"])
    with ThreadPoolExecutor(32) as pool:
        answers = list(
            pool.map(lambda i: client.predict(server.url, model["inbox"] / files[i % len(files)]), range(32))
        )
    for i, answer in enumerate(answers):
        assert answer["probabilities"] == pytest.approx(model["expected"][files[i % len(files)]], abs=1e-5)
    sizes = [
        int(line.split("batch of ")[1].split()[0]) for line in server.log_text().splitlines() if "batch of" in line
    ]
    assert max(sizes) > 1, sizes


def bad_requests() -> list[tuple[str, bytes, str | None, int, str]]:
    """(what, body, content type, status, words of the answer) for each way a request can be wrong."""
    good = jpeg_bytes(7)
    form = client.multipart
    return [
        ("not an image", *form("image", "notes.txt", b"hello, not a photo"), 400, "not an image"),
        ("empty body", b"", "application/json", 400, "empty body"),
        ("empty file", *form("image", "empty.jpg", b""), 400, "empty image"),
        ("truncated JPEG", *form("image", "cut.jpg", good[: len(good) // 2]), 400, "truncated"),
        ("decompression bomb", *form("image", "bomb.png", png_header(20_000, 20_000)), 413, "decompression-bomb"),
        ("wrong content type", good, "image/jpeg", 415, "content type 'image/jpeg' is not accepted"),
        ("a form, not multipart", good, "application/x-www-form-urlencoded", 415, "x-www-form-urlencoded' is not"),
        ("JSON without the key", json.dumps({"picture": "abc"}).encode(), "application/json", 400, "no key 'image'"),
        ("JSON that does not parse", b'{"image": ', "application/json", 400, "not valid JSON"),
        ("not base64", json.dumps({"image": "@@@"}).encode(), "application/json", 400, "not valid base64"),
        ("form without the field", *form("photo", "a.jpg", good), 400, "no field 'image'"),
    ]


@pytest.mark.slow
def test_every_bad_request_gets_its_4xx_and_the_next_is_served(
    model: dict[str, Any], servers: dict[str, ServerProcess]
) -> None:
    server = servers["ckpt"]
    good = jpeg_bytes(8)
    for what, body, content_type, status, words in bad_requests():
        before = server.log_text().count("rejected request")
        got, answer = client.post(f"{server.url}/predict", body, content_type)
        assert (got, words.lower() in answer.get("detail", "").lower()) == (status, True), (what, got, answer)
        assert client.predict(server.url, good)["top"] in CLASSES, what  # served right after
        assert server.log_text().count("rejected request") == before + 1, what  # logged once
    mixed = [(b"not an image", False), (good, True)] * 8  # a bad request batched with good ones fails alone
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(
            pool.map(lambda item: client.post(f"{server.url}/predict", *client.multipart("image", "x", item[0])), mixed)
        )
    assert [status for status, _ in outcomes] == [200 if ok else 400 for _, ok in mixed]


def awaiting_accept(port: int) -> int:
    """How many connections to `port` the kernel holds that the server has not accepted yet: the accept queue of its
    listening sockets (for a socket in LISTEN, /proc/net/tcp's rx_queue is that queue's length)."""
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                waiting += int(queues.split(":")[1], 16)
    return waiting


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the accept queue from Linux's /proc/net/tcp")
def test_sigterm_during_a_burst_answers_every_request_and_exits_143(
    model: dict[str, Any], servers: dict[str, ServerProcess]
) -> None:
    server = servers["timm"]  # the last test of the module: this server ends here
    port = int(server.url.rsplit(":", 1)[1])
    body = json.dumps({"image": base64.b64encode(jpeg_bytes(9)).decode()})
    sent = threading.Barrier(33)

    def request() -> int:
        """One request sent whole, then (once every request is out) its answer's status."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/predict", body, {"Content-Type": "application/json"})
        sent.wait(30)
        with contextlib.closing(connection):
            return connection.getresponse().status

    batches = server.log_text().count("batch of")
    with ThreadPoolExecutor(32) as pool:
        pending = [pool.submit(request) for _ in range(32)]
        sent.wait(30)  # every request is out: its connection is accepted or in the kernel's accept queue
        deadline = time.monotonic() + 30
        while (awaiting_accept(port) or server.log_text().count("batch of") == batches) and time.monotonic() < deadline:
            time.sleep(0.005)  # SIGTERM once the server holds every request and is answering them: all in flight
        assert awaiting_accept(port) == 0, "the server did not accept the 32 connections in 30 s"
        server.process.send_signal(signal.SIGTERM)
        statuses = [future.result() for future in pending]
    assert statuses == [200] * 32
    assert server.process.wait(60) == 143
    assert "finishing the requests in flight" in server.log_text()


def test_a_model_that_cannot_load_is_one_line_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint at all")
    folder = tmp_path / "not_timm"
    folder.mkdir()
    cases = [
        ([str(broken)], "broken.ckpt cannot be read"),
        ([str(folder)], "is not a timm folder"),
        ([str(tmp_path / "no.ckpt")], "does not exist"),
        (["best", "--runs", str(tmp_path / "runs")], "no run under"),
    ]
    for given, words in cases:
        assert serve_main(["--ckpt_path", *given, "--port", "8123"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ftlab: error:") and words in err[0], err
