"""`lmforge data check` and skip_invalid_examples, on a file with known problems."""

import json

from lmforge.cli import main


def conv(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


ROWS = [
    conv(("user", "What is a bond?"), ("assistant", "A loan to an issuer.")),
    conv(("user", "Define GDP."), ("assistant", "Total output of an economy.")),
    conv(("user", "hi"), ("wizard", "?")),  # line 3: invalid
    conv(("user", "What is a bond?"), ("assistant", "A loan to an issuer.")),  # duplicate of line 1
    conv(("user", "Tell me everything. " * 20), ("assistant", "That is a long story. " * 30)),  # over cutoff
]


def write_rows(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_data_check_reports_problems_and_marks_trained_tokens(tmp_path, tiny_llama_dir, capsys):
    path = write_rows(tmp_path)
    report_dir = tmp_path / "report"
    assert main(["data", "check", "--model_name_or_path", str(tiny_llama_dir), "--dataset", str(path),
                 "--cutoff_len", "64", "--template", "chatml", "--report_dir", str(report_dir),
                 "--show_examples", "2"]) == 0
    out = capsys.readouterr().out
    assert f"rows per dataset: {{'{path}': 5}}" in out
    assert "rows invalid: 1" in out and f"{path}:3: unknown role 'wizard'" in out
    assert "duplicates: 1" in out
    assert "cutoff_len truncates 0 and drops 1 examples" in out  # the long prompt alone exceeds 64 tokens
    assert "WARNING: template chatml renders differently from the tokenizer's own chat template" in out
    assert "[[A loan to an issuer.<|im_end|>\n]]" in out and "[[Total output of an economy.<|im_end|>\n]]" in out
    assert "[[<|im_start|>" not in out  # the prompt is never marked as trained
    report = json.loads((report_dir / "report.json").read_text())
    assert report["lengths"]["max"] > 64 and report["duplicates"] == 1 and report["dropped"] == 1
    assert 0 < report["loss_share"] < 0.5
    assert (report_dir / "length_histogram.png").stat().st_size > 1000


def test_skip_invalid_examples_skips_and_counts(tmp_path, tiny_llama_dir, capsys, caplog):
    path = write_rows(tmp_path)
    base = ["train", "--model_name_or_path", str(tiny_llama_dir), "--dataset", str(path), "--cutoff_len", "512",
            "--max_steps", "1", "--save_strategy", "no"]
    assert main([*base, "--output_dir", str(tmp_path / "a")]) == 2
    assert f"{path}:3: unknown role 'wizard'" in capsys.readouterr().err
    with caplog.at_level("INFO", logger="lmforge"):
        assert main([*base, "--output_dir", str(tmp_path / "b"), "--skip_invalid_examples", "true"]) == 0
    assert "4 train examples (5 rows read, 1 invalid rows skipped" in caplog.text
