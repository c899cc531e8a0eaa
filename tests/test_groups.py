"""Per-type and per-set evaluation: every image lands in the right group and each group's F1 is its images' mean."""

import json
from pathlib import Path

import numpy as np

from diffiml.benchmarks.evaluate import evaluate
from diffiml.benchmarks.groups import group_rows, manipulation_type, set_names
from diffiml.cli import main
from diffiml.runtime.localizer import Localizer
from diffiml.train.data.readers import read_dataset


def test_type_from_the_list_then_casia_names_then_folders():
    assert manipulation_type(Path("x/Tp_S_NRN_S_N_arc00013_arc00013_01110.tif"), None) == "copymove"
    assert manipulation_type(Path("x/Tp_D_CRN_M_N_ani00100_ani10101_10089.tif"), None) == "splice"
    assert manipulation_type(Path("x/Sp_S_CND_A_pla0005_pla0005_0281.jpg"), None) == "copymove"
    assert manipulation_type(Path("sets/noso_copymove/images/a.png"), None) == "copymove"
    assert manipulation_type(Path("sets/Tp_S_a/x.png"), "splice") == "splice"  # the list's own field wins
    assert manipulation_type(Path("sets/korus/x.tif"), None) is None


def test_groups_by_type_across_sets_and_by_set():
    images = [Path("/d/casia/Tp_D_1.tif"), Path("/d/casia/Tp_S_2.tif"), Path("/d/noso/images/3.png"),
              Path("/d/korus/4.tif")]
    sets = set_names(images)
    assert sets == ["casia", "casia", "noso", "korus"]
    rows = [{"set": s, "type": t} for s, t in zip(sets, ["splice", "copymove", "copymove", None], strict=True)]
    groups = group_rows(rows)
    assert {k: len(v) for k, v in groups.items()} == {
        "type=copymove": 2, "type=splice": 1, "casia/splice": 1, "casia/copymove": 1, "noso/copymove": 1, "korus": 1}
    assert group_rows([{"set": None, "type": None}]) == {}  # one set, no types: nothing to split


def test_eval_reports_each_group_as_the_mean_of_its_images(tiny_bundle, synthetic_set, tmp_path, capsys):
    rows = json.loads((synthetic_set / "test.json").read_text())
    typed = [[str(synthetic_set / img), str(synthetic_set / mask) if mask != "Negative" else mask,
              "copymove" if i % 2 else "splice"] for i, (img, mask) in enumerate(rows)]
    (tmp_path / "typed.json").write_text(json.dumps(typed))
    samples = read_dataset(tmp_path / "typed.json")
    localizer = Localizer.open(tiny_bundle, backend="ort-cpu")
    summary, per_image = evaluate(localizer, samples, "typed")
    by_name = {g["name"]: g for g in summary["groups"]}
    assert set(by_name) == {"type=copymove", "type=splice"}
    for kind in ("copymove", "splice"):
        manipulated = [r["f1"] for r in per_image if r["type"] == kind and r["manipulated"]]
        assert by_name[f"type={kind}"]["n_manipulated"] == len(manipulated)
        assert np.isclose(by_name[f"type={kind}"]["f1"], np.mean(manipulated), equal_nan=True)
    assert main(["eval", "--bundle", str(tiny_bundle), "--data", str(tmp_path / "typed.json"), "--name", "t",
                 "--backend", "ort-cpu"]) == 0
    table = capsys.readouterr().out
    assert "| t / type=copymove |" in table and "| t / type=splice |" in table
