"""The three command lines' options: every one documented with its default, a bad value refused in one line
naming the option (exit 2, before anything runs), rules that span options refused in words, and the
command's error path (interrupts, unwritable outputs) as one line."""
import argparse
import errno

import pytest

from pie_exec.cli import build_parser as exec_parser
from pie_exec.cli import main as pie_exec
from pie_serving.options import names, run_command
from pie_sim.cli import build_parser as sim_parser
from pie_sim.cli import main as pie_sim
from pie_validate.cli import build_parser as validate_parser
from pie_validate.cli import main as pie_validate


def _commands():
    """(command name, parser) of every command and sub-command."""
    for parser in (sim_parser(), exec_parser()):
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        yield from ((f"{parser.prog} {name}", sub) for name, sub in subs.choices.items())
    yield "pie-validate", validate_parser()


COMMANDS = dict(_commands())


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_and_shows_its_default(command):
    parser = COMMANDS[command]
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        shown = action.default is None or action.default is False or "default" in action.help
        assert shown or f"(default: {action.default})" in " ".join(text.split()), (command, action.option_strings)


def test_option_names_agree_across_commands():
    """One spelling a setting: --max-num-seqs everywhere (preview once said --max-seqs)."""
    spelled = {o for parser in COMMANDS.values() for a in parser._actions for o in a.option_strings}
    assert "--max-seqs" not in spelled and "--max-num-seqs" in spelled
    preview = {o for a in COMMANDS["pie-sim preview"]._actions for o in a.option_strings}
    assert "--max-num-seqs" in preview


def test_capacity_lists_only_the_options_it_uses():
    spelled = {o for a in COMMANDS["pie-sim capacity"]._actions for o in a.option_strings}
    assert not spelled & {"--trace-iterations", "--layer-events"}


def test_cv_is_related_to_vllms_burstiness():
    assert "--burstiness" in " ".join(COMMANDS["pie-sim run"].format_help().split())


SIM = ["run", "--num-requests", "3"]
EXEC = ["run", "--num-requests", "2"]


@pytest.mark.parametrize("main, argv, message", [
    (pie_sim, [*SIM, "--block-size", "0"], "--block-size must be a positive integer, got 0"),
    (pie_sim, [*SIM, "--block-size", "-16"], "--block-size must be a positive integer, got -16"),
    (pie_sim, [*SIM, "--max-num-seqs", "0", "--policy", "flexgen"], "--max-num-seqs must be a positive integer"),
    (pie_sim, [*SIM, "--cpu-mem-gb", "-5", "--policy", "vllm"], "--cpu-mem-gb must be a non-negative finite number"),
    (pie_sim, [*SIM, "--cpu-mem-gb", "inf"], "--cpu-mem-gb must be a non-negative finite number, got inf"),
    (pie_sim, [*SIM, "--gpu-mem-util", "nan"], "--gpu-mem-util must be a fraction in (0, 1], got nan"),
    (pie_sim, [*SIM, "--gpu-mem-util", "1.5"], "--gpu-mem-util must be a fraction in (0, 1]"),
    (pie_sim, [*SIM, "--trace-iterations", "-1"], "--trace-iterations must be a non-negative integer"),
    (pie_sim, [*SIM, "--seed", "-1"], "--seed must be an integer in [0, 4294967296), got -1"),
    (pie_sim, [*SIM, "--rate", "0"], "--rate must be a positive number"),
    (pie_sim, [*SIM, "--rate", "fast"], "--rate must be a positive number of requests a second (inf: all at once), "
                                        "got 'fast'"),
    (pie_sim, [*SIM, "--share", "1"], "--share must be a share in [0, 1)"),
    (pie_sim, [*SIM, "--prefetch-depth", "0"], "--prefetch-depth must be a positive integer"),
    (pie_sim, [*SIM, "--micro-batches", "0"], "--micro-batches must be a positive integer"),
    (pie_sim, ["compare", "--policies", ""], "--policies must name at least one, got ''"),
    (pie_sim, ["compare", "--policies", "vllm,pie,vllm"], "--policies must not name 'vllm' twice"),
    (pie_sim, ["preview", "--max-num-seqs", "0"], "--max-num-seqs must be a positive integer"),
    (pie_sim, ["capacity", "--tolerance", "1"], "--tolerance must be a fraction in (0, 1)"),
    (pie_sim, ["capacity", "--slo", "ttft_p99=inf"], "--slo ttft_p99=inf: the target must be a positive"),
    (pie_sim, ["capacity", "--workers", "0"], "--workers must be a positive integer"),
    (pie_sim, ["reproduce", "--workers", "-2"], "--workers must be a positive integer"),
    (pie_sim, ["sweep", "g.toml", "--out", "o", "--workers", "0"], "--workers must be a positive integer"),
    (pie_exec, [*EXEC, "--cpu-kv-gb", "-1", "--policy", "vllm"], "--cpu-kv-gb must be a non-negative finite"),
    (pie_exec, [*EXEC, "--gpu-kv-gb", "-1"], "--gpu-kv-gb must be a positive finite number, got -1"),
    (pie_exec, [*EXEC, "--gpu-kv-gb", "nan"], "--gpu-kv-gb must be a positive finite number, got nan"),
    (pie_exec, [*EXEC, "--rate", "0"], "--rate must be a positive number"),
    (pie_exec, [*EXEC, "--seed", "-1"], "--seed must be an integer in [0, 4294967296)"),
    (pie_exec, [*EXEC, "--num-requests", "0"], "--num-requests must be a positive integer"),
    (pie_exec, [*EXEC, "--threads", "0"], "--threads must be a positive integer"),
    (pie_exec, [*EXEC, "--policy", "flexgen"], "--policy: invalid choice: 'flexgen'"),
    (pie_exec, ["calibrate", "--batches", "1,0", "--out", "p.toml"], "--batches must be positive whole numbers"),
    (pie_validate, ["--profile", "p.toml", "--rounds", "0", "--out", "o"], "--rounds must be a positive integer"),
    (pie_validate, ["--profile", "p.toml", "--policies", ",", "--out", "o"], "--policies must name at least one"),
    # rules that span options: an option that would be ignored is refused
    (pie_sim, [*SIM, "--cv", "2"], "--cv shapes the gaps of re-timed arrivals: it needs --rate"),
    (pie_sim, [*SIM, "--micro-batches", "4"], "--micro-batches applies to pp-vllm and pipemax only, not pie"),
    (pie_sim, [*SIM, "--policy", "vllm", "--share", "0.3"], "--share applies to the policies that keep live KV"),
    (pie_sim, ["compare", "--policies", "vllm,vllm-swap", "--micro-batches", "2"], "--micro-batches applies to"),
    (pie_sim, ["capacity", "--policy", "vllm", "--micro-batches", "2", "--out", "o"], "--micro-batches applies to"),
    (pie_exec, [*EXEC, "--cv", "2"], "--cv shapes the gaps of re-timed arrivals: it needs --rate"),
    (pie_exec, ["run", "--prompts", "p.jsonl", "--rate", "4"], "--rate shapes a trace's requests; --prompts arrive"),
    (pie_exec, ["run", "--prompts", "p.jsonl", "--num-requests", "4"], "--num-requests shapes a trace's requests"),
])
def test_a_bad_value_is_refused_in_one_line_naming_the_option(tmp_path, monkeypatch, capsys, main, argv, message):
    """Before anything runs or is written; argparse's refusals on stderr, the command's on stdout."""
    monkeypatch.chdir(tmp_path)
    if "--out" not in argv and argv[0] in ("run", "compare"):
        argv = [*argv, "--out", "o"]
    assert main(argv) == 2
    printed = capsys.readouterr()
    lines = (printed.out + printed.err).strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_a_bad_option_is_one_line_and_names_the_help():
    with pytest.raises(SystemExit) as e:
        sim_parser().parse_args(["run", "--out", "o", "--block-size", "x"])
    assert e.value.code == 2


def test_names_drop_blanks():
    assert names(" vllm, ,pie ,") == ["vllm", "pie"]


def _raise(error):
    def command(console):
        raise error
    return command


@pytest.mark.parametrize("error, status, text", [
    (KeyboardInterrupt(), 130, "prog: interrupted"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/requests.csv"), 2,
     "prog: error: /out/requests.csv: No space left on device"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/out"), 2, "prog: error: /ro/out: Read-only file system"),
    (ValueError("bad [thing]"), 2, "prog: error: bad [thing]"),
])
def test_interrupts_and_unwritable_outputs_are_one_line(capsys, error, status, text):
    assert run_command("prog", _raise(error), (ValueError,)) == status
    printed = capsys.readouterr()
    assert printed.out.strip() == text and "Traceback" not in printed.err
