"""Labels in the user's words, from the command line: every bad input refused at submit (exit 2,
nothing registered); then, through real workers on SQLite and PostgreSQL, `pixelmill search`
(text, --image, scopes, each input once), `pixelmill classify --from-embeddings` (the same
scores as classifying the images) and the dashboard's search API."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sqlalchemy import func, select

from pixelmill.db.embeddings import from_bytes
from pixelmill.db.engine import make_engine, make_sessionmaker
from pixelmill.db.schema import Batch, Embedding, Job
from pixelmill.errors import InputError
from pixelmill.models.registry import BUILTIN_NAMES, create_runner
from pixelmill.producer.client import with_labels
from pixelmill.revisions import BUILTIN_DUAL_ENCODERS, BUILTIN_OTHERS, dual_encoder
from tests.conftest import MANY_PROCESSES, pixelmill, pixelmill_env
from tests.services import free_port
from tests.tiny_models import build_tiny_clip, build_tiny_vit_classifier

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30), "black": (5, 5, 5), "white": (250, 250, 250)}  # fmt: skip
LABELS = "a red photo,a green photo,a blue photo"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def _photos(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, rgb in COLOURS.items():
        img = Image.new("RGB", (48, 40), rgb)
        img.paste((255 - rgb[0], rgb[1], 255 - rgb[2]), (0, 0, 16, 16))  # not all flat
        img.save(folder / f"{name}.png")
        out[name] = folder / f"{name}.png"
    return out


def _batches(url: str) -> int:
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            return int(session.scalar(select(func.count()).select_from(Batch)) or 0)
    finally:
        engine.dispose()


# ---- refused at submit ------------------------------------------------------------------------


def test_builtin_names_are_known_without_torch():
    """The producer tells built-in models apart without importing them: its lists must name
    every built-in the registry has."""
    assert set(BUILTIN_NAMES) == BUILTIN_DUAL_ENCODERS | BUILTIN_OTHERS
    assert dual_encoder("clip_vit_b32_random") is True
    assert dual_encoder("efficientnet_lite0") is False
    assert dual_encoder("someone/not-cached-here") is None


def test_labels_keywords_merge_into_options():
    assert with_labels(None, ["a", "b"], None) == {"labels": ["a", "b"]}
    assert with_labels({"batch_size": 4}, None, ["x {}"]) == {
        "batch_size": 4,
        "templates": ["x {}"],
    }
    with pytest.raises(InputError, match="labels given twice"):
        with_labels({"labels": ["a"]}, ["b"], None)


@pytest.mark.parametrize(
    ("task", "args", "says"),
    [
        ("classify", ["--labels", ","], "--labels: the label list is empty"),
        ("classify", ["--labels", "a cat, a cat"], "label 'a cat' is given twice"),
        ("classify", ["--labels-file", "{missing}"], "cannot read the labels file"),
        ("classify", ["--labels-file", "{empty}"], "the labels file holds no label"),
        ("classify", ["--labels", "a", "--template", "no slot"], "exactly one {}"),
        ("classify", ["--labels", "a", "--template", "{} and {}"], "exactly one {}"),
        ("classify", ["--template", "a {}"], "--template applies to zero-shot labels only"),
        ("classify", ["--labels", "a,b", "--model", "efficientnet_lite0"],
         "'efficientnet_lite0' is not a CLIP-style dual encoder"),
        ("classify", ["--labels", "a,b", "--model", "{vit}"], "is not a CLIP-style dual encoder"),
        ("classify", ["--model", "{clip}"], "is a CLIP-style dual encoder: give the labels"),
        ("caption", ["--labels", "a,b"], "--labels and --labels-file are for classify"),
        ("embed", ["--model", "efficientnet_lite0"], "embed needs one"),
        ("embed", ["--template", "a {}"], "--template is for classify"),
    ],
)  # fmt: skip
def test_bad_labels_are_refused_at_submit(task, args, says, tmp_path, tiny_clip):
    folder = tmp_path / "photos"
    _photos(folder)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n   \n")
    vit = build_tiny_vit_classifier(tmp_path / "vit")
    paths = {"missing": str(tmp_path / "nope.txt"), "empty": str(empty), "vit": str(vit),
             "clip": str(tiny_clip)}  # fmt: skip
    env = pixelmill_env(data_dir=str(tmp_path / "data"))
    typed = [paths.get(a.strip("{}"), a) if a.startswith("{") and a.endswith("}") else a
             for a in args]  # fmt: skip
    done = pixelmill("submit", task, str(folder), *typed, env=env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line, no traceback
    db = tmp_path / "data" / "pixelmill.db"
    assert not db.exists() or _batches(f"sqlite:///{db}") == 0  # nothing registered


# ---- search and relabel through real workers -------------------------------------------------


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
@MANY_PROCESSES
def test_search_and_relabel(database_url, tmp_path, redis_server, start_worker, spawn,
                            tiny_clip):  # fmt: skip
    photos = _photos(tmp_path / "photos" / "a")
    more = _photos(tmp_path / "photos" / "b")  # the same pictures under another folder
    env = pixelmill_env(data_dir=str(tmp_path / "data"), database_url=database_url,
                        broker_url=redis_server.url)  # fmt: skip
    start_worker(env)
    common = ("--model", str(tiny_clip), "--json", "--no-local-workers", "--timeout", "120")

    embedded = pixelmill("run", "embed", str(tmp_path / "photos"), *common, env=env)
    assert embedded.returncode == 0, embedded.stderr
    jobs = {r["input"]: r for r in _json_lines(embedded.stdout)}
    assert len(jobs) == 12
    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as session:
        embed_batch = session.get(Job, next(iter(jobs.values()))["job"]).batch_id
        stored = {
            job.input: from_bytes(vec)
            for job, vec in session.execute(
                select(Job, Embedding.vector).join(Embedding, Embedding.job_id == Job.id)
            )
        }
    engine.dispose()

    # Export: the vectors as a fixed-size float32 list column (Parquet), a list (JSON lines).
    exported = pixelmill("export", embed_batch, "-o", str(tmp_path / "e.parquet"), env=env)
    assert exported.returncode == 0, exported.stderr
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    for path, vector in zip(table.column("input").to_pylist(),
                            table.column("embedding").to_pylist(), strict=True):  # fmt: skip
        assert vector == stored[path].tolist()
    lines = _json_lines(pixelmill("export", embed_batch, "-o", "-", "-f", "jsonl", env=env).stdout)
    assert all(row["embedding"] == stored[row["input"]].tolist() for row in lines)

    # Text search: the nearest by cosine, best first, scores as computed here independently.
    runner = create_runner("embed", str(tiny_clip))
    runner.load("cpu")
    query = runner.embed_texts(["a red photo"])[0]
    found = pixelmill("search", "a red photo", "--limit", "5", "--json", env=env)
    assert found.returncode == 0, found.stderr
    hits = _json_lines(found.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    expected = sorted(((float(v @ query), p) for p, v in stored.items()), reverse=True)
    assert hits[0]["score"] == pytest.approx(expected[0][0], abs=1e-5)
    for hit in hits:
        assert hit["score"] == pytest.approx(float(stored[hit["input"]] @ query), abs=1e-5)
        assert hit["batch_id"] == embed_batch

    # By example: the image itself first (score 1); its twin under b/ is the same picture.
    example = pixelmill("search", "--image", str(photos["blue"]), "--json", "--limit", "2",
                        env=env)  # fmt: skip
    assert example.returncode == 0, example.stderr
    top = _json_lines(example.stdout)
    assert {top[0]["input"], top[1]["input"]} == {str(photos["blue"]), str(more["blue"])}
    assert top[0]["score"] == pytest.approx(1.0, abs=1e-5)

    # Scope: --source keeps to a folder.
    scoped = pixelmill("search", "a photo", "--source", str(tmp_path / "photos" / "a") + "/",
                       "--json", "--limit", "50", env=env)  # fmt: skip
    assert {h["input"] for h in _json_lines(scoped.stdout)} == {str(p) for p in photos.values()}

    # The same inputs embedded again in another batch: each input still appears once.
    again = pixelmill("run", "embed", str(tmp_path / "photos"), "--again", *common, env=env)
    assert again.returncode == 0, again.stderr
    every = _json_lines(pixelmill("search", "a photo", "--json", "--limit", "100", env=env).stdout)
    assert len(every) == 12 and len({h["input"] for h in every}) == 12

    # Refusals: one line, exit 2.
    for args, says in [
        ((), "give a search text or --image"),
        (("   ",), "the search text is empty"),
        (("a", "--image", str(photos["red"])), "give a search text or --image"),
        (("a", "--batch", "no-such-batch"), "no batch with id"),
        (("a", "--limit", "0"), "--limit must be"),
        (("a", "--batch", embed_batch, "--source", "/x"), "not both"),
        (("a", "--model", "someone/other"), "were embedded with model 'someone/other'; run"),
        (("a", "--source", "/nothing/here/"), "no images in inputs under '/nothing/here/'"),
        (("--image", str(tmp_path / "nope.png")), "nope.png: no such file"),
    ]:
        refused = pixelmill("search", *args, env=env)
        assert refused.returncode == 2 and says in refused.stderr, (args, refused.stderr)

    # Relabel from the stored vectors == zero-shot classify of the images themselves.
    relabelled = pixelmill("classify", "--labels", LABELS, "--from-embeddings", embed_batch,
                           "--json", env=env)  # fmt: skip
    assert relabelled.returncode == 0, relabelled.stderr
    assert "12 images relabelled" in relabelled.stderr
    from_vectors = {r["input"]: r["result"]["labels"] for r in _json_lines(relabelled.stdout)}
    direct = pixelmill("run", "classify", str(tmp_path / "photos"), "--labels", LABELS,
                       "--force", *common, env=env)  # fmt: skip
    assert direct.returncode == 0, direct.stderr
    from_images = {r["input"]: r["result"]["labels"] for r in _json_lines(direct.stdout)}
    assert from_vectors.keys() == from_images.keys() and len(from_vectors) == 12
    for name, labels in from_images.items():
        assert [x["label"] for x in from_vectors[name]] == [x["label"] for x in labels]
        for mine, theirs in zip(from_vectors[name], labels, strict=True):
            assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)
    # ... and it is a batch like any other, reused by a later zero-shot run of the same labels.
    new_batch = relabelled.stderr.split("batch ", 1)[1].split(":", 1)[0]
    shown = pixelmill("results", new_batch, "--json", env=env)
    assert shown.returncode == 0 and len(_json_lines(shown.stdout)) == 12
    reused = pixelmill("run", "classify", str(photos["red"]), "--labels", LABELS, "--again",
                       *common, env=env)  # fmt: skip
    assert "1 reused" in reused.stderr, reused.stderr
    not_embed = pixelmill("classify", "--labels", "a,b", "--from-embeddings", new_batch, env=env)
    assert not_embed.returncode == 2 and "takes an embed batch" in not_embed.stderr

    # The dashboard's search box answers through the same code.
    port = free_port()
    spawn("dashboard", "--port", str(port), env=env)
    deadline = time.monotonic() + 60
    while True:
        try:
            status, body = _get(f"http://127.0.0.1:{port}/api/search?q=a+red+photo&limit=3")
            break
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "the dashboard did not start"
            time.sleep(0.3)
    assert status == 200 and len(body["hits"]) == 3
    assert body["hits"][0]["score"] == pytest.approx(hits[0]["score"], abs=1e-5)
    status, body = _get(f"http://127.0.0.1:{port}/api/search?q=")
    assert status == 400 and "empty" in body["error"]
