"""What a researcher reads first: ``itd eval``'s headline, short reprs, one help style, one option name."""

import json
import re

import pytest

from itdiffusion.cli import SUBCOMMANDS, build_parser, main

HEADLINE = re.compile(r"^headline: (-?\d+\.\d+) ± (\d+\.\d+) bits/dim .*\[estimates\['(\w+)'\]: ")


@pytest.fixture(scope="module")
def spectrum(tmp_path_factory):
    path = tmp_path_factory.mktemp("spectrum") / "digits-spectrum.npz"
    assert main(["spectrum", "--data", "digits", "--dequantize", "--out", str(path)]) == 0
    return path


def _eval(tmp_path, spectrum, capsys, *extra):
    out = tmp_path / "r.json"
    argv = ["eval", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum), "--points", "8",
            "--limit", "6", "--no-tune", "--quiet", "--device", "cpu", "--out", str(out), *extra]
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


@pytest.mark.parametrize("extra, name", [(["--dequantize"], "dequantized_discrete"), ([], "discrete"),
                                         (["--dequantize", "--all"], "dequantized_discrete")])
def test_eval_prints_the_headline_first_and_it_is_the_results_entry_it_names(tmp_path, spectrum, capsys, extra,
                                                                             name):
    printed, saved = _eval(tmp_path, spectrum, capsys, *extra)
    first = printed.splitlines()[0]
    match = HEADLINE.match(first)
    assert match, first
    assert match.group(3) == name == saved["headline"]
    assert float(match.group(1)) == round(saved["estimates"][name]["bpd"], 4)
    assert float(match.group(2)) == round(saved["estimates"][name]["se_bpd"], 4)
    table_rows = [line for line in printed.splitlines() if line.startswith("| ") and "Estimate" not in line]
    if "--all" in extra:  # every estimate below, each saying what it measures
        assert len(table_rows) == len(saved["estimates"])
        assert all(row.rstrip(" |").split(" | ")[-1].strip() for row in table_rows)
        assert printed.index("headline:") < printed.index("All estimates (secondary")
    else:
        assert not table_rows and "--all prints them" in printed


def test_results_repr_is_one_short_line_and_estimates_is_an_attribute(tmp_path, spectrum, capsys):
    from itdiffusion.results import Results

    _eval(tmp_path, spectrum, capsys, "--dequantize")
    results = Results.load(tmp_path / "r.json")
    text = repr(results)
    assert "\n" not in text and len(text) < 300 and "array" not in text, text
    assert "array" not in repr(results.terms["discrete"])
    assert results.estimates["discrete"] == results["discrete"] and results.headline == "dequantized_discrete"


def test_help_shows_each_default_once_and_none_for_flags(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in SUBCOMMANDS:
        text = " ".join(sub.choices[name].format_help().split())
        assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
        for match in re.finditer(r"default", text):  # never two defaults in one option's help
            following = text[match.end():match.end() + 200].split(" --")[0]
            assert "(default:" not in following, (name, text[match.start() - 80:match.end() + 80])
    assert "(default: 1000)" in " ".join(sub.choices["eval"].format_help().split())


def test_compare_and_eval_name_the_points_and_the_device_alike():
    parser = build_parser()
    common = ["compare", "--model", "gmm-exact", "--data", "sample:4"]
    assert parser.parse_args(common + ["--points", "7"]).n_points == 7
    assert parser.parse_args(common + ["--n-points", "7"]).n_points == 7  # the older name still works
    assert parser.parse_args(common).device is None  # as itd eval: cuda when available, else cpu
    assert parser.parse_args(["eval", "--model", "m", "--data", "d", "--spectrum", "s", "--out", "o.json"]).device \
        is None


def test_report_warns_when_results_on_different_image_sets_share_a_table(tmp_path, spectrum, capsys):
    paths = []
    for name, limit in (("a", "6"), ("b", "6"), ("c", "4")):
        out = tmp_path / f"{name}.json"
        assert main(["eval", "--model", "small-unet", "--data", "digits", "--spectrum", str(spectrum), "--points",
                     "8", "--limit", limit, "--no-tune", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
        paths.append(str(out))
    capsys.readouterr()
    assert main(["report", *paths[:2], "--out", str(tmp_path / "same")]) == 0
    assert "different image sets" not in capsys.readouterr().err
    assert main(["report", *paths, "--out", str(tmp_path / "mixed")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: these results are on different image sets" in err
    assert "6 images" in err and "4 images" in err
    assert "different image sets" in (tmp_path / "mixed" / "table.md").read_text()
