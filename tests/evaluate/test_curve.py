from zeroconv.evaluate.curve import curves_from_rows, format_table, summarize


def test_sudden_convergence_step_is_halfway_from_baseline_to_best():
    curve = {0: 0.30, 100: 0.31, 200: 0.33, 300: 0.70, 400: 0.80, 500: 0.78}
    s = summarize(curve, "fill_iou")
    assert s["baseline"] == 0.30 and s["best"] == 0.80 and s["best_step"] == 400
    assert s["control_appeared_at"] == 300  # first step at or past 0.55
    assert abs(s["gain"] - 0.50) < 1e-9


def test_lower_is_better_metrics():
    s = summarize({0: 40.0, 10: 38.0, 20: 20.0}, "depth_rmse")
    assert s["best"] == 20.0 and s["control_appeared_at"] == 20


def test_no_gain_means_no_control():
    s = summarize({0: 0.5, 10: 0.45, 20: 0.4}, "edge_f1")
    assert s["control_appeared_at"] is None and s["gain"] == 0 and s["best_step"] == 0


def test_rows_to_curves_and_table():
    rows = [{"step": 0, "validation/edge_f1": 0.1}, {"step": 5, "train/loss": 0.3},
            {"step": 10, "validation/edge_f1": 0.4, "validation/edge_recall": 0.5}]
    curves = curves_from_rows(rows)
    assert curves == {"edge_f1": {0: 0.1, 10: 0.4}, "edge_recall": {10: 0.5}}
    table = format_table(curves).splitlines()
    assert table[0].split() == ["step", "edge_f1", "edge_recall"]
    assert table[1].split() == ["0", "0.100", "-"] and table[2].split() == ["10", "0.400", "0.500"]
