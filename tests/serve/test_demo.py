"""`adapterhub demo --quick`: the newcomer's first command shows every section and a passing check."""

from __future__ import annotations

import re

from click.testing import CliRunner

from adapterhub.cli import main


def test_demo_quick_prints_every_section_and_all_rows_match_their_solo_run():
    result = CliRunner().invoke(main, ["demo", "--quick"])
    assert result.exit_code == 0, result.output
    out = result.output
    for header in ("== 1. Base model", "== 2. Push", "== 3. Pull", "== 4. One mixed batch", "== 5. Check",
                   "== 6. Throughput"):
        assert header in out
    assert re.search(r"pushed LoRA r=8\s+as summarize@v1", out)
    assert re.search(r"pushed rsLoRA r=16\s+as sql@v1", out)
    assert re.search(r"pushed DoRA r=8\s+as translate@v1", out)
    assert re.search(r"translate\s+translate@v1\s+prod", out)  # the registry listing
    rows, total = map(int, re.search(r"(\d+)/(\d+) rows identical to the solo run", out).groups())
    assert rows == total == 8
    changed, adapter_rows = map(int, re.search(r"adapters change the output in (\d+)/(\d+)", out).groups())
    assert changed == adapter_rows == 6
    assert re.search(r"mixed batch .* \d+\s+\d\.\d\dx", out) and "merged into the base" in out
