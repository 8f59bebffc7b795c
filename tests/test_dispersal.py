import json

import numpy as np
import pytest

from dtm.cli import main
from dtm.data.template import conversation
from dtm.dispersal import (
    assign_by_source,
    assign_length,
    assign_random,
    assign_stratified,
    balanced_assignment,
    disperse,
    load_portions,
)
from dtm.errors import DtmError


def alpaca_file(path, n, sources=("a", "b", "c")):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(["w"] * int(rng.integers(1, 40)))
            f.write(json.dumps({"instruction": f"task {i}", "input": "", "output": words, "source": sources[i % len(sources)]}) + "\n")
    return path


@pytest.mark.parametrize("strategy", ["random", "stratified", "length"])
def test_every_example_lands_in_exactly_one_portion(tmp_path, strategy):
    data = alpaca_file(tmp_path / "d.jsonl", 103)
    result = disperse(data, k=4, strategy=strategy, out=tmp_path / "out", seed=7)
    written = load_portions(tmp_path / "out")
    ids = [c.id for portion in written for c in portion]
    assert sorted(ids, key=int) == [str(i) for i in range(103)]
    assert [len(p) for p in written] == [len(p) for p in result.portions]
    assert max(map(len, written)) - min(map(len, written)) <= 1 if strategy != "length" else True
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["examples"] == 103 and sum(p["examples"] for p in stats["portions"]) == 103
    assert written[0][0].source in {"a", "b", "c"}


def test_same_seed_same_portions_other_seed_differs(tmp_path):
    data = alpaca_file(tmp_path / "d.jsonl", 50)
    a = disperse(data, k=3, seed=1).assignment
    assert a == disperse(data, k=3, seed=1).assignment
    assert a != disperse(data, k=3, seed=2).assignment


def test_random_split_sizes_hand_checked():
    assignment = assign_random(10, 3, seed=0)
    assert sorted(np.bincount(assignment).tolist()) == [3, 3, 4]


def test_by_source_gives_each_portion_whole_sources_largest_first(tmp_path):
    groups = ["a"] * 6 + ["b"] * 5 + ["c"] * 3 + ["d"] * 2
    assignment = assign_by_source(groups, 3, seed=0)
    portion_of = {g: {int(assignment[i]) for i, x in enumerate(groups) if x == g} for g in "abcd"}
    assert all(len(p) == 1 for p in portion_of.values())  # a source is never split
    # a -> 0, b -> 1, c -> 2 (3 examples), d -> the lightest: 2 (5 in all)
    assert [portion_of[g].pop() for g in "abcd"] == [0, 1, 2, 2]
    with pytest.raises(DtmError, match="has 3 sources .* for k = 4; use k <= 3"):
        disperse(alpaca_file(tmp_path / "d.jsonl", 12), k=4, strategy="by_source")


def test_stratified_spreads_each_source_evenly():
    groups = ["a"] * 8 + ["b"] * 4
    assignment = assign_stratified(groups, 4, seed=0)
    for g in "ab":
        counts = np.bincount(assignment[[i for i, x in enumerate(groups) if x == g]], minlength=4)
        assert counts.max() - counts.min() == 0


def test_length_balances_tokens():
    lengths = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]  # LPT on 2 portions: 28 / 27
    assignment = assign_length(lengths, 2, seed=0)
    sums = sorted(np.bincount(assignment, weights=lengths).tolist())
    assert sums == [27.0, 28.0]


def test_balanced_assignment_caps_cluster_sizes():
    # All 4 points are nearest to cluster 0 (capacity 2). Pairs by distance: p0-c0, p1-c0 fill
    # cluster 0; then p2-c1 (0.3) and, cluster 0 being full, p3-c1 (0.9).
    d = np.array([[0.0, 1.0], [0.1, 0.5], [0.2, 0.3], [0.3, 0.9]])
    assert balanced_assignment(d).tolist() == [0, 0, 1, 1]


def test_kmeans_separates_two_topics_and_balances(tmp_path):
    convs = [conversation(f"q{i}", f"The recipe needs flour, sugar and eggs, batch {i}.", id=f"c{i}") for i in range(12)]
    convs += [conversation(f"q{i}", f"The striker scored a goal in the football match {i}.", id=f"f{i}") for i in range(12)]
    result = disperse(convs, k=2, strategy="kmeans", seed=0, progress=False)
    groups = {frozenset(c.id[0] for c in p) for p in result.portions}
    assert groups == {frozenset("c"), frozenset("f")}
    assert len(result.stats["cluster_nearest_examples"]) == 2
    skew = convs[:20]  # 12 cooking + 8 football
    balanced = disperse(skew, k=2, strategy="kmeans", balance=True, seed=0, progress=False)
    assert [len(p) for p in balanced.portions] == [10, 10]


def test_bad_arguments(tmp_path, capsys):
    data = alpaca_file(tmp_path / "d.jsonl", 5)
    with pytest.raises(DtmError, match="k = 6 is impossible for 5 examples"):
        disperse(data, k=6)
    with pytest.raises(DtmError, match="k = 0"):
        disperse(data, k=0)
    no_source = tmp_path / "ns.jsonl"
    no_source.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    with pytest.raises(DtmError, match="needs a source"):
        disperse(no_source, k=2, strategy="stratified")
    disperse(data, k=2, out=tmp_path / "out")
    assert main(["disperse", str(data), "--k", "2", "--out", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["disperse", str(data), "--k", "2", "--out", str(tmp_path / "out"), "--overwrite", "--strategy", "length"]) == 0


def test_cli_skip_bad_examples_is_counted(tmp_path, capsys):
    data = alpaca_file(tmp_path / "d.jsonl", 6)
    with open(data, "a") as f:
        f.write("{broken\n")
    assert main(["disperse", str(data), "--k", "2", "--out", str(tmp_path / "o1")]) == 2
    assert f"{data}:7: invalid JSON" in capsys.readouterr().err
    assert main(["disperse", str(data), "--k", "2", "--out", str(tmp_path / "o2"), "--on-bad-example", "skip"]) == 0
    assert "skipped 1 bad examples" in capsys.readouterr().out
    stats = json.loads((tmp_path / "o2" / "stats.json").read_text())
    assert stats["skipped"] == 1 and stats["skipped_examples"][0]["where"].endswith(":7")
