"""The `measured` fixture (tests/conftest.py): what a test records is listed, with the test's id, in a
"measured" section of the run's summary, even under -q, which hides what tests print."""
import pathlib

pytest_plugins = ["pytester"]

CONFTEST = pathlib.Path(__file__).resolve().parents[1] / "conftest.py"


def test_a_recorded_figure_is_listed_in_the_summary_under_q(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_figures="""
        def test_burst(measured):
            measured("overload: 12 admitted, 500 refused")
            print("printed, so hidden by -q")

        def test_nothing():
            pass
    """)
    result = pytester.runpytest("-q")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*= measured =*", "test_figures.py::test_burst: overload: 12 admitted, 500 refused"])
    result.stdout.no_fnmatch_line("*printed, so hidden*")


def test_a_run_that_records_nothing_has_no_measured_section(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    result = pytester.runpytest("-q")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*= measured =*")
