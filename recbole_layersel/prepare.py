"""Turn the public raw rating files into RecBole atomic files with item titles.

    python -m recbole_layersel.prepare amazon2014 --ratings ratings_Electronics.csv \\
        --meta meta_Electronics.json.gz --out data --name amazon-electronics --sample-users 1000000 --seed 0
    python -m recbole_layersel.prepare amazon2018 --ratings Electronics_5.json.gz \\
        --meta meta_Electronics.json.gz --out data --name amazon-electronics-2018
    python -m recbole_layersel.prepare ml-1m --ratings ml-1m/ratings.dat --movies ml-1m/movies.dat \\
        --out data --name ml-1m

Each writes ``<out>/<name>/``: ``<name>.inter`` (``user_id:token``, ``item_id:token``,
``timestamp:float``; rows in each user's time order), ``<name>.item`` (``item_id:token``,
``title:token_seq``) and ``<name>.prepare.json`` (every count below). That is the format of the shared
datasets, so ``run_recbole.py --data_path=<out> --dataset=<name>`` reads it.

Steps, in this order:

1. The ratings are streamed line by line (gzip or plain text, told apart by their first bytes) into
   per-user histories. Feedback is implicit: every rating counts, its value is not used.
2. Each history is sorted by time (equal times keep file order); a repeated (user, item) keeps its
   earliest interaction and the repeats are counted.
3. The metadata is streamed, keeping the first usable title of each item that occurs in the ratings.
   A title has its HTML entities unescaped and control characters and whitespace runs collapsed to one
   space (so the TSV stays valid); one that is empty after that, or holds HTML tags or CSS rules (page
   residue in the 2018 metadata), is rejected and counted. ml-1m titles lose their year, "Heat (1995)"
   -> "Heat". Interactions with items without a title are dropped and counted: LayerSelLLM knows an
   item only by its title.
4. ``--sample-users N``: a seeded sample of N users (of those with a titled interaction), taken before
   the k-core, as in the shared "1M-user sample, 5-core" data: a k-core of the sample is still a k-core,
   while sampling a k-core would leave users and items below k.
5. ``--k-core K`` (default 5; 1 keeps everything): users and items with fewer than K interactions are
   removed, again and again, until every user and every item has at least K.

Ids are the source's own strings (Amazon reviewer ids and ASINs, MovieLens numbers), not renumbered:
every row can be traced back to the raw files, and RecBole maps tokens to its own indices anyway.

A line that cannot be read (wrong field count, not a Python literal or JSON object, a missing key, an
empty id or one with whitespace, a timestamp that is not an integer, bytes that are not in the file's
encoding) is counted per file with its line number (the first few are kept) and reported; nothing is
dropped without a count. The 2014 metadata lines are Python literals: ``ast.literal_eval`` reads them
and evaluates no code.

Memory: one ``(item, timestamp)`` tuple per rating, one string per distinct user and item (every rating
of an item shares its id string), and the titles of the items that occur in the ratings; the metadata
itself is never held: about 180 bytes per rating (measured on synthetic Amazon-like ids), 1.5 GB for
the 7.8M ratings of the full Amazon 2014 Electronics file.

The dataset folder is built beside its destination and renamed into place: a reader sees the old
dataset or the new one, never half of one.
"""

import argparse
import ast
import gzip
import html
import json
import random
import re
import sys
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from recbole_layersel.errors import LayerSelError
from recbole_layersel.files import check_replaceable, write_folder

SHOWN = 5  # line numbers / examples kept per kind: enough to find the problem, bounded for a broken file
ID = re.compile(r"\S+")
INTEGER = re.compile(r"\s*-?[0-9]+\s*")
YEAR = re.compile(r"\s*\(\d{4}\)$")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Markup, not titles: a tag of a common HTML element, or a CSS rule "{...: ...;". "<REV 3.0>" and
# "{New Model 2013}" occur in real titles and pass.
MARKUP = re.compile(
    r"</?(?:a|b|br|div|font|i|img|li|link|meta|p|script|span|style|table|td|tr|ul)\b[^>]*>"
    r"|\{[^{}]*:[^{}]*;", re.I)


@dataclass
class FileReport:
    path: str
    lines: int = 0
    malformed: int = 0
    first_malformed: list = field(default_factory=list)  # [line number, reason]

    def bad(self, line_number: int, reason: str) -> None:
        self.malformed += 1
        if len(self.first_malformed) < SHOWN:
            self.first_malformed.append([line_number, reason])


def records(path: Path, parse, encoding: str, report: FileReport):
    """``parse`` of each line of ``path``; a line it rejects with ValueError is counted, not yielded."""
    with open(path, "rb") as file:
        gzipped = file.read(2) == b"\x1f\x8b"
    try:
        # Binary lines, decoded one by one: a bad byte is one malformed line, not a crash mid-file.
        with gzip.open(path) if gzipped else open(path, "rb") as file:
            for line_number, line in enumerate(file, 1):
                report.lines += 1
                try:
                    record = parse(line.decode(encoding).rstrip("\r\n"))
                except ValueError as error:  # UnicodeDecodeError and JSONDecodeError included
                    report.bad(line_number, str(error)[:120])
                    continue
                yield record
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:  # typically a cut-short download
        raise LayerSelError(
            f"{path} is damaged after line {report.lines} ({error}); download it again.") from None


def split_fields(text: str, separator: str, count: int) -> list[str]:
    parts = text.split(separator)
    if len(parts) != count:
        raise ValueError(f"{len(parts)} fields separated by {separator!r}, expected {count}")
    return parts


def checked_id(value) -> str:
    if not isinstance(value, str) or not ID.fullmatch(value):
        raise ValueError(f"id {value!r} is empty, not a string or holds whitespace")
    return value


def timestamp(value) -> int:
    if isinstance(value, str) and INTEGER.fullmatch(value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"timestamp {value!r} is not an integer")


def keys(record, *names):
    if not isinstance(record, dict):
        raise ValueError(f"a {type(record).__name__}, not an object")
    missing = [name for name in names if name not in record]
    if missing:
        raise ValueError(f"missing key {missing[0]!r}")
    return [record[name] for name in names]


def json_object(text: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def python_literal(text: str):
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        raise ValueError("not a Python literal") from None


def amazon2014_rating(text: str) -> tuple[str, str, int]:
    user, item, _rating, stamp = split_fields(text, ",", 4)
    return checked_id(user), checked_id(item), timestamp(stamp)


def amazon2018_rating(text: str) -> tuple[str, str, int]:
    user, item, stamp = keys(json_object(text), "reviewerID", "asin", "unixReviewTime")
    return checked_id(user), checked_id(item), timestamp(stamp)


def ml1m_rating(text: str) -> tuple[str, str, int]:
    user, item, _rating, stamp = split_fields(text, "::", 4)
    return checked_id(user), checked_id(item), timestamp(stamp)


def amazon2014_title(text: str) -> tuple[str, object]:
    record = python_literal(text)
    return checked_id(keys(record, "asin")[0]), record.get("title")  # no title: an untitled item


def amazon2018_title(text: str) -> tuple[str, object]:
    record = json_object(text)
    return checked_id(keys(record, "asin")[0]), record.get("title")


def ml1m_title(text: str) -> tuple[str, object]:
    item, title, _genres = split_fields(text, "::", 3)
    return checked_id(item), YEAR.sub("", title.strip())


class Source(NamedTuple):
    rating: object
    title: object
    encoding: str
    meta_option: str
    files: str  # what the user downloads, for error messages


SOURCES = {
    "amazon2014": Source(amazon2014_rating, amazon2014_title, "utf-8", "--meta",
                         "ratings_<Category>.csv and meta_<Category>.json.gz"),
    "amazon2018": Source(amazon2018_rating, amazon2018_title, "utf-8", "--meta",
                         "<Category>_5.json.gz and meta_<Category>.json.gz"),
    "ml-1m": Source(ml1m_rating, ml1m_title, "latin-1", "--movies", "ml-1m/ratings.dat and ml-1m/movies.dat"),
}


def clean_title(raw) -> str:
    """The title as one line of text, or "" when it is not a usable title."""
    if not isinstance(raw, str):
        return ""
    text = " ".join(CONTROL.sub(" ", html.unescape(raw)).split())
    return "" if MARKUP.search(text) else text


def read_ratings(path: Path, source: Source, report: FileReport) -> tuple[dict, dict]:
    users, items = {}, {}
    for user, item, stamp in records(path, source.rating, source.encoding, report):
        users.setdefault(user, []).append((items.setdefault(item, item), stamp))
    return users, items


def earliest_once(history: list) -> list:
    """The history in time order (stable: equal times keep file order), each item at its first time."""
    seen, kept = set(), []
    for pair in sorted(history, key=lambda pair: pair[1]):
        if pair[0] not in seen:
            seen.add(pair[0])
            kept.append(pair)
    return kept


def read_titles(path: Path, source: Source, wanted: dict, report: FileReport, counts: dict) -> dict:
    titles = {}
    for item, raw in records(path, source.title, source.encoding, report):
        if item not in wanted or raw is None:
            continue
        if item in titles:
            counts["repeats_ignored"] += 1
            continue
        title = clean_title(raw)
        if title:
            titles[item] = title
        else:
            counts["rejected"] += 1
            if len(counts["rejected_examples"]) < SHOWN:
                counts["rejected_examples"].append([item, str(raw)[:80]])
    return titles


def sample_users(users: dict, n: int, seed: int) -> dict:
    if n > len(users):
        raise LayerSelError(
            f"--sample-users {n} is larger than the {len(users)} users with titled interactions; "
            "pass a smaller N, or leave --sample-users out to keep every user.")
    # Sorted, so the sample depends on the seed and the set of users, not on the file's order.
    chosen = set(random.Random(seed).sample(sorted(users), n))
    return {user: history for user, history in users.items() if user in chosen}


def k_core(users: dict, k: int) -> tuple[dict, int]:
    """Users and items with < k interactions removed until none is left; also the number of passes."""
    passes = 0
    while True:
        passes += 1
        counts = Counter(item for history in users.values() for item, _ in history)
        kept = {}
        for user, history in users.items():
            history = [pair for pair in history if counts[pair[0]] >= k]
            if len(history) >= k:
                kept[user] = history
        if size(kept) == size(users):
            return kept, passes
        users = kept


def size(users: dict) -> int:
    return sum(map(len, users.values()))


def items_of(users: dict) -> dict:
    return dict.fromkeys(item for history in users.values() for item, _ in history)


def _write_inter(path: Path, users: dict) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as file:
        file.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user, history in users.items():
            file.writelines(f"{user}\t{item}\t{stamp}\n" for item, stamp in history)


def _write_items(path: Path, items, titles: dict) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as file:
        file.write("item_id:token\ttitle:token_seq\n")
        file.writelines(f"{item}\t{titles[item]}\n" for item in items)


def check_inputs(source: str, ratings, meta, name: str, k: int, sample: int | None) -> Source:
    if source not in SOURCES:
        raise LayerSelError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}.")
    spec = SOURCES[source]
    for option, path in (("--ratings", ratings), (spec.meta_option, meta)):
        if path is None:
            raise LayerSelError(f"{source} needs {option} PATH: its raw files are {spec.files}.")
        if not Path(path).is_file():
            raise LayerSelError(
                f"{option} {path}: no such file. {source} needs {spec.files}, as downloaded.")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        raise LayerSelError(
            f"--name {name!r} is not a folder name; use letters, digits, '-', '_' and '.', "
            "e.g. amazon-electronics.")
    if k < 1:
        raise LayerSelError(f"--k-core {k} must be at least 1 (1 keeps everything, 5 is the usual).")
    if sample is not None and sample < 1:
        raise LayerSelError(f"--sample-users {sample} must be at least 1, or left out to keep every user.")
    return spec


def prepare(source: str, ratings, meta, out, name: str, k: int = 5, sample: int | None = None,
            seed: int = 0) -> dict:
    """Write ``<out>/<name>/`` from the raw files; returns the report (also in ``<name>.prepare.json``)."""
    spec = check_inputs(source, ratings, meta, name, k, sample)
    check_replaceable(Path(out) / name, f"{name}.prepare.json")  # before hours of reading, not after
    ratings_report, meta_report = FileReport(str(ratings)), FileReport(str(meta))
    report = {"source": source, "k_core": k, "sample_users": sample, "seed": seed if sample else None,
              "files": {"ratings": ratings_report, "meta": meta_report}}
    users, items = read_ratings(Path(ratings), spec, ratings_report)
    if not users:
        raise LayerSelError(
            f"no readable ratings in {ratings}: {ratings_report.malformed} of {ratings_report.lines} "
            f"lines malformed (first: {ratings_report.first_malformed[:1]}). {source} reads {spec.files}.")
    read = size(users)
    users = {user: earliest_once(history) for user, history in users.items()}
    report["ratings_read"], report["duplicates_dropped"] = read, read - size(users)

    title_counts = {"rejected": 0, "rejected_examples": [], "repeats_ignored": 0}
    titles = read_titles(Path(meta), spec, items, meta_report, title_counts)
    report["titles"] = {"items_in_ratings": len(items), "titled": len(titles), **title_counts}
    titled = {user: [pair for pair in history if pair[0] in titles] for user, history in users.items()}
    titled = {user: history for user, history in titled.items() if history}
    report["untitled"] = {"items": len(items) - len(titles), "users_dropped": len(users) - len(titled),
                          "interactions_dropped": size(users) - size(titled)}
    if not titled:
        raise LayerSelError(
            f"none of the {len(items)} items in {ratings} has a usable title in {meta}; "
            f"is {meta} the metadata of the same category ({spec.files})?")
    del users, items  # only the titled histories go on

    sampled = sample_users(titled, sample, seed) if sample else titled
    report["sampling"] = {"users_before": len(titled), "users_kept": len(sampled),
                          "interactions_dropped": size(titled) - size(sampled)}
    del titled
    final, passes = k_core(sampled, k)
    if not final:
        raise LayerSelError(
            f"nothing is left after the {k}-core of {len(sampled)} users; pass a smaller --k-core"
            f"{' or a larger --sample-users' if sample else ''}.")
    final_items = items_of(final)
    report["k_core_filter"] = {"passes": passes, "users_removed": len(sampled) - len(final),
                               "items_removed": len(items_of(sampled)) - len(final_items),
                               "interactions_removed": size(sampled) - size(final)}
    report["final"] = {"users": len(final), "items": len(final_items), "interactions": size(final)}
    report["files"] = {role: asdict(file) for role, file in report["files"].items()}

    def write(staging: Path) -> None:
        _write_inter(staging / f"{name}.inter", final)
        _write_items(staging / f"{name}.item", final_items, titles)
        (staging / f"{name}.prepare.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")

    write_folder(Path(out) / name, write, f"{name}.prepare.json")
    return report


def summary(report: dict, folder: Path) -> str:
    lines = []
    for file in report["files"].values():
        where = ", ".join(f"line {n}: {reason}" for n, reason in file["first_malformed"])
        lines.append(f"{file['path']}: {file['lines']} lines, {file['malformed']} malformed"
                     + (f" ({where}{', ...' if file['malformed'] > len(file['first_malformed']) else ''})"
                        if where else ""))
    titles, untitled, core = report["titles"], report["untitled"], report["k_core_filter"]
    lines.append(f"repeated (user, item) dropped: {report['duplicates_dropped']}")
    lines.append(f"titles: {titles['titled']} of {titles['items_in_ratings']} items, {titles['rejected']} "
                 f"rejected; {untitled['interactions_dropped']} interactions with {untitled['items']} "
                 f"untitled items dropped ({untitled['users_dropped']} users left with none)")
    if report["sample_users"] is not None:
        lines.append(f"sampled {report['sampling']['users_kept']} of {report['sampling']['users_before']} "
                     f"users (seed {report['seed']})")
    lines.append(f"{report['k_core']}-core: {core['passes']} passes removed {core['users_removed']} users, "
                 f"{core['items_removed']} items, {core['interactions_removed']} interactions")
    final = report["final"]
    lines.append(f"wrote {folder}: {final['users']} users, {final['items']} items, "
                 f"{final['interactions']} interactions")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recbole_layersel.prepare", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=SOURCES)
    parser.add_argument("--ratings", required=True, help="the ratings / reviews file")
    parser.add_argument("--meta", help="Amazon metadata, meta_<Category>.json.gz")
    parser.add_argument("--movies", help="MovieLens movies.dat")
    parser.add_argument("--out", required=True, help="data folder; the dataset goes to <out>/<name>/")
    parser.add_argument("--name", required=True, help="dataset name, e.g. amazon-electronics")
    parser.add_argument("--k-core", type=int, default=5)
    parser.add_argument("--sample-users", type=int, help="keep a seeded sample of N users (before k-core)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        option = SOURCES[args.source].meta_option
        other = "--movies" if option == "--meta" else "--meta"
        if getattr(args, other.lstrip("-")) is not None:
            raise LayerSelError(f"{args.source} takes its titles from {option}, not {other}.")
        meta = getattr(args, option.lstrip("-"))
        report = prepare(args.source, args.ratings, meta, args.out, args.name, args.k_core,
                         args.sample_users, args.seed)
    except LayerSelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(report, Path(args.out) / args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
