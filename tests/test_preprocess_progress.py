"""Preprocess says how far it is: one line per chunk with the particles done, the rate
and the time left (issue 17 item 3: a 100,000-particle stack is read for minutes)."""

from __future__ import annotations

import logging
import re

from hetrefine.config import defaults
from hetrefine.io.run_files import RunLayout
from hetrefine.simulate import SimulationSpec, simulate_dataset
from hetrefine.steps import settings_for
from hetrefine.steps.preprocess import preprocess, progress_line


def test_progress_line_counts_rate_and_time_left():
    line = progress_line(3, 200, 1500, 100_000, 10.0)
    assert line.startswith("chunk 3/200: 1,500 of 100,000 particles (2%), 10 s, 150 particles/s")
    assert line.endswith("about 11 min left")  # 98,500 at 150/s = 657 s
    assert progress_line(2, 2, 120, 120, 1.0).endswith("about 0 s left")


def test_preprocess_logs_one_progress_line_per_chunk(tmp_path, caplog):
    simulate_dataset(SimulationSpec(n_particles=120, box=24, pixel_size=4.0, seed=0), tmp_path)
    cfg = defaults()
    cfg.update(shard_size=40)  # three chunks of 40
    L = RunLayout(str(tmp_path / "run"))
    with caplog.at_level(logging.INFO, logger="hetrefine"):
        preprocess(
            str(tmp_path / "particles.star"), L.info, L.metadata, L.sample,
            [L.chunk(c) for c in range(3)], settings_for("preprocess", cfg),
        )  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("chunk ")]
    assert len(lines) == 3, lines
    for c, line in enumerate(lines, start=1):
        done = 40 * c
        assert re.match(
            rf"chunk {c}/3: {done} of 120 particles \({round(100 * done / 120)}%\), \d+ s, "
            r"[\d,]+ particles/s, about \d+ s left$",
            line,
        ), line
