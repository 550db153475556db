"""prepare: raw Amazon 2014 / 2018 and MovieLens-1M files -> RecBole atomic files with titles."""

import gzip
import json
import re

import pytest
from recbole.data import create_dataset

from recbole_layersel import prepare
from recbole_layersel.registry import LayerSelConfig

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"
ITEM_HEADER = "item_id:token\ttitle:token_seq\n"


def write_lines(path, lines, encoding="utf-8"):
    data = "".join(line + "\n" for line in lines).encode(encoding)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as file:
            file.write(data)
    else:
        path.write_bytes(data)
    return path


def amazon2014(tmp_path, ratings, titles):
    """A ratings csv from (user, item, time) and a gzipped Python-literal meta file from {item: title}."""
    write_lines(tmp_path / "ratings.csv", [f"{u},{i},5.0,{t}" for u, i, t in ratings])
    write_lines(tmp_path / "meta.json.gz", [repr({"asin": i, "title": t}) for i, t in titles.items()])
    return ["amazon2014", "--ratings", str(tmp_path / "ratings.csv"),
            "--meta", str(tmp_path / "meta.json.gz"), "--out", str(tmp_path / "data"), "--name", "tiny"]


def run(argv, capsys=None):
    """main's exit code (argparse's own errors included) and, with capsys, what it printed."""
    try:
        code = prepare.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return (code, capsys.readouterr()) if capsys else code


def outputs(tmp_path, name="tiny"):
    folder = tmp_path / "data" / name
    report = json.loads((folder / f"{name}.prepare.json").read_text(encoding="utf-8"))
    return (folder / f"{name}.inter").read_text(encoding="utf-8"), \
        (folder / f"{name}.item").read_text(encoding="utf-8"), report


def test_amazon2014_exact_files_time_order_duplicates_and_untitled(tmp_path):
    write_lines(tmp_path / "ratings_Test.csv", [
        "uA,0001,5.0,300",
        "uA,0002,4.0,100",
        "uB,0001,5.0,200",
        "uA,0001,3.0,50",   # the same (user, item) earlier: this one is kept, the one at 300 dropped
        "uC,0003,5.0,100",  # 0003 has no title: dropped, and uC with it
        "uB,0004,2.0,200",  # same time as uB's 0001: file order kept
    ])
    write_lines(tmp_path / "meta_Test.json.gz", [
        "{'asin': '0001', 'title': 'Cable &amp; Adapter\\twith  tab\\n', 'price': 3.5}",
        "{'asin': '0002', 'title': \"Kid's   Mouse\", 'categories': [['Electronics']]}",
        "{'asin': '0003', 'price': 1.0}",
        "{'asin': '0004', 'title': 'Disk <REV 2> {New Model 2013}'}",
        "{'asin': '0099', 'title': 'Never rated'}",
    ])
    argv = ["amazon2014", "--ratings", str(tmp_path / "ratings_Test.csv"),
            "--meta", str(tmp_path / "meta_Test.json.gz"), "--out", str(tmp_path / "data"),
            "--name", "tiny", "--k-core", "1"]
    assert run(argv) == 0
    inter, items, report = outputs(tmp_path)
    assert inter == INTER_HEADER + "uA\t0001\t50\nuA\t0002\t100\nuB\t0001\t200\nuB\t0004\t200\n"
    assert items == ITEM_HEADER + (
        "0001\tCable & Adapter with tab\n0002\tKid's Mouse\n0004\tDisk <REV 2> {New Model 2013}\n")
    assert report["ratings_read"] == 6 and report["duplicates_dropped"] == 1
    assert report["untitled"] == {"items": 1, "users_dropped": 1, "interactions_dropped": 1}
    assert report["final"] == {"users": 2, "items": 3, "interactions": 4}
    assert sorted(p.name for p in (tmp_path / "data" / "tiny").iterdir()) == [
        "tiny.inter", "tiny.item", "tiny.prepare.json"]


def test_amazon2018_exact_files_html_titles_rejected_and_counted(tmp_path):
    write_lines(tmp_path / "Test_5.json.gz", [json.dumps(r) for r in [
        {"overall": 5.0, "verified": True, "reviewerID": "R1", "asin": "A1", "unixReviewTime": 1500000000},
        {"reviewerID": "R1", "asin": "A2", "unixReviewTime": 1400000000, "overall": 4.0},
        {"reviewerID": "R2", "asin": "A1", "unixReviewTime": 1450000000, "overall": 1.0},
        {"reviewerID": "R2", "asin": "A3", "unixReviewTime": 1460000000, "overall": 3.0},
        {"reviewerID": "R2", "asin": "A4", "unixReviewTime": 1470000000, "overall": 3.0},
    ]])
    write_lines(tmp_path / "meta_Test.json.gz", [json.dumps(r) for r in [
        {"asin": "A1", "title": "Caf&eacute; &quot;Pro&quot;   Speaker", "brand": "X"},
        {"asin": "A2", "title": '<div class="a-row"><span style="color:red">junk</span></div>'},
        {"asin": "A3", "title": "  "},
        {"asin": "A3", "title": "Tripod \n Stand"},  # the first usable title of an item wins
        {"asin": "A4", "title": ".a-box{display:block; margin:0}"},
        {"asin": "A1", "title": "A later title"},
    ]])
    argv = ["amazon2018", "--ratings", str(tmp_path / "Test_5.json.gz"), "--meta",
            str(tmp_path / "meta_Test.json.gz"), "--out", str(tmp_path / "data"), "--name", "tiny",
            "--k-core", "1"]
    assert run(argv) == 0
    inter, items, report = outputs(tmp_path)
    assert inter == INTER_HEADER + "R1\tA1\t1500000000\nR2\tA1\t1450000000\nR2\tA3\t1460000000\n"
    assert items == ITEM_HEADER + 'A1\tCafé "Pro" Speaker\nA3\tTripod Stand\n'
    assert report["titles"]["rejected"] == 3 and report["titles"]["repeats_ignored"] == 1
    assert [item for item, _ in report["titles"]["rejected_examples"]] == ["A2", "A3", "A4"]
    assert report["untitled"] == {"items": 2, "users_dropped": 0, "interactions_dropped": 2}


def test_ml1m_exact_files_latin1_and_year_stripped(tmp_path):
    write_lines(tmp_path / "ratings.dat", [
        "1::1193::5::978300760", "1::661::3::978302109", "1::914::3::978301968", "2::29::5::978298413"])
    write_lines(tmp_path / "movies.dat", [
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical",
        "914::My Fair Lady (1964)::Musical|Romance",
        "29::City of Lost Children, The (Cité des enfants perdus, La) (1995)::Adventure|Sci-Fi",
    ], encoding="latin-1")
    argv = ["ml-1m", "--ratings", str(tmp_path / "ratings.dat"), "--movies", str(tmp_path / "movies.dat"),
            "--out", str(tmp_path / "data"), "--name", "ml-tiny", "--k-core", "1"]
    assert run(argv) == 0
    inter, items, _ = outputs(tmp_path, "ml-tiny")
    assert inter == INTER_HEADER + (
        "1\t1193\t978300760\n1\t914\t978301968\n1\t661\t978302109\n2\t29\t978298413\n")
    assert items == ITEM_HEADER + (
        "1193\tOne Flew Over the Cuckoo's Nest\n914\tMy Fair Lady\n661\tJames and the Giant Peach\n"
        "29\tCity of Lost Children, The (Cité des enfants perdus, La)\n")


def test_k_core_repeats_until_every_user_and_item_has_k(tmp_path):
    # Pass 1 removes item c (1 rating), so u3 falls to one item and goes; that leaves item d with one
    # rating, whose removal in pass 2 drops u4. A single pass would keep u4 and d.
    ratings = [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 1), ("u2", "b", 2),
               ("u3", "c", 1), ("u3", "d", 2), ("u4", "d", 1), ("u4", "a", 2)]
    argv = amazon2014(tmp_path, ratings, {i: f"Item {i}" for i in "abcd"}) + ["--k-core", "2"]
    assert run(argv) == 0
    inter, items, report = outputs(tmp_path)
    assert inter == INTER_HEADER + "u1\ta\t1\nu1\tb\t2\nu2\ta\t1\nu2\tb\t2\n"
    assert items == ITEM_HEADER + "a\tItem a\nb\tItem b\n"
    assert report["k_core_filter"] == {"passes": 3, "users_removed": 2, "items_removed": 2,
                                       "interactions_removed": 4}


def test_user_sampling_is_seeded_and_comes_before_the_k_core(tmp_path):
    ratings = [(f"u{u:02d}", f"i{(u + s) % 7}", s) for u in range(20) for s in range(3)]
    argv = amazon2014(tmp_path, ratings, {f"i{i}": f"Item {i}" for i in range(7)}) + [
        "--k-core", "1", "--sample-users", "5"]

    def users(seed):
        assert run(argv + ["--seed", str(seed)]) == 0
        inter, _, report = outputs(tmp_path)
        assert report["sampling"] == {"users_before": 20, "users_kept": 5, "interactions_dropped": 45}
        return {row.split("\t")[0] for row in inter.splitlines()[1:]}

    first = users(1)
    assert len(first) == 5 and users(1) == first
    assert users(2) != first


def test_malformed_lines_are_counted_with_line_numbers_and_reported(tmp_path, capsys):
    write_lines(tmp_path / "ratings.csv", [
        "uA,0001,5.0,100",
        "uA,0002,4.0",             # 3 fields
        "uA,0002,4.0,200",
        "uB,0001,5.0,yesterday",   # timestamp
        "uB,0001,5.0,300",
        ",0002,5.0,300",           # empty user
    ])
    with open(tmp_path / "ratings.csv", "ab") as file:
        file.write(b"uC,\xff\xfe,5.0,1\n")  # not utf-8
    marker = tmp_path / "executed"
    write_lines(tmp_path / "meta.json.gz", [
        "{'asin': '0001', 'title': 'Cable'}",
        "{'asin': '0002', 'title': 'Mouse'",                    # cut short
        "{'title': 'no asin'}",                                  # missing key
        f"__import__('os').system('touch {marker}')",            # code, not a literal
        f"{{'asin': '0002', 'title': __import__('os').system('touch {marker}')}}",
        "{'asin': '0002', 'title': 'Mouse'}",
        "['asin', '0003']",                                      # a list, not a dict
    ])
    argv = ["amazon2014", "--ratings", str(tmp_path / "ratings.csv"),
            "--meta", str(tmp_path / "meta.json.gz"), "--out", str(tmp_path / "data"), "--name", "tiny",
            "--k-core", "1"]
    code, printed = run(argv, capsys)
    assert code == 0
    assert not marker.exists()
    inter, items, report = outputs(tmp_path)
    assert inter == INTER_HEADER + "uA\t0001\t100\nuA\t0002\t200\nuB\t0001\t300\n"
    ratings, meta = report["files"]["ratings"], report["files"]["meta"]
    assert (ratings["lines"], ratings["malformed"]) == (7, 4)
    assert [n for n, _ in ratings["first_malformed"]] == [2, 4, 6, 7]
    assert "expected 4" in ratings["first_malformed"][0][1]
    assert "yesterday" in ratings["first_malformed"][1][1]
    assert (meta["lines"], meta["malformed"]) == (7, 5)
    assert meta["first_malformed"] == [[2, "not a Python literal"], [3, "missing key 'asin'"],
                                       [4, "not a Python literal"], [5, "not a Python literal"],
                                       [7, "a list, not an object"]]
    assert "ratings.csv: 7 lines, 4 malformed (line 2:" in printed.out
    assert "meta.json.gz: 7 lines, 5 malformed (line 2: not a Python literal" in printed.out


def test_output_is_replaced_atomically(tmp_path, monkeypatch):
    argv = amazon2014(tmp_path, [("u1", "a", 1), ("u1", "b", 2)], {"a": "A", "b": "B"}) + ["--k-core", "1"]
    assert run(argv) == 0
    folder = tmp_path / "data" / "tiny"
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    argv = amazon2014(tmp_path, [("u2", "a", 1), ("u2", "b", 2), ("u3", "a", 5)], {"a": "A", "b": "B"}) + [
        "--k-core", "1"]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(prepare, "_write_items", fail)
    with pytest.raises(OSError, match="disk full"):
        prepare.main(argv)
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    assert [path.name for path in (tmp_path / "data").iterdir()] == ["tiny"]

    monkeypatch.undo()
    assert run(argv) == 0
    assert outputs(tmp_path)[2]["final"]["users"] == 2
    assert [path.name for path in (tmp_path / "data").iterdir()] == ["tiny"]


@pytest.mark.parametrize("change, message", [
    (lambda argv, tmp: argv.__setitem__(2, str(tmp / "gone.csv")), "--ratings .*gone.csv: no such file"),
    (lambda argv, tmp: argv.__setitem__(0, "amazon2020"), "invalid choice: 'amazon2020'"),
    (lambda argv, tmp: argv.extend(["--k-core", "0"]), "--k-core 0 must be at least 1"),
    (lambda argv, tmp: argv.extend(["--sample-users", "50"]), "--sample-users 50 is larger than the 2 users"),
    (lambda argv, tmp: argv.__setitem__(3, "--movies"), "amazon2014 takes its titles from --meta, not --mov"),
    (lambda argv, tmp: argv.__setitem__(8, "../x"), "--name '../x' is not a folder name"),
    (lambda argv, tmp: argv.extend(["--k-core", "3"]), "nothing is left after the 3-core of 2 users"),
])
def test_bad_inputs_exit_2_with_the_value_and_the_fix(tmp_path, capsys, change, message):
    argv = amazon2014(tmp_path, [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 3)], {"a": "A", "b": "B"})
    change(argv, tmp_path)
    code, printed = run(argv, capsys)
    assert code == 2
    assert re.search(message, printed.err)
    assert not (tmp_path / "data").exists()


def test_ratings_file_of_another_source_is_an_error(tmp_path, capsys):
    argv = amazon2014(tmp_path, [("u1", "a", 1)], {"a": "A"})
    argv[2] = argv[4]  # the metadata passed as ratings: no line is a rating
    code, printed = run(argv, capsys)
    assert code == 2 and "no readable ratings" in printed.err and "1 of 1 lines malformed" in printed.err


def test_cut_short_gzip_is_an_error_not_a_short_dataset(tmp_path, capsys):
    argv = amazon2014(tmp_path, [("u1", "a", 1)], {"a": "A" * 5000})
    meta = tmp_path / "meta.json.gz"
    meta.write_bytes(meta.read_bytes()[:-30])
    code, printed = run(argv, capsys)
    assert code == 2 and "meta.json.gz is damaged after line 0" in printed.err
    assert "download it again" in printed.err


def test_prepared_folder_loads_with_recbole(tmp_path, argv):
    ratings = [(f"u{u}", f"{i:04d}", 10 * u + i) for u in range(6) for i in range(5)]
    # the default 5-core keeps all: 6 users x 5 items
    assert run(amazon2014(tmp_path, ratings, {f"{i:04d}": f"Item &amp; {i}" for i in range(5)})) == 0
    config = LayerSelConfig("BPR", "tiny", config_dict={
        "data_path": str(tmp_path / "data"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
        "show_progress": False})
    dataset = create_dataset(config)
    assert (dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num) == (6, 5, 30)
    assert dataset.token2id("item_id", "0003") > 0  # ids kept as tokens, leading zeros included
    items = dataset.item_feat.set_index("item_id")
    title = items.loc[dataset.token2id("item_id", "0003"), "title"]
    assert [dataset.id2token("title", t) for t in title] == ["Item", "&", "3"]
