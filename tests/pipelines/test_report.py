"""The teacher/student table of ``report``: differences, the two verdicts, directions read from results.json."""

from explainer.pipelines.report import student_rows


def _res(student_del, student_ins, student_point):
    m = lambda d, i, p, spm: {"metrics": {"deletion_auc": d, "insertion_auc": i, "pointing_game": p},  # noqa: E731
                              "seconds_per_map": spm}
    return {"class_names": ["a", "b", "c", "d"],
            "metric_specs": {"deletion_auc": {"direction": "lower"}, "insertion_auc": {"direction": "higher"},
                             "pointing_game": {"direction": "higher"}},
            "methods": {"t": m(0.20, 0.80, 0.90, 1.0), "s": m(student_del, student_ins, student_point, 0.01)}}


def _cells(line):
    return [c.strip() for c in line.strip("|").split("|")]


def test_a_better_student_is_not_within_but_not_worse():
    # lower deletion, higher insertion and pointing by 0.05: better everywhere, so outside +-0.02 but not worse
    cells = _cells(student_rows(_res(0.15, 0.85, 0.95), [("t", "s")])[2])
    assert cells[:5] == ["t", "s", "-0.050", "+0.050", "+0.050"]
    assert cells[5:7] == ["no", "yes"]
    assert cells[7] == "1/400"  # 0.01 s per map for 4 classes against 1.0 s per map: 0.01 / (4 * 1.0)


def test_a_worse_student_fails_both_verdicts_and_a_close_one_passes_both():
    worse = _cells(student_rows(_res(0.25, 0.80, 0.90), [("t", "s")])[2])  # deletion 0.05 higher: worse
    assert worse[5:7] == ["no", "no"]
    close = _cells(student_rows(_res(0.21, 0.79, 0.91), [("t", "s")])[2])
    assert close[5:7] == ["yes", "yes"]
    assert student_rows(_res(0.2, 0.8, 0.9), [("t", "missing")])[2:] == []
