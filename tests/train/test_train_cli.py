"""`adapterhub train` pushes a version whose lineage `adapterhub show` prints; `adapterhub plan` prints a table
whose numbers follow the model config (QLoRA's weights smaller than LoRA's, checkpointing saving activations)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from adapterhub.cli import main
from adapterhub.train.data import file_digest


def test_train_pushes_with_lineage_and_show_prints_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}?", "completion": f"{i}!"}) + "\n" for i in range(8)))
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--data", str(data), "--eval", str(data), "--task", "sql", "--tag",
                                  "dev", "--max-steps", "3", "--r", "4", "--lr", "1e-3", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["ref"] == "sql@v1" and out["steps"] == 3 and out["eval_loss"] is not None
    shown = runner.invoke(main, ["show", "sql:dev", "--json"])
    assert shown.exit_code == 0, shown.output
    value = json.loads(shown.output)
    notes = value["annotations"]
    assert notes["train.data.digest"] == file_digest(data)
    assert notes["train.steps"] == "3" and float(notes["train.loss"]) > 0 and float(notes["train.eval_loss"]) > 0
    assert json.loads(notes["train.config"])["r"] == 4 and notes["train.base.quantize"] == "nf4"
    assert value["base"] is not None and value["config"]["r"] == 4
    text = runner.invoke(main, ["show", "sql:dev"]).output
    assert "train.data.digest" in text and "train.wall_seconds" in text


def test_a_bad_data_line_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "ok"}\n{"prompt": 1}\n')
    result = CliRunner().invoke(main, ["train", "--data", str(data), "--task", "sql"])
    assert result.exit_code == 1 and "line 2" in result.output and "Traceback" not in result.output


def test_plan_prints_every_method(tmp_path):
    result = CliRunner().invoke(main, ["plan", "--json", "--batch", "2", "--seq", "64"])
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads(result.output)}
    assert set(rows) == {"full", "lora", "qlora", "dora", "qlora-dora"}
    assert rows["qlora"]["weights"] < rows["lora"]["weights"] < rows["full"]["weights"] + rows["lora"]["weights"]
    assert rows["lora"]["optimizer"] < rows["full"]["optimizer"]
    assert all(row["total_checkpointed"] < row["total"] for row in rows.values())
    text = CliRunner().invoke(main, ["plan", "--method", "qlora"]).output
    assert "qlora" in text and "MiB" in text
