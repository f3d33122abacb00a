"""Inputs from object storage: an archive in a real S3 server (SeaweedFS), listed with
pagination by the producer and fetched by real workers; bad objects fail their own job naming
the URI; a listing that fails exits 3 before anything is registered."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import uuid

import pytest
from PIL import Image

from pixelmill.db.sources import S3Inputs
from pixelmill.producer.inputs import expand_inputs
from tests.conftest import pixelmill, pixelmill_env
from tests.services import free_port


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(out, format="JPEG", quality=95)
    return out.getvalue()


@pytest.fixture
def bucket(s3_server):
    name = "arch-" + uuid.uuid4().hex[:10]
    s3_server.create_bucket(name)
    return name


def _env(tmp_path, s3_server, **more: str) -> dict[str, str]:
    return pixelmill_env(
        data_dir=str(tmp_path / "data"),
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region=s3_server.region,
        s3_access_key_id=s3_server.access_key,
        s3_secret_access_key=s3_server.secret_key,
        **more,
    )


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_nightly_run_over_a_bucket_prefix(tmp_path, s3_server, bucket):
    s3 = s3_server.client()
    for i in range(5):
        s3.put_object(Bucket=bucket, Key=f"archive/day1/img{i}.jpg", Body=_jpeg((i * 40, 9, 9)))
    s3.put_object(Bucket=bucket, Key="archive/notes.txt", Body=b"not an image")
    s3.put_object(Bucket=bucket, Key="archive/.hidden.jpg", Body=_jpeg((1, 1, 1)))
    s3.put_object(Bucket=bucket, Key="archive-other/img.jpg", Body=_jpeg((2, 2, 2)))
    env = _env(tmp_path, s3_server)
    night = ("classify", f"s3://{bucket}/archive/", "--model", "null", "--json")

    first = pixelmill("run", *night, env=env)
    assert first.returncode == 0, first.stderr
    rows = _lines(first.stdout)
    assert [r["input"] for r in rows] == [
        f"s3://{bucket}/archive/day1/img{i}.jpg" for i in range(5)
    ]  # the original URIs, in key order; the .txt, the hidden file and the sibling not taken
    assert all(r["status"] == "done" and r["sha256"] and not r["reused"] for r in rows)
    sha = {r["input"].rsplit("/", 1)[1]: r["sha256"] for r in rows}

    # The next day: one object copied under a new key, one rewritten, one added.
    s3.copy_object(Bucket=bucket, Key="archive/day2/copy.jpg",
                   CopySource={"Bucket": bucket, "Key": "archive/day1/img0.jpg"})  # fmt: skip
    s3.put_object(Bucket=bucket, Key="archive/day1/img1.jpg", Body=_jpeg((200, 200, 0)))
    s3.put_object(Bucket=bucket, Key="archive/day2/new.jpg", Body=_jpeg((0, 200, 200)))
    plan = pixelmill("run", *night, "--plan", env=env)
    assert plan.returncode == 0, plan.stderr
    actions = {r["input"].split("/archive/")[1]: r["action"] for r in _lines(plan.stdout)}
    assert actions == {
        "day1/img0.jpg": "reused",
        "day1/img1.jpg": "changed",
        "day1/img2.jpg": "reused",
        "day1/img3.jpg": "reused",
        "day1/img4.jpg": "reused",
        "day2/copy.jpg": "reused",
        "day2/new.jpg": "new",
    }  # fmt: skip — the copy is known by its (ETag, size) without being fetched

    second = pixelmill("run", *night, env=env)
    assert second.returncode == 0, second.stderr
    rows = {r["input"].split("/archive/")[1]: r for r in _lines(second.stdout)}
    assert rows["day2/copy.jpg"]["reused"] and rows["day2/copy.jpg"]["sha256"] == sha["img0.jpg"]
    assert (
        not rows["day1/img1.jpg"]["reused"] and rows["day1/img1.jpg"]["sha256"] != sha["img1.jpg"]
    )
    assert not rows["day2/new.jpg"]["reused"] and rows["day2/new.jpg"]["sha256"]
    # The worker recorded what it fetched: the third night reads nothing and reuses all.
    third = pixelmill("run", *night, "--again", env=env)
    assert all(r["reused"] for r in _lines(third.stdout)), third.stdout


def test_bad_objects_fail_their_own_jobs_naming_the_uri(tmp_path, s3_server, bucket, redis_server,
                                                        start_worker):  # fmt: skip
    s3 = s3_server.client()
    for i in range(4):
        s3.put_object(Bucket=bucket, Key=f"in/ok{i}.jpg", Body=_jpeg((i * 50, 0, 0)))
    s3.put_object(Bucket=bucket, Key="in/corrupt.jpg", Body=b"\xff\xd8\xff" + b"\x00" * 100)
    s3.put_object(Bucket=bucket, Key="in/vanishes.jpg", Body=_jpeg((0, 0, 99)))
    env = _env(tmp_path, s3_server, broker_url=redis_server.url,
               database_url=f"sqlite:///{tmp_path / 'jobs.db'}")  # fmt: skip
    sub = pixelmill("submit", "classify", f"s3://{bucket}/in/", "--model", "null", "--json",
                    env=env)  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    batch = json.loads(sub.stdout)["batch"]
    s3.delete_object(Bucket=bucket, Key="in/vanishes.jpg")  # gone before a worker fetches it
    start_worker(env)
    status = pixelmill("status", batch, "--wait", "--json", env=env, timeout=180)
    counts = json.loads(status.stdout)
    assert (counts["done"], counts["failed"]) == (5, 1), counts  # null reads bytes, not pixels
    results = {r["input"]: r for r in _lines(pixelmill("results", batch, "--json", env=env).stdout)}
    gone = results[f"s3://{bucket}/in/vanishes.jpg"]
    assert gone["status"] == "failed"
    assert gone["error"].startswith(f"s3://{bucket}/in/vanishes.jpg: cannot fetch the object")
    assert "no such object" in gone["error"]


def test_a_corrupt_object_fails_naming_its_uri_with_a_real_decoder(tmp_path, s3_server, bucket):
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="p/good.jpg", Body=_jpeg((10, 200, 10)))
    s3.put_object(Bucket=bucket, Key="p/bad.jpg", Body=b"this is not an image")
    env = _env(tmp_path, s3_server)
    done = pixelmill("run", "classify", f"s3://{bucket}/p/", "--json", env=env)
    assert done.returncode == 1, done.stderr  # one job failed
    rows = {r["input"].rsplit("/", 1)[1]: r for r in _lines(done.stdout)}
    assert rows["good.jpg"]["status"] == "done" and rows["good.jpg"]["result"]["labels"]
    assert rows["bad.jpg"]["error"] == (
        f"s3://{bucket}/p/bad.jpg: not an image file (format not recognised)"
    )


@pytest.mark.parametrize("case", ["no bucket", "bad credentials", "endpoint down"])
def test_a_listing_that_fails_exits_3_before_anything_is_registered(tmp_path, s3_server, bucket,
                                                                    case):  # fmt: skip
    env = _env(tmp_path, s3_server, s3_timeout="2")
    uri = f"s3://{bucket}/x/"
    expected = {"no bucket": "no such bucket", "bad credentials": "bad credentials",
                "endpoint down": "did not answer"}[case]  # fmt: skip
    if case == "no bucket":
        uri = "s3://no-such-bucket-here/x/"
    elif case == "bad credentials":
        env["PIXELMILL_S3_SECRET_ACCESS_KEY"] = "wrong"
    else:
        env["PIXELMILL_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    done = pixelmill("run", "classify", uri, "--model", "null", env=env, timeout=120)
    assert done.returncode == 3, (done.returncode, done.stderr)
    assert f"cannot list {uri}" in done.stderr and expected in done.stderr, done.stderr
    db = tmp_path / "data" / "pixelmill.db"
    if db.exists():
        assert sqlite3.connect(db).execute("SELECT count(*) FROM jobs").fetchone() == (0,)


def test_listing_follows_pages(s3_server, bucket):
    s3 = s3_server.client()
    keys = [f"many/{i:05d}.jpg" for i in range(2503)]  # three pages of at most 1000
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    inputs = S3Inputs(client=s3)
    listed: dict = {}
    found = expand_inputs([f"s3://{bucket}/many/"], remote=inputs, listed=listed)
    assert found == [f"s3://{bucket}/{k}" for k in keys]
    assert all(listed[u].size == 1 and listed[u].etag for u in found)
    # One object named exactly is that object, whatever its extension.
    s3.put_object(Bucket=bucket, Key="one.bin", Body=b"xy")
    assert expand_inputs([f"s3://{bucket}/one.bin"], remote=inputs) == [f"s3://{bucket}/one.bin"]


def test_upload_lets_workers_without_the_folder_do_the_work(
    tmp_path, s3_server, bucket, redis_server, start_worker
):
    """`submit --upload` copies the local inputs into the S3 store by content; a worker that
    cannot see the folder (it is gone by the time the worker starts) fetches them from there;
    results name the original paths; the same bytes are never uploaded twice."""
    folder = tmp_path / "local"
    folder.mkdir()
    for i in range(4):
        (folder / f"p{i}.jpg").write_bytes(_jpeg((i * 60, 50, 50)))
    (folder / "same-as-p0.jpg").write_bytes((folder / "p0.jpg").read_bytes())
    env = _env(tmp_path, s3_server, broker_url=redis_server.url,
               database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
               store_url=f"s3://{bucket}/store")  # fmt: skip
    s3 = s3_server.client()

    def uploaded() -> list[str]:
        listing = s3.list_objects_v2(Bucket=bucket, Prefix="store/inputs/")
        return sorted(o["Key"] for o in listing.get("Contents", []))

    sub = pixelmill("submit", "classify", str(folder), "--upload", "--json", env=env)
    assert sub.returncode == 0, sub.stderr
    batch = json.loads(sub.stdout)["batch"]
    assert len(uploaded()) == 4  # five files, four contents
    hidden = tmp_path / "elsewhere"
    folder.rename(hidden)  # the worker's host has no such folder
    start_worker(env)
    status = pixelmill("status", batch, "--wait", "--json", env=env, timeout=240)
    assert json.loads(status.stdout)["done"] == 5, status.stdout
    rows = _lines(pixelmill("results", batch, "--json", env=env).stdout)
    assert sorted(r["input"] for r in rows) == sorted(
        str(folder / n) for n in ("p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg", "same-as-p0.jpg")
    )
    assert all(r["result"]["labels"] for r in rows)

    hidden.rename(folder)
    (folder / "p9.jpg").write_bytes(_jpeg((9, 99, 199)))
    again = pixelmill("submit", "classify", str(folder), "--upload", "--json", env=env)
    assert json.loads(again.stdout)["reused"] == 5
    assert len(uploaded()) == 5  # only the new content went up


def test_access_denied_on_one_object_fails_that_job_only(tmp_path, s3_server):
    """Credentials that may read one bucket: a list (on stdin) naming objects of it and one of
    another bucket; the other one fails, access denied, naming its URI; the rest are done."""
    from tests.services import S3_READABLE_BUCKET, S3_READER_KEY, S3_READER_SECRET

    s3 = s3_server.client()
    closed = "closed-" + uuid.uuid4().hex[:8]
    for name in (S3_READABLE_BUCKET, closed):
        with contextlib.suppress(Exception):  # the readable one may exist from another test
            s3_server.create_bucket(name)
    run_id = uuid.uuid4().hex[:8]
    uris = []
    for i in range(3):
        key = f"{run_id}/ok{i}.jpg"
        s3.put_object(Bucket=S3_READABLE_BUCKET, Key=key, Body=_jpeg((i * 70, 1, 1)))
        uris.append(f"s3://{S3_READABLE_BUCKET}/{key}")
    s3.put_object(Bucket=closed, Key="secret.jpg", Body=_jpeg((3, 3, 3)))
    uris.append(f"s3://{closed}/secret.jpg")
    env = _env(tmp_path, s3_server)
    env["PIXELMILL_S3_ACCESS_KEY_ID"] = S3_READER_KEY
    env["PIXELMILL_S3_SECRET_ACCESS_KEY"] = S3_READER_SECRET
    done = pixelmill("run", "classify", "-", "--model", "null", "--json", env=env,
                     input="\n".join(uris) + "\n")  # fmt: skip
    assert done.returncode == 1, done.stderr  # one job failed, the run finished
    rows = {r["input"]: r for r in _lines(done.stdout)}
    assert [rows[u]["status"] for u in uris] == ["done", "done", "done", "failed"]
    assert rows[uris[3]]["error"] == (
        f"s3://{closed}/secret.jpg: cannot fetch the object (access denied)"
    )


def test_uris_on_stdin_are_looked_up_like_arguments(tmp_path, s3_server, bucket):
    """A list of URIs on stdin: each object's (size, ETag) is looked up, so a rewritten object
    is changed (never the old result) and an unchanged one reused; a prefix is listed; a URI
    that names nothing fails its own job. The same missing URI as an argument is a typo: exit 2
    naming it."""
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="l/obj.jpg", Body=_jpeg((200, 0, 0)))
    s3.put_object(Bucket=bucket, Key="l/sub/x.jpg", Body=_jpeg((0, 200, 0)))
    env = _env(tmp_path, s3_server)
    listing = f"s3://{bucket}/l/obj.jpg\ns3://{bucket}/l/sub/\ns3://{bucket}/l/gone.jpg\n"
    first = pixelmill("run", "classify", "-", "--model", "null", "--json", env=env,
                      input=listing)  # fmt: skip
    assert first.returncode == 1, first.stderr  # gone.jpg failed
    rows = {r["input"].split("/l/")[1]: r for r in _lines(first.stdout)}
    assert set(rows) == {"obj.jpg", "sub/x.jpg", "gone.jpg"}
    assert rows["gone.jpg"]["status"] == "failed" and "no such object" in rows["gone.jpg"]["error"]

    s3.put_object(Bucket=bucket, Key="l/obj.jpg", Body=_jpeg((0, 0, 200)))  # rewritten
    plan = pixelmill("run", "classify", "-", "--model", "null", "--plan", "--json", env=env,
                     input=listing)  # fmt: skip
    actions = {r["input"].split("/l/")[1]: r["action"] for r in _lines(plan.stdout)}
    assert actions == {"obj.jpg": "changed", "sub/x.jpg": "reused", "gone.jpg": "new"}
    again = pixelmill("run", "classify", "-", "--model", "null", "--json", env=env,
                      input=listing)  # fmt: skip
    rows2 = {r["input"].split("/l/")[1]: r for r in _lines(again.stdout)}
    assert "made before" not in again.stderr
    assert (
        not rows2["obj.jpg"]["reused"] and rows2["obj.jpg"]["sha256"] != rows["obj.jpg"]["sha256"]
    )

    typo = pixelmill("run", "classify", f"s3://{bucket}/l/nope.jpg", "--model", "null", env=env)
    assert typo.returncode == 2 and f"s3://{bucket}/l/nope.jpg: no such object" in typo.stderr
