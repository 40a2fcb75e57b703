"""The run directory must be one directory for all ranks (a shared filesystem across nodes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.trainer import prepare_run_dir
from tests.pipeline.ds_helpers import run_ranks


def _prepare(info, root: str, per_rank: bool, out: str) -> None:
    # per_rank: each rank gets its own directory, as a node-local /tmp would give each node.
    path = Path(root) / (f"node{info.rank}" if per_rank else "shared")
    try:
        _, claim = prepare_run_dir(str(path), info)
        result = "ok"
        if claim is not None:  # rank 0 holds the claim until the run ends
            result = "ok" if claim.path.is_file() else "no claim"
            claim.release()
    except ConfigError as e:
        result = str(e)
    Path(out, f"rank{info.rank}.txt").write_text(result)


@pytest.mark.parametrize("per_rank", [False, True])
def test_run_dir_must_be_shared(tmp_path, per_rank):
    run_ranks(_prepare, str(tmp_path / "runs"), per_rank, str(tmp_path))
    results = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    if not per_rank:
        assert results == ["ok", "ok"]
        assert list((tmp_path / "runs" / "shared").iterdir()) == []  # probes, marker and claim are gone
    else:
        # Both ranks fail alike, with the reason rank 1 found.
        assert results[0] == results[1]
        assert results[0].startswith(
            f"run.output_dir: {tmp_path / 'runs' / 'node1'} is not shared between ranks: rank 1"
        )
