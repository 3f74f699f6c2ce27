"""The shipped stubs are exactly what proto/ generates today."""

import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1]


def test_shipped_stubs_match_the_protos(tmp_path):
    subprocess.run(
        [sys.executable, str(PKG / "scripts" / "generate_stubs.py"), "--out", str(tmp_path)],
        check=True, capture_output=True,
    )
    shipped = PKG / "warden_client" / "_proto"
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated == sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for rel in generated:
        assert (tmp_path / rel).read_text() == (shipped / rel).read_text(), (
            f"{rel} is out of date: run python client/python/scripts/generate_stubs.py"
        )
