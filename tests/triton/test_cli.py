"""`difflens triton-serve`'s own checks, before it hands over to the Triton environment (the server itself runs in
test_server.py and test_worker.py)."""

from __future__ import annotations

import pytest

from difflens import cli


@pytest.mark.parametrize("args,line", [
    (["{tmp}"], "MODEL_DIR: {tmp} has no unet/config.json"),
    (["{tiny}", "--max-batch", "0"], "--max-batch: got 0; must be >= 1"),
    (["{tiny}", "--port", "70000"], "--port: got 70000; allowed 0..65535 (0 = any free port)"),
    (["{tiny}", "--model-name", "sd 15"], "--model-name: got 'sd 15'; letters, digits, '.', '_' and '-' only"),
    (["{tiny}", "--venv", "{tmp}/none"], "--venv: no Triton environment at {tmp}/none: run `make triton-venv` "
                                         "(deploy/triton/make-venv.sh)"),
])
def test_bad_values_exit_2_with_one_line(tiny_dir, tmp_path, capsys, args, line):
    fill = {"tmp": str(tmp_path), "tiny": str(tiny_dir)}
    code = cli.main(["triton-serve", *(a.format(**fill) for a in args)])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"difflens: error: {line.format(**fill)}"
