"""mlx-aim index / search: incremental indexing, crash safety, search, duplicates, the CLI."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from image_corpus import noise
from index_helpers import (
    PHOTOS,
    FakeEncoder,
    resized_copy,
    save_tiny_lit,
    save_tiny_model,
    tiny_png,
    write_photos,
)
from mlx_aim_cli.main import app
from typer.testing import CliRunner

import mlx_aim
from mlx_aim.checkpoints.registry import LIT_NAME
from mlx_aim.errors import InputError, OutputError
from mlx_aim.index import Index, default_db
from mlx_aim.index.cache import cache_path
from mlx_aim.index.query import combine, parse_terms, scores, similar_pairs, top_k
from mlx_aim.index.scan import HashingOpener
from mlx_aim.index.store import Store, WriterLock
from mlx_aim.tasks.embed import embed_images, embed_texts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture
def photos(tmp_path):
    """A folder of photographs plus a resized, re-encoded copy of one of them."""
    folder = tmp_path / "photos"
    paths = write_photos(folder)
    copy = resized_copy(folder / "coffee.jpg", folder / "coffee-small.jpg")
    return folder, paths, copy


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line]


def index(folder, model_dir, db, *extra):
    result = run("index", folder, "--model", model_dir, "--db", db, "--json", "-q", *extra)
    assert result.exit_code in (0, 4), result.output
    return json.loads(lines(result.stdout)[-1])


def test_index_adds_every_photo_and_search_by_photo_finds_it_and_its_resized_copy(
    photos, model_dir, tmp_path
):
    folder, paths, copy = photos
    db = tmp_path / "photos.sqlite"
    summary = index(folder, model_dir, db)
    assert summary["added"] == len(paths) + 1 == summary["total"]
    result = run("search", folder / "coffee.jpg", "--db", db, "-k", "3", "-q")
    assert result.exit_code == 0, result.output
    found = lines(result.stdout)
    assert found[0] == str(folder / "coffee.jpg")
    assert str(copy) in found[:3]


def test_duplicates_lists_the_resized_copy_first(photos, model_dir, tmp_path):
    folder, _, copy = photos
    db = tmp_path / "photos.sqlite"
    index(folder, model_dir, db)
    result = run("search", "--duplicates", "--db", db, "--json", "-q")
    assert result.exit_code == 0, result.output
    pairs = [json.loads(line) for line in lines(result.stdout)]
    assert set(pairs[0]["paths"]) == {str(folder / "coffee.jpg"), str(copy)}
    assert pairs[0]["similarity"] >= max(p["similarity"] for p in pairs)
    plain = run("search", "--duplicates", "--db", db, "-q")
    assert lines(plain.stdout)[0].split("\t")[1:] == pairs[0]["paths"]


def test_rerun_embeds_only_changes_two_added_one_removed_rest_unchanged(
    photos, model_dir, tmp_path
):
    folder, paths, _ = photos
    db = tmp_path / "photos.sqlite"
    first = index(folder, model_dir, db)
    write_photos(folder / "new", ["coins", "page"])
    paths[0].unlink()
    second = index(folder, model_dir, db)
    assert second == {
        "added": 2,
        "updated": 0,
        "removed": 1,
        "unchanged": first["total"] - 1,
        "moved": 0,
        "failed": 0,
        "total": first["total"] + 1,
        "db": str(db),
    }
    assert index(folder, model_dir, db)["unchanged"] == second["total"]


def test_a_changed_file_is_updated_and_a_touched_one_is_not(photos, model_dir, tmp_path):
    folder, paths, _ = photos
    db = tmp_path / "photos.sqlite"
    index(folder, model_dir, db)
    noise(64, 48, seed=5).save(paths[1], "JPEG")  # new content, same name
    os.utime(paths[2], ns=(1, 1))  # new mtime, same content
    summary = index(folder, model_dir, db)
    assert (summary["updated"], summary["added"], summary["removed"]) == (1, 0, 0)
    assert index(folder, model_dir, db)["unchanged"] == summary["total"]


def test_a_moved_file_keeps_its_entry_and_a_copy_reuses_its_vector(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    files = [tiny_png(folder / f"{i}.png", i) for i in range(5)]
    encoder = FakeEncoder()
    db = Index(tmp_path / "i.sqlite", model=encoder)
    assert db.add(folder).added == 5 and len(encoder.embedded) == 5
    (folder / "sub").mkdir()
    files[0].rename(folder / "sub" / "moved.png")
    (folder / "copy.png").write_bytes(files[1].read_bytes())
    summary = db.add(folder)
    assert (summary.moved, summary.added, summary.removed, summary.total) == (1, 1, 0, 6)
    assert len(encoder.embedded) == 5  # nothing embedded again
    hits = db.search(folder / "sub" / "moved.png", k=1)
    assert hits[0].path == str(folder / "sub" / "moved.png") and hits[0].score > 0.999


def test_kill_9_while_indexing_400_images_then_rerun_has_exactly_400(model_dir, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(400):
        noise(160, 120, seed=i).save(folder / f"{i:03d}.png")
    db = tmp_path / "many.sqlite"
    command = [sys.executable, "-m", "mlx_aim_cli.main", "index", str(folder)]
    command += ["--model", str(model_dir), "--db", str(db), "-b", "4", "--workers", "1", "-q"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    committed = 0
    while process.poll() is None and committed < 20:
        time.sleep(0.01)
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=1) as con:
                    committed = con.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            except sqlite3.Error:
                pass  # not created yet
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "finished before it could be killed"
    with sqlite3.connect(db) as con:
        left = con.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    assert 20 <= left < 400
    summary = index(folder, model_dir, db, "-b", "4")
    assert summary["total"] == 400 and summary["added"] == 400 - left
    assert summary["unchanged"] == left


def test_a_second_writer_exits_3_naming_the_holder(photos, model_dir, tmp_path):
    folder, _, _ = photos
    db = tmp_path / "photos.sqlite"
    with WriterLock(db):
        result = run("index", folder, "--model", model_dir, "--db", db, "-q")
    assert result.exit_code == 3
    assert f"pid {os.getpid()}" in result.output and str(db) in result.output


def test_a_damaged_database_is_named_with_how_to_rebuild_it(photos, model_dir, tmp_path):
    folder, _, _ = photos
    db = tmp_path / "photos.sqlite"
    index(folder, model_dir, db)
    with db.open("r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 3000)  # the schema page, after an intact SQLite header
    for args in (("index", folder, "--model", model_dir), ("search", "cat")):
        result = run(*args, "--db", db, "-q")
        assert result.exit_code == 1
        assert str(db) in result.output and "damaged" in result.output
        assert "rebuild" in result.output


def test_a_db_that_is_not_sqlite_is_refused_untouched_never_with_advice_to_delete_it(
    photos, model_dir, tmp_path
):
    folder, _, _ = photos
    db = tmp_path / "thesis.txt"
    db.write_bytes(b"this is not a database" * 100)
    for args in (("index", folder, "--model", model_dir), ("search", "cat")):
        result = run(*args, "--db", db, "-q")
        assert result.exit_code == 1, result.output
        assert (
            result.output
            == f"error: {db}: not an mlx-aim index (not an SQLite database); give another --db\n"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "thesis.txt"]
    assert db.read_bytes() == b"this is not a database" * 100


def test_a_db_inside_the_model_folder_is_refused(photos, model_dir, tmp_path):
    folder, _, _ = photos
    model = shutil.copytree(model_dir, tmp_path / "model")
    result = run("index", folder, "--model", model, "--db", model / "i.sqlite", "-q")
    assert result.exit_code == 3, result.output
    assert "which this command reads" in result.output and not (model / "i.sqlite").exists()


def test_refuses_to_mix_models_in_one_database(photos, model_dir, tmp_path):
    folder, _, _ = photos
    db = tmp_path / "photos.sqlite"
    index(folder, model_dir, db)
    other = save_tiny_model(tmp_path / "other", seed=1)
    result = run("index", folder, "--model", other, "--db", db, "-q")
    assert result.exit_code == 1 and "another --db" in result.output
    assert run("search", folder / "coffee.jpg", "--db", db, "--model", other).exit_code == 1


def test_unreadable_files_are_named_once_and_retried_on_the_next_run(photos, model_dir, tmp_path):
    folder, paths, _ = photos
    db = tmp_path / "photos.sqlite"
    broken = folder / "broken.jpg"
    broken.write_bytes(paths[0].read_bytes()[:300])
    result = run("index", folder, "--model", model_dir, "--db", db, "-q")
    assert result.exit_code == 4 and result.output.count(str(broken)) == 1
    again = run("index", folder, "--model", model_dir, "--db", db, "-q", "--json")
    assert again.exit_code == 4 and again.output.count(str(broken)) == 1
    broken.write_bytes(paths[0].read_bytes())
    assert index(folder, model_dir, db)["added"] == 1


def test_an_image_rewritten_while_read_is_refused_and_left_for_the_next_run(tmp_path, monkeypatch):
    image = tiny_png(tmp_path / "a.png", 0)
    opener = HashingOpener()
    real_stat, calls = os.stat, []

    def stat(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second look, after reading: a newer mtime
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            return real_stat(path, *args, **kwargs)
        return st

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(Exception, match="changed while it was read"):
        opener(image)
    assert opener.entries == {}


def test_paths_with_newlines_unicode_and_spaces(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    names = ["line\nbreak.png", "été 日本.png", "with  spaces .png", "tab\there.png"]
    files = [tiny_png(folder / n, i) for i, n in enumerate(names)]
    db = Index(tmp_path / "i.sqlite", model=FakeEncoder())
    assert db.add([folder]).added == 4
    for file in files:
        assert db.search(file, k=1)[0].path == str(file)
    result = run("search", files[0], "--db", tmp_path / "i.sqlite", "--json", "-k", "4")
    # the CLI loads the recorded model ("fake"), which does not exist: a one-line error
    assert result.exit_code == 1 and "fake" in result.output
    files[0].unlink()
    assert db.add([folder]).removed == 1


def test_search_dir_restricts_the_results_to_a_folder(photos, model_dir, tmp_path):
    folder, _, _ = photos
    write_photos(folder / "sub", ["coins", "page"])
    write_photos(tmp_path / "photos-2", ["text"])
    db = tmp_path / "photos.sqlite"
    index(folder, model_dir, db)
    index(tmp_path / "photos-2", model_dir, db)
    query = folder / "coffee.jpg"
    result = run("search", query, "--db", db, "--dir", folder / "sub", "--json", "-q")
    found = [json.loads(line)["path"] for line in lines(result.stdout)]
    assert sorted(found) == [str(folder / "sub" / "coins.jpg"), str(folder / "sub" / "page.jpg")]
    result = run("search", query, "--db", db, "--dir", folder, "-k", "100", "-q")
    assert str(tmp_path / "photos-2" / "text.jpg") not in result.stdout


def test_bookkeeping_of_a_few_thousand_files_needs_no_second_read(tmp_path):
    folder = tmp_path / "big"
    for i in range(3000):
        sub = folder / f"{i // 500}"
        sub.mkdir(parents=True, exist_ok=True)
        tiny_png(sub / f"{i}.png", i)
    encoder = FakeEncoder()
    db = Index(tmp_path / "i.sqlite", model=encoder)
    assert db.add(folder).added == 3000
    summary = db.add(folder)
    assert (summary.unchanged, summary.total, len(encoder.embedded)) == (3000, 3000, 3000)


def test_html_contact_sheet_is_self_contained(photos, model_dir, tmp_path):
    folder, _, _ = photos
    db = tmp_path / "photos.sqlite"
    index(folder, model_dir, db)
    sheet = tmp_path / "results.html"
    result = run("search", folder / "rocket.jpg", "--db", db, "-k", "4", "--html", sheet, "-q")
    assert result.exit_code == 0, result.output
    page = sheet.read_text()
    assert page.count('src="data:image/jpeg;base64,') == 4
    assert "rocket.jpg" in page and "1.000" in page and 'src="http' not in page


def test_text_queries_with_a_tiny_lit_model_rank_by_cosine_in_the_shared_space(tmp_path):
    pytest.importorskip("tokenizers")
    folder = tmp_path / "photos"
    paths = write_photos(folder, PHOTOS[:5])
    lit = save_tiny_lit(tmp_path / "lit")
    db = tmp_path / "lit.sqlite"
    assert index(folder, lit, db)["added"] == 5
    result = run("search", "--db", db, "--json", "-q", "-k", "5", "--", "a photo", "-0.5:cat")
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in lines(result.stdout)]
    model = mlx_aim.load(lit)
    texts = embed_texts(model, ["a photo", "cat"], normalize=True)
    query = combine(texts, [1.0, -0.5])
    images = embed_images(model, paths, normalize=True)  # LiT: the projection pooling
    expected = images @ query
    order = np.argsort(-expected)
    assert [h["path"] for h in hits] == [str(paths[i]) for i in order]
    np.testing.assert_allclose([h["score"] for h in hits], expected[order], atol=2e-3)


def test_text_queries_need_a_lit_model(photos, model_dir, tmp_path):
    folder, _, _ = photos
    db = tmp_path / "photos.sqlite"
    index(folder, model_dir, db)
    result = run("search", "a red boat", "--db", db)
    assert result.exit_code == 1 and "LiT" in result.output


# ---- queries -----------------------------------------------------------------------------------


def test_query_terms_take_signs_and_weights_like_rclip(tmp_path):
    image = tiny_png(tmp_path / "sunset.png", 0)
    terms = parse_terms(["beach", "+" + str(image), "-people", "2:golden retriever", "-", "dog"])
    assert [(t.weight, t.text, t.image) for t in terms] == [
        (1.0, "beach", None),
        (1.0, None, image),
        (-1.0, "people", None),
        (2.0, "golden retriever", None),
        (-1.0, "dog", None),
    ]
    with pytest.raises(InputError, match="missing.jpg"):
        parse_terms(["missing.jpg"])
    with pytest.raises(InputError, match="positive"):
        parse_terms(["-people"])


def test_combined_query_is_the_renormalised_weighted_sum_of_unit_vectors():
    a, b = np.array([3.0, 0, 0]), np.array([0, 0.5, 0])
    expected = np.array([1.0, -2.0, 0]) / np.sqrt(5)
    np.testing.assert_allclose(combine(np.stack([a, b]), [1.0, -2.0]), expected, rtol=1e-6)


def test_exact_search_matches_brute_force_in_chunks():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((1000, 16)).astype(np.float16)
    query = rng.standard_normal(16).astype(np.float32)
    values = scores(matrix, query, chunk=97)
    np.testing.assert_allclose(values, matrix.astype(np.float64) @ query, rtol=1e-4, atol=1e-4)
    best = top_k(values, 10)
    assert list(best) == list(np.argsort(-values, kind="stable")[:10])
    pairs = set(similar_pairs(matrix[:50] / 4, 0.5, chunk=7))
    gram = (matrix[:50].astype(np.float32) / 4) @ (matrix[:50].astype(np.float32) / 4).T
    expected = {(i, j) for i in range(50) for j in range(i + 1, 50) if gram[i, j] >= 0.5}
    assert {(i, j) for i, j, _ in pairs} == expected


def test_default_database_is_one_file_per_model_in_the_cache(tmp_path, monkeypatch, model_dir):
    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path / "cache"))
    named = default_db("aimv2-large-patch14-224-lit")
    assert named == tmp_path / "cache" / "index" / "aimv2-large-patch14-224-lit.sqlite"
    folder = default_db(model_dir)
    assert folder.parent == named.parent and folder.name.startswith("tiny-") and folder != named
    assert default_db(model_dir, "head") != folder


def test_api_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match="no index here"):
        Index(tmp_path / "none.sqlite").search("cat")
    db = Index(tmp_path / "i.sqlite", model=FakeEncoder())
    tiny_png(tmp_path / "a.png", 0)
    db.add(tmp_path / "a.png")
    with WriterLock(db.db), pytest.raises(OutputError, match="another mlx-aim index"):
        db.add(tmp_path / "a.png")
    with pytest.raises(InputError, match="threshold"):
        db.duplicates(2.0)


def test_a_word_starting_with_a_dash_is_a_negative_term(photos, model_dir, tmp_path, monkeypatch):
    folder, _, _ = photos
    db = tmp_path / "photos.sqlite"
    index(folder, model_dir, db)
    monkeypatch.chdir(folder)
    result = run("search", "coffee.jpg", "-chelsea.jpg", "--db", db, "-k9", "--json", "-q")
    assert result.exit_code == 0, result.output
    expected = Index(db, model=model_dir).search(["coffee.jpg", "-", "chelsea.jpg"], 9)
    found = [json.loads(line) for line in lines(result.stdout)]
    assert [f["path"] for f in found] == [h.path for h in expected] and len(found) == 9
    plain = Index(db, model=model_dir).search("coffee.jpg", 9)
    assert [h.path for h in expected] != [h.path for h in plain]


def test_searches_map_a_cached_copy_of_the_vectors_that_any_change_invalidates(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    files = [tiny_png(folder / f"{i}.png", i) for i in range(6)]
    db = tmp_path / "i.sqlite"
    Index(db, model=FakeEncoder()).add(folder)
    first = Index(db, model=FakeEncoder()).search(files[0], k=6)
    cache = cache_path(db)
    assert cache.is_file()
    store = Store(db)
    paths, matrix = store.vectors()
    store.close()
    assert isinstance(matrix, np.memmap) and len(paths) == 6
    assert Index(db, model=FakeEncoder()).search(files[0], k=6) == first
    files[1].unlink()
    extra = tiny_png(folder / "new.png", 99)
    Index(db, model=FakeEncoder()).add(folder)
    found = [h.path for h in Index(db, model=FakeEncoder()).search(extra, k=6)]
    assert found[0] == str(extra) and str(files[1]) not in found and len(found) == 6
    cache.write_bytes(cache.read_bytes()[:-7])  # a torn copy is ignored and rewritten
    again = [h.path for h in Index(db, model=FakeEncoder()).search(extra, k=6)]
    assert again == found and cache.stat().st_size % 4 == 0


def test_search_uses_the_pooling_the_index_was_built_with(photos, model_dir, tmp_path):
    folder, _, copy = photos
    db = tmp_path / "photos.sqlite"
    index(folder, model_dir, db, "--pool", "layers")
    result = run("search", folder / "coffee.jpg", "--db", db, "-k", "2", "-q")
    assert result.exit_code == 0, result.output
    assert lines(result.stdout) == [str(folder / "coffee.jpg"), str(copy)]


def test_search_without_db_names_the_indexes_of_other_models_when_the_default_is_missing_or_empty(
    photos, model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLX_AIM_CACHE", str(tmp_path / "cache"))
    folder, _, _ = photos
    result = run("index", folder, "--model", model_dir, "-q")
    assert result.exit_code == 0, result.output
    built = default_db(model_dir)
    result = run("search", "coffee")
    assert result.exit_code == 1
    assert "no index here" in result.output and "--db" in result.output
    assert str(built) in result.output.replace("\n", "")
    # a first `mlx-aim index` whose model could not load leaves the default database empty
    Store(default_db(LIT_NAME), create=True).close()
    result = run("search", "coffee")
    assert result.exit_code == 1 and str(built) in result.output.replace("\n", "")
    assert str(default_db(LIT_NAME)) not in result.output.replace("\n", "").split("--db")[-1]


def test_html_sheet_never_replaces_a_file_without_force_nor_the_index_or_an_image(
    photos, model_dir, tmp_path
):
    folder, paths, _ = photos
    db = tmp_path / "photos.sqlite"
    index(folder, model_dir, db)
    query = folder / "rocket.jpg"
    assert run("search", query, "--db", db, "-q").exit_code == 0  # writes the .vectors cache
    existing = tmp_path / "old.html"
    existing.write_text("keep")
    before = {p: p.read_bytes() for p in [db, *paths]}
    targets = [
        (existing, ()),
        (db, ("--force",)),
        (db.with_name(db.name + ".vectors"), ("--force",)),
        (query, ("--force",)),
        (paths[-1], ("--force", "-k", "1")),  # indexed, though not a result
    ]
    for target, extra in targets:
        result = run("search", query, "--db", db, "--html", target, "-q", *extra)
        assert result.exit_code == 3, (target, result.output)
        assert result.output.startswith("error: ") and "Traceback" not in result.output
    assert existing.read_text() == "keep"
    assert {p: p.read_bytes() for p in before} == before
    result = run("search", query, "--db", db, "--html", existing, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert existing.read_text().startswith("<!doctype html>")


def test_negative_values_of_k_and_threshold_are_option_values_not_query_terms(
    photos, model_dir, tmp_path
):
    folder, _, _ = photos
    db = tmp_path / "photos.sqlite"
    index(folder, model_dir, db)
    result = run("search", folder / "rocket.jpg", "--db", db, "-k", "-1", "-q")
    assert result.exit_code == 1 and "-k must be >= 1, not -1" in result.output
    result = run("search", "--duplicates", "--db", db, "--threshold", "-0.5", "--json", "-q")
    assert result.exit_code == 0, result.output
    assert all(json.loads(line)["similarity"] >= -0.5 for line in lines(result.stdout))


def test_searching_an_empty_index_with_a_model_names_the_index(photos, model_dir, tmp_path):
    folder, _, _ = photos
    db = tmp_path / "empty.sqlite"
    Store(db, create=True).close()  # what an index run that failed to load its model leaves
    result = run("search", folder / "rocket.jpg", "--db", db, "--model", model_dir, "-q")
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: {db}: empty index")


def test_a_folder_path_as_a_query_is_an_error_but_a_bare_word_is_text(tmp_path, monkeypatch):
    (tmp_path / "beach").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="a folder, not an image"):
        parse_terms([str(tmp_path / "beach")])
    assert parse_terms(["beach"])[0].text == "beach"


def test_a_db_that_is_a_folder_or_under_a_file_and_a_missing_dir_are_named(
    photos, model_dir, tmp_path
):
    folder, paths, _ = photos
    for db, message in [
        (folder, f"error: {folder} is a directory"),
        (paths[0] / "i.sqlite", f"error: cannot write {paths[0] / 'i.sqlite'}: {paths[0]} is not"),
    ]:
        result = run("index", folder, "--model", model_dir, "--db", db, "-q")
        assert result.exit_code == 3 and result.output.startswith(message), result.output
    db = tmp_path / "photos.sqlite"
    index(folder, model_dir, db)
    result = run("search", paths[0], "--db", db, "--dir", tmp_path / "missing", "-q")
    assert result.exit_code == 1, result.output
    assert result.output == f"error: --dir {tmp_path / 'missing'}: no such folder\n"


def test_a_fifo_or_device_link_as_a_query_image_is_named_as_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(InputError, match=r"pipe.png: not a regular file \(a FIFO\)"):
        parse_terms([str(tmp_path / "pipe.png")])
    with pytest.raises(InputError, match=r"zero.png: not a regular file \(a character device\)"):
        parse_terms([str(tmp_path / "zero.png")])


def test_a_model_that_fails_to_load_leaves_no_empty_index_but_keeps_an_existing_one(
    photos, model_dir, tmp_path
):
    folder, _, _ = photos
    db = tmp_path / "new.sqlite"
    result = run("index", folder, "--model", model_dir, "--db", db, "--pool", "nonsense", "-q")
    assert result.exit_code == 1 and "pool must be one of" in result.output, result.output
    assert not db.exists()
    index(folder, model_dir, db)
    result = run("index", folder, "--model", model_dir, "--db", db, "--pool", "nonsense", "-q")
    assert result.exit_code == 1 and Store(db).count() == len(list(folder.iterdir()))
