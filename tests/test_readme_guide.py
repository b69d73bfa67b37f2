"""The README's script user's guide runs as written (on the tiny shapes set, two iterations)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def guide_code() -> str:
    text = README.read_text()
    match = re.search(r"<!-- own-data-guide.*?-->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its own-data guide block"
    return match.group(1)


@pytest.mark.usefixtures("one_thread")
def test_the_guide_trains_evaluates_and_predicts(tiny_shapes, tmp_path, monkeypatch):
    code = guide_code()
    assert len(code.strip().splitlines()) <= 20
    assert 'root = "my_data"' in code and "max_iter=300" in code
    code = code.replace('root = "my_data"', f'root = {str(tiny_shapes)!r}')
    code = code.replace("max_iter=300", "max_iter=2, batch_size=2, min_size=(64,), min_size_test=64, max_size=64")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md guide", "exec"), namespace)
    assert set(namespace["summary"]) >= {"bbox", "segm"} and set(namespace["metrics"]) == {"bbox", "segm"}
    for name in ("runs/mine/per_class.txt", "runs/mine/eval/per_class.json", "runs/mine/eval/confusion_matrix.png",
                 "runs/mine/model_final.pth"):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "runs/mine/pictures").glob("*.png"))) == 1
