"""Table workflows end to end on a real local Ray, then served over real HTTP: a CSV brought by a user
(classification with a categorical column and missing values) and scikit-learn's diabetes (regression)."""
import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import requests

from modelworks.config import ServeConfig, apply_overrides, load_workflow
from modelworks.registry import Registry
from modelworks.serve.testing import free_port
from modelworks.workflow import result_json, run_workflow
from tests.test_table import shop_frame

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def serve_port(ray_local):
    """One Serve instance for the module; each test deploys its model as its own application."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@contextlib.contextmanager
def deployed(model: str, route: str, port: int):
    """The model as its own Serve application on /<route>, deleted afterwards: a replica holds half a CPU,
    which the next test's training needs (on 2 CPUs, Ray Data would get none)."""
    from ray import serve

    from modelworks.serve.app import build

    cfg = ServeConfig(min_replicas=1, max_replicas=1, alias_poll_s=0, max_inputs=16)
    serve.run(build(model, Registry().uri, cfg), name=route, route_prefix=f"/{route}", blocking=False)
    try:
        yield f"http://127.0.0.1:{port}/{route}"
    finally:
        serve.delete(route)


def post(url: str, body) -> requests.Response:
    return requests.post(url, json=body, timeout=30)


def test_csv_classification_with_missing_values_trains_registers_and_serves(serve_port, modelworks_home, tmp_path):
    frame = shop_frame(400)
    frame.loc[::8, "price"] = np.nan
    frame.loc[::5, "region"] = None
    frame.to_csv(tmp_path / "shop.csv", index=False)
    # Another table through workflows/wine.py, as a user would bring one: the model takes the data's name.
    cfg = apply_overrides(load_workflow(REPO / "workflows/wine.py"),
                          ["data.source=table", f"data.path={tmp_path / 'shop.csv'}", "data.label_column=kind",
                           "train.epochs=8", "train.lr=0.01", "registry.min_accuracy=0.0"])
    lines = []
    result = run_workflow(cfg, log=lines.append)
    assert result.model == "shop@1" and result.production
    assert any("registers as 'shop'" in line for line in lines)
    # The label follows price, weight and region (logistic regression: ~0.85 with these missing values).
    assert result.test_accuracy > 0.75
    run_dir = Path(result.run_dir)
    metrics = json.loads((run_dir / "evaluation" / "test_metrics.json").read_text())
    report = (run_dir / "evaluation" / "report.md").read_text()
    # What was imputed is counted per column, for the training and the test split.
    train_missing, test_missing = metrics["imputed_train"], metrics["imputed_test"]
    assert train_missing["price"] > 10 and train_missing["region"] > 20 and train_missing["weight"] == 0
    assert test_missing["region"] > 0
    assert f"Imputed values: {sum(train_missing.values())} in the training split, " \
           f"{sum(test_missing.values())} in the test split." in report
    assert "| region | categorical | 3 categories + unknown" in report

    loaded, _ = Registry().load("shop@1")
    with deployed("shop@1", "shop", serve_port) as url:
        rows = frame.drop(columns="kind").head(5).replace({np.nan: None}).to_dict("records")
        r = post(url + "/predict", {"inputs": rows})
        assert r.status_code == 200, r.text
        want = loaded.predict_proba(rows).numpy()
        got = r.json()["predictions"]
        assert [p["label"] for p in got] == [loaded.class_names[i] for i in want.argmax(1)]
        assert np.allclose([[p["probabilities"][n] for n in loaded.class_names] for p in got], want, atol=1e-5)
        # The ordered form gives the same answer; a region training never saw and a null are served (unknown
        # slot, imputed), not refused.
        ordered = post(url + "/predict", {"input": [rows[0][c] for c in ("price", "weight", "items", "region")]})
        assert ordered.status_code == 200
        one = ordered.json()["predictions"][0]  # one row alone: float32 sums may round apart in the last bit
        assert one["label"] == got[0]["label"] and np.allclose(list(one["probabilities"].values()),
                                                               list(got[0]["probabilities"].values()), atol=1e-6)
        unseen = post(url + "/predict", {"input": {**rows[1], "region": "atlantis", "price": None}})
        assert unseen.status_code == 200, unseen.text
        assert unseen.json()["predictions"][0]["label"] in loaded.class_names
        # A missing or unknown column is the client's error, named.
        missing = post(url + "/predict", {"input": {k: v for k, v in rows[0].items() if k != "weight"}})
        assert missing.status_code == 422 and missing.json()["field"] == "input.weight" and "missing" in missing.text
        extra = post(url + "/predict", {"inputs": [rows[0], {**rows[0], "colour": "red"}]})
        assert extra.status_code == 422 and extra.json()["field"] == "inputs[1].colour"
        text = post(url + "/predict", {"input": {**rows[0], "price": "cheap"}})
        assert text.status_code == 422 and text.json()["field"] == "input.price"
        meta = requests.get(url + "/v2/models/shop", timeout=30).json()
        assert meta["parameters"]["feature_names"] == ["price", "weight", "items", "region"]
        v2 = post(url + "/v2/models/shop/infer", {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                                              "data": [1, 2, 3, 4]}]})
        assert v2.status_code == 422 and "region" in v2.json()["error"]


def test_diabetes_regression_scores_gates_and_serves_numbers(serve_port, modelworks_home):
    cfg = apply_overrides(load_workflow(REPO / "workflows/diabetes.py"), ["train.epochs=6"])
    result = run_workflow(cfg, log=lambda m: None)
    summary = json.loads(result_json(result))
    assert summary["task"] == "regression" and summary["test_accuracy"] is None
    assert summary["test_r2"] > 0.2 and 20 < summary["test_mae"] < summary["test_rmse"] < 90
    evaluation = Path(result.run_dir) / "evaluation"
    for name in ("pred_vs_true.png", "residuals.png", "loss_curve.png", "r2_curve.png", "report.md"):
        assert (evaluation / name).stat().st_size > 0
    assert not (evaluation / "confusion_matrix.png").exists()
    assert "test R²" in (evaluation / "report.md").read_text()
    info = Registry().info("diabetes", 1)
    assert info["test_r2"] == pytest.approx(result.test_r2) and "test_accuracy" not in info
    # The gate reads test_r2 against the workflow's threshold (0.35).
    assert result.production == (result.test_r2 >= 0.35)

    loaded, _ = Registry().load("diabetes@1")
    with deployed("diabetes@1", "diabetes", serve_port) as url:
        from sklearn.datasets import load_diabetes

        x = load_diabetes(as_frame=True).data.head(3)
        r = post(url + "/predict", {"inputs": x.to_dict("records")})
        assert r.status_code == 200, r.text
        values = [p["value"] for p in r.json()["predictions"]]
        assert np.allclose(values, loaded.predict_values(x.to_dict("records")).numpy(), rtol=1e-5)
        assert all(25 < v < 350 for v in values)  # in the label's units, not standardised
        v2 = post(url + "/v2/models/diabetes/infer", {"inputs": [{"name": "input", "shape": [3, 10], "datatype": "FP32",
                                                                  "data": x.to_numpy().ravel().tolist()}]})
        assert v2.status_code == 200, v2.text
        out = v2.json()["outputs"]
        assert [(o["name"], o["datatype"], o["shape"]) for o in out] == [("value", "FP32", [3, 1])]
        assert np.allclose(out[0]["data"], values, rtol=1e-4)
        wrong = post(url + "/v2/models/diabetes/infer", {"inputs": [{"name": "input", "shape": [1, 10],
                                                                     "datatype": "FP32", "data": [0.0] * 10}],
                                                         "outputs": [{"name": "probabilities"}]})
        assert wrong.status_code == 422 and wrong.json()["field"] == "outputs[0].name"
