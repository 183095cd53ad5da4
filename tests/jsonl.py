"""Reading a run's `metrics.jsonl` (one JSON object per logged step) back in tests."""

import json
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
